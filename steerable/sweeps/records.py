"""One sweep result line: what a configuration did to behaviour, coherence, side effects and capability.

Raw per-prompt values (hits, perplexities, correctness) are kept in the line so tune and report can
recompute any summary — a different perplexity threshold, a paired capability change — without
rerunning the model.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerable.errors import SteerableError
from steerable.evaluate.capability import paired_change
from steerable.evaluate.coherence import compression_ratio, language_consistency, rep_n
from steerable.evaluate.refusal import is_refusal, rate

BEHAVIOURS = ("refusal", "compliance")


def behaviour_hits(behaviour: str, completions: Sequence[str]) -> list[bool]:
    """Per completion, whether it shows the behaviour the sweep promotes."""
    if behaviour == "refusal":
        return [is_refusal(c) for c in completions]
    if behaviour == "compliance":
        return [not is_refusal(c) for c in completions]
    raise SteerableError(f"unknown behaviour {behaviour!r}: use one of {', '.join(BEHAVIOURS)}")


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


def set_summary(completions: Sequence[str], perplexities: Sequence[float]) -> dict[str, Any]:
    """Refusal rate and text coherence of one prompt set's completions under one configuration."""
    refused = [is_refusal(c) for c in completions]
    finite = [p for p in perplexities if not math.isnan(p)]
    return {
        "refusal": rate(refused).to_json(),
        "refused": [int(r) for r in refused],
        "perplexity": _mean(perplexities),
        "perplexity_median": statistics.median(finite) if finite else math.nan,
        "perplexities": [round(p, 4) if not math.isnan(p) else None for p in perplexities],
        "language_consistency": _mean([language_consistency(c) for c in completions]),
        "compression_ratio": _mean([compression_ratio(c) for c in completions]),
        "rep4": _mean([rep_n(c, 4) for c in completions]),
    }


def category_rates(categories: Sequence[str | None], hits: Sequence[bool]) -> dict[str, Any]:
    by: dict[str, list[bool]] = {}
    for c, h in zip(categories, hits, strict=True):
        if c is not None:
            by.setdefault(str(c), []).append(h)
    return {c: rate(hs).to_json() for c, hs in sorted(by.items())}


def ppl_violations(record: dict[str, Any], threshold: float, sets: Sequence[str] = ("prompts", "benign")) -> int:
    """Completions whose perplexity under the unsteered model exceeds `threshold`."""
    return sum(1 for s in sets if s in record for p in record[s]["perplexities"] if p is not None and p > threshold)


def capability_change(record: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any] | None:
    mine, base = record.get("capability"), baseline.get("capability")
    if not mine or not base:
        return None
    return paired_change([bool(x) for x in mine["correct"]], [bool(x) for x in base["correct"]]).to_json()


def read_records(path: str | Path, repair: bool = True) -> list[dict[str, Any]]:
    """Finished lines of a sweep file. A torn last line (a killed writer) is skipped, and with `repair` cut
    from the file so the next append starts on a fresh line."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    if repair and good_end < len(raw):  # cut the half-written tail so appends start on a fresh line
        with open(path, "r+b") as f:
            f.truncate(good_end)
    out = []
    for n, line in enumerate(raw[:good_end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SteerableError(f"{path}:{n}: not a sweep result line ({e.msg})") from e
        if not isinstance(rec, dict) or "key" not in rec:
            raise SteerableError(f"{path}:{n}: not a sweep result line (no \"key\")")
        out.append(rec)
    return out


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line and make it durable before the next configuration starts."""
    line = json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def baseline_of(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    for r in records:
        if r["config"]["method"] == "none":
            return r
    raise SteerableError("the results hold no unsteered baseline line (method \"none\")")
