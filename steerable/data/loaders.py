"""Load prompts and contrastive pairs by built-in name or from JSONL, with fixed train/test splits.

Built-in sets are split by a seeded hash of each item's text (30 % test), so a split never changes
when a set grows and evaluation never sees calibration prompts. Select a split with `NAME:train`
(the default for calibration), `NAME:test` or `NAME:all`. JSONL files are used whole.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from steerable.data.jsonl import read_jsonl_numbered
from steerable.data.messages import check_prompt, check_text
from steerable.data.pyrit_sets import PYRIT_SETS, pyrit_rows
from steerable.data.refusal_pairs import refusal_pair
from steerable.data.roles import harmful_rows
from steerable.data.sources import DATA_FILES, data_file
from steerable.errors import DataError

SPLIT_SEED = "steerable-split-v1"
TEST_PERCENT = 30
PROMPT_SETS = ("advbench", "benign")
# sets load_prompt_rows also knows: the condition sources of data/condition_sources.py among them
ROW_SETS = (*PROMPT_SETS, "persona-harmful", "caa-refusal", "edgy-benign", *PYRIT_SETS)
PAIR_SETS = ("refusal-pairs", *sorted(k for k in DATA_FILES if k.startswith("caa-")))

T = TypeVar("T")


@dataclass(frozen=True)
class Pair:
    prompt: str
    positive: str
    negative: str


@dataclass(frozen=True)
class Example:
    """One calibration text: a prompt, optionally an answer, its class, and its pair (if any)."""

    prompt: str
    response: str | None
    label: int  # 1 = positive class (the behaviour to promote / detect)
    pair: int | None = None


def split_of(text: str) -> str:
    digest = hashlib.sha256(f"{SPLIT_SEED}:{text}".encode()).hexdigest()
    return "test" if int(digest[:8], 16) % 100 < TEST_PERCENT else "train"


def _parse_name(spec: str, default_split: str) -> tuple[str, str]:
    name, _, split = spec.partition(":")
    split = split or default_split
    if split not in ("train", "test", "all"):
        raise DataError(f"unknown split {split!r} in {spec!r}: use train, test or all")
    return name, split


def _keep(items: list[T], key: Callable[[T], str], split: str) -> list[T]:
    return items if split == "all" else [it for it in items if split_of(key(it)) == split]


def _advbench_rows() -> list[dict]:
    """AdvBench prompts with their main harm category (the first listed)."""
    doc = yaml.safe_load(data_file("advbench").read_text(encoding="utf-8"))
    return [{"prompt": s["value"], "category": (s.get("harm_categories") or ["uncategorised"])[0]}
            for s in doc["seeds"]]


def _advbench() -> list[str]:
    return [r["prompt"] for r in _advbench_rows()]


def _benign() -> list[str]:
    return list(json.loads(data_file("benign").read_text(encoding="utf-8")))


def _jsonl_path(spec: str, what: str) -> Path | None:
    """The JSONL file `spec` names (None: `spec` is a built-in set name); a missing .jsonl is a DataError."""
    path = Path(spec)
    if path.suffix != ".jsonl":
        return None
    if not os.path.lexists(path):
        raise DataError(f"no such {what}: {spec}")
    return path


def _numbered(path: Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    rows = read_jsonl_numbered(path, what)
    if not rows:
        raise DataError(f"{path}: no rows (a {what} needs one JSON object per line)")
    return rows


def load_prompts(spec: str, default_split: str = "train") -> list[str]:
    """Prompts of a built-in set (`advbench`, `benign`, with `:split`) or a JSONL of `{"prompt"}` rows."""
    path = _jsonl_path(spec, "prompts file")
    if path is not None:
        rows = _numbered(path, "prompts file")
        missing = [n for n, r in rows if not isinstance(r.get("prompt"), str)]
        if missing:
            raise DataError(f"{path}: rows {missing[:5]} have no string \"prompt\"")
        return [check_text(r["prompt"], f"{path}:{n}", '"prompt"') for n, r in rows]
    name, split = _parse_name(spec, default_split)
    if name == "advbench":
        return _keep(_advbench(), lambda p: p, split)
    if name == "benign":
        return _keep(_benign(), lambda p: p, split)
    raise DataError(f"unknown prompt set {spec!r}: use {', '.join(PROMPT_SETS)} or a .jsonl file")


def _check_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    if "prompt" not in row:
        raise DataError(f"{where}: each row needs a \"prompt\" (a string or a list of messages)")
    if not isinstance(row["prompt"], str | list):
        raise DataError(f"{where}: each row needs a \"prompt\" (a string or a list of messages), got "
                        f"{type(row['prompt']).__name__}")
    prompt = check_prompt(row["prompt"], where, '"prompt"')
    if "plan" in row and row["plan"] is not None and not isinstance(row["plan"], dict | list):
        raise DataError(f"{where}: \"plan\" must be a JSON object, a list of them or null, got "
                        f"{type(row['plan']).__name__}")
    if row.get("category") is not None and not isinstance(row["category"], str):
        raise DataError(f"{where}: \"category\" must be a string, got {type(row['category']).__name__}")
    return {**row, "prompt": prompt}


def load_prompt_rows_located(spec: str, default_split: str = "test") -> list[tuple[str, dict[str, Any]]]:
    """`load_prompt_rows`, each row with where it came from: "FILE:LINE" (1-based) for a JSONL file, "NAME
    row I" for a built-in set, so per-row problems found later (a row's plan) can name the line."""
    path = _jsonl_path(spec, "prompts file")
    if path is not None:
        return [(f"{path}:{n}", _check_row(r, f"{path}:{n}")) for n, r in _numbered(path, "prompts file")]
    name, split = _parse_name(spec, default_split)
    if name == "advbench":
        rows = _keep(_advbench_rows(), lambda r: r["prompt"], split)
    elif name == "persona-harmful":  # the project's role data: a persona system prompt, then a harmful ask
        rows = harmful_rows(split)
    elif name in PYRIT_SETS:  # pyrit's other harmful seed sets (data/pyrit_sets.py)
        rows = _keep(pyrit_rows(name), lambda r: r["prompt"], split)
    elif name == "caa-refusal":  # the questions of CAA's refusal set, without their A/B choices
        rows = [{"prompt": p.prompt.split("\n\nChoices:")[0].strip()} for p in load_pairs(f"caa-refusal:{split}")]
    elif name == "edgy-benign":
        rows = edgy_benign_rows(split)
    elif name in PROMPT_SETS:
        rows = [{"prompt": p} for p in load_prompts(spec, default_split)]
    else:
        raise DataError(f"unknown prompt set {spec!r}: use {', '.join(ROW_SETS)} (with :train, :test or :all) "
                        "or a .jsonl file")
    return [(f"{name} row {i}", r) for i, r in enumerate(rows, 1)]


def edgy_benign_rows(split: str = "all") -> list[dict[str, str]]:
    """The project's edgy-but-harmless questions (60, five categories), each with a fixed split."""
    text = resources.files("steerable.data").joinpath("sets/edgy_benign.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows if split == "all" else [r for r in rows if r["split"] == split]


def load_prompt_rows(spec: str, default_split: str = "test") -> list[dict]:
    """Rows `{"prompt", ...}` of a built-in set or a JSONL file, keeping any other fields ("category",
    "plan", …); a prompt may be a string or a list of chat messages (checked: data/messages.py). A row's
    "plan" must be an object, a list or null (the plan validator checks it further). AdvBench rows carry
    their category."""
    return [r for _, r in load_prompt_rows_located(spec, default_split)]


def _split_caa(positive: str, negative: str) -> Pair:
    """CAA rows repeat the question in both texts; the shared head up to its last newline is the prompt."""
    n = 0
    while n < min(len(positive), len(negative)) and positive[n] == negative[n]:
        n += 1
    cut = positive.rfind("\n", 0, n) + 1
    if cut == 0:
        cut = positive.rfind(" ", 0, n) + 1
    return Pair(positive[:cut].rstrip(), positive[cut:].strip(), negative[cut:].strip())


def load_pairs(spec: str, default_split: str = "train") -> list[Pair]:
    """Pairs of answers to one prompt: `refusal-pairs`, `caa-*`, or a JSONL of {prompt, positive, negative}."""
    path = _jsonl_path(spec, "pairs file")
    if path is not None:
        pairs = []
        for n, r in _numbered(path, "pairs file"):
            where = f"{path}:{n}"
            if not all(isinstance(r.get(k), str) for k in ("prompt", "positive", "negative")):
                raise DataError(f"{where}: pair rows need string \"prompt\", \"positive\", \"negative\"")
            pairs.append(Pair(*(check_text(r[k], where, f'"{k}"') for k in ("prompt", "positive", "negative"))))
        return pairs
    name, split = _parse_name(spec, default_split)
    if name == "refusal-pairs":
        prompts = _keep(_advbench(), lambda p: p, split)
        return [Pair(p, *refusal_pair(i)) for i, p in enumerate(prompts)]
    if name in DATA_FILES and name.startswith("caa-"):
        rows = json.loads(data_file(name).read_text(encoding="utf-8"))
        pairs = [_split_caa(r["positive"], r["negative"]) for r in rows]
        return _keep(pairs, lambda p: p.prompt, split)
    raise DataError(f"unknown pair set {spec!r}: use {', '.join(PAIR_SETS)} or a .jsonl file")


def contrastive_examples(
    *, positive: str | None = None, negative: str | None = None, pairs: str | None = None,
    limit: int | None = None, default_split: str = "train",
) -> list[Example]:
    """Interleave the two classes (p0, n0, p1, n1, …) so each pair shares a batch.

    For unpaired classes, the i-th positive and i-th negative form pair i (used by pairwise PCA).
    """
    if pairs is not None:
        if positive is not None or negative is not None:
            raise DataError("give either --pairs or --positive/--negative, not both")
        ps = load_pairs(pairs, default_split)[:limit]
        out: list[Example] = []
        for i, p in enumerate(ps):
            out += [Example(p.prompt, p.positive, 1, i), Example(p.prompt, p.negative, 0, i)]
        return out
    if positive is None or negative is None:
        raise DataError("give --pairs, or both --positive and --negative")
    pos = load_prompts(positive, default_split)[:limit]
    neg = load_prompts(negative, default_split)[:limit]
    out = []
    for i in range(max(len(pos), len(neg))):
        paired = i < min(len(pos), len(neg))
        if i < len(pos):
            out.append(Example(pos[i], None, 1, i if paired else None))
        if i < len(neg):
            out.append(Example(neg[i], None, 0, i if paired else None))
    return out


def refusal_labels() -> list[tuple[str, int]]:
    """The labelled refusal responses (human_score 1 = refusal) for measuring a refusal judge."""
    out = []
    for name in ("refusal-labels", "refusal-labels-extra"):
        lines = [ln for ln in data_file(name).read_text(encoding="utf-8").splitlines(True) if not ln.startswith("#")]
        for row in csv.DictReader(lines):
            out.append((row["assistant_response"], int(row["human_score"])))
    return out
