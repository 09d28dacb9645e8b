"""Capability (methods.md §8): zero-shot MMLU accuracy on a fixed stratified subset, and its change under
a plan with a paired-bootstrap interval."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from steerable.data.sources import data_file
from steerable.evaluate.logits import score_batches, single_token_id
from steerable.evaluate.refusal import Rate, rate
from steerable.models.load import ModelHandle

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class MCItem:
    question: str
    choices: tuple[str, ...]
    answer: str  # the correct letter
    subject: str


def load_mmlu() -> list[MCItem]:
    """The bundled MMLU test items in file order (its 2 stray header rows, answer "answer", dropped)."""
    out = []
    for line in data_file("mmlu").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r["correct_answer"] in LETTERS:
            choices = tuple(str(r[f"answer_{c.lower()}"]) for c in LETTERS)
            out.append(MCItem(r["question"], choices, r["correct_answer"], r["topic"]))
    return out


def stratified(items: Sequence[MCItem], n_per_subject: int, seed: int = 0) -> list[MCItem]:
    """`n_per_subject` items of each subject (all if fewer), drawn by a generator seeded with (seed, subject):
    a subject's draw depends only on its own items, so the subset is fixed. Ordered by subject, then file."""
    by_subject: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_subject.setdefault(it.subject, []).append(i)
    out = []
    for subject in sorted(by_subject):
        idx = by_subject[subject]
        pick = random.Random(f"{seed}:{subject}").sample(idx, min(n_per_subject, len(idx)))
        out += [items[i] for i in sorted(pick)]
    return out


def mc_prompt(item: MCItem) -> str:
    lines = [f"The following is a multiple choice question about {item.subject}.", "", item.question]
    lines += [f"{c}. {text}" for c, text in zip(LETTERS, item.choices, strict=False)]
    lines += ["", f"Answer with the letter of the correct option ({', '.join(LETTERS[: len(item.choices)])})."]
    return "\n".join(lines)


def mc_correct(handle: ModelHandle, items: Sequence[MCItem], plan: Any = None, *, batch_size: int = 16,
               system: str | None = None, plans: Sequence[Any] | None = None) -> list[bool]:
    """Per item, whether the letter with the highest logit at the start of the reply is the correct one
    (under `plan`, or under each item's own plan in `plans`)."""
    letter_ids = [single_token_id(handle.tokenizer, c) for c in LETTERS]
    out = [False] * len(items)
    prompts = [mc_prompt(it) for it in items]
    for b in score_batches(handle, prompts, [""] * len(items), plan, batch_size, system=system,
                            plans=plans):
        for r, i in enumerate(b.rows):
            k = len(items[i].choices)
            choice = int(b.logprobs[r, 0, letter_ids[:k]].argmax())
            out[i] = LETTERS[choice] == items[i].answer
    return out


def mmlu_accuracy(handle: ModelHandle, n_per_subject: int = 10, plan: Any = None, *,
                  items: Sequence[MCItem] | None = None, batch_size: int = 16, seed: int = 0) -> Rate:
    """Zero-shot accuracy on `items` (default: the stratified subset of the bundled MMLU), k/n with a CI."""
    items = stratified(load_mmlu(), n_per_subject, seed) if items is None else items
    return rate(mc_correct(handle, items, plan, batch_size=batch_size))


@dataclass(frozen=True)
class Change:
    """A paired difference of accuracies (steered − base) with a bootstrap 95 % interval."""

    value: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:+.1%} [{self.lo:+.1%}, {self.hi:+.1%}] (n={self.n})"

    def to_json(self) -> dict[str, Any]:
        return {"change": self.value, "n": self.n, "ci95": [self.lo, self.hi]}


def paired_change(steered: Sequence[bool], base: Sequence[bool], resamples: int = 2000, seed: int = 0) -> Change:
    """mean(steered) − mean(base) over the same items, the interval from resampling items (pairs kept)."""
    if len(steered) != len(base):
        raise ValueError(f"{len(steered)} steered results for {len(base)} base results")
    n = len(base)
    if n == 0:
        return Change(float("nan"), float("nan"), float("nan"), 0)
    d = np.asarray(steered, dtype=np.int8) - np.asarray(base, dtype=np.int8)
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // n)
    stats = np.concatenate([d[rng.integers(0, n, (min(chunk, resamples - s), n))].mean(1)
                            for s in range(0, resamples, chunk)])
    stats.sort()
    return Change(float(d.mean()), float(stats[int(0.025 * resamples)]), float(stats[int(0.975 * resamples) - 1]), n)


def mmlu_change(handle: ModelHandle, plan: Any, n_per_subject: int = 10, *, items: Sequence[MCItem] | None = None,
                batch_size: int = 16, seed: int = 0) -> dict[str, Rate | Change]:
    """Accuracy unsteered and under `plan` on the same items, and the paired change with its interval."""
    items = stratified(load_mmlu(), n_per_subject, seed) if items is None else items
    base = mc_correct(handle, items, None, batch_size=batch_size)
    steered = mc_correct(handle, items, plan, batch_size=batch_size)
    return {"base": rate(base), "steered": rate(steered), "change": paired_change(steered, base, seed=seed)}
