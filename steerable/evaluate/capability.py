"""Capability (methods.md §8): MMLU accuracy on a fixed stratified subset, in one of several answer formats,
and its change under a plan with a paired-bootstrap interval.

Formats (by name; `-Kshot` after any of them prepends K solved items of the same subject as earlier chat
turns, e.g. "cue-3shot"):

- "letter": the highest of the letter logits A–D at the start of the reply (the format of seeds 000–003);
- "cue": the reply opens with the answer cue `CUE` ("The answer is (") and the letter logit is read after it;
- "choice-loglik": the question alone, each choice's full text scored as the reply, the highest mean
  per-token log-likelihood wins (four continuations per item).

`+cal` after any of them ("cue+cal", "letter-3shot+cal") removes the model's letter prior label-free:
from each item's score for a choice position, that position's mean over the *other* items scored under
the same plan is subtracted (`calibrated`), so the answer is the letter the model favours more on this
item than on average.

Every format runs batched through `score_batches`, under one plan or a plan per item. The default,
`DEFAULT_FORMAT` = "cue+cal" on `DEFAULT_PER_SUBJECT` = 18 items per subject (1 026), was chosen on the
bundled chat models (docs/results.md, "Capability measure").
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from steerable.data.sources import data_file
from steerable.errors import SteerableError
from steerable.evaluate.logits import score_batches, single_token_id
from steerable.evaluate.refusal import Rate, rate
from steerable.models.load import Messages, ModelHandle

LETTERS = ("A", "B", "C", "D")
CUE = "The answer is ("
BASE_FORMATS = ("letter", "cue", "choice-loglik")
CAL = "+cal"
DEFAULT_FORMAT = "cue+cal"
DEFAULT_PER_SUBJECT = 18  # the default capability item set: 18 of each of the 57 subjects, 1 026 items
DEV_PER_SUBJECT = 5
_SHOTS = re.compile(r"^(?P<base>[a-z-]+?)(?:-(?P<k>\d+)shot)?$")


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


def _by_subject(items: Sequence[MCItem]) -> dict[str, list[int]]:
    by_subject: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_subject.setdefault(it.subject, []).append(i)
    return by_subject


def stratified(items: Sequence[MCItem], n_per_subject: int, seed: int = 0) -> list[MCItem]:
    """`n_per_subject` items of each subject (all if fewer), drawn by a generator seeded with (seed, subject):
    a subject's draw depends only on its own items, so the subset is fixed. Ordered by subject, then file."""
    by_subject = _by_subject(items)
    out = []
    for subject in sorted(by_subject):
        idx = by_subject[subject]
        pick = random.Random(f"{seed}:{subject}").sample(idx, min(n_per_subject, len(idx)))
        out += [items[i] for i in sorted(pick)]
    return out


def dev_items(items: Sequence[MCItem], n_per_subject: int = DEV_PER_SUBJECT) -> dict[str, list[MCItem]]:
    """Per subject, the fixed few-shot pool: `n_per_subject` items drawn with the seed "dev:SUBJECT"
    (independent of `stratified`'s draw), in file order."""
    out = {}
    for subject, idx in _by_subject(items).items():
        pick = random.Random(f"dev:{subject}").sample(idx, min(n_per_subject, len(idx)))
        out[subject] = [items[i] for i in sorted(pick)]
    return out


def split_calibration(name: str) -> tuple[str, bool]:
    """"cue-3shot+cal" → ("cue-3shot", True); a name without `+cal` → (name, False)."""
    return (name[: -len(CAL)], True) if name.endswith(CAL) else (name, False)


def parse_format(name: str) -> tuple[str, int]:
    """"cue-3shot" → ("cue", 3); a plain base name → (name, 0); a `+cal` suffix is allowed and ignored here
    (`split_calibration` reads it)."""
    m = _SHOTS.match(split_calibration(name)[0])
    if m is None or m["base"] not in BASE_FORMATS:
        raise SteerableError(f"unknown capability format {name!r}: one of {', '.join(BASE_FORMATS)}, "
                             "optionally with -Kshot and +cal (e.g. cue-3shot, cue+cal)")
    return m["base"], int(m["k"] or 0)


def mc_prompt(item: MCItem) -> str:
    lines = [f"The following is a multiple choice question about {item.subject}.", "", item.question]
    lines += [f"{c}. {text}" for c, text in zip(LETTERS, item.choices, strict=False)]
    lines += ["", f"Answer with the letter of the correct option ({', '.join(LETTERS[: len(item.choices)])})."]
    return "\n".join(lines)


def question_prompt(item: MCItem) -> str:
    """The question without its lettered choices (the choice-loglik format scores each choice as the reply)."""
    return f"The following is a question about {item.subject}.\n\n{item.question}"


def shot_answer(item: MCItem, base: str) -> str:
    """A solved example's reply in format `base`."""
    if base == "letter":
        return item.answer
    if base == "cue":
        return f"{CUE}{item.answer})"
    return item.choices[LETTERS.index(item.answer)]


def shots_for(item: MCItem, k: int, pool: dict[str, list[MCItem]]) -> list[MCItem]:
    """Up to `k` solved examples for `item`: its subject's dev items other than itself (the subject's pool
    being too small, other subjects' dev items in sorted-subject order)."""
    own = [d for d in pool.get(item.subject, []) if d != item]
    rest = [d for s in sorted(pool) if s != item.subject for d in pool[s] if d != item]
    return (own + rest)[:k]


def format_prompt(item: MCItem, fmt: str, pool: dict[str, list[MCItem]] | None = None) -> str | Messages:
    """The prompt of `item` in format `fmt`: one user turn, or with -Kshot the K examples as earlier
    user / assistant turns. The reply's opening (the cue, a choice text) is not part of it."""
    base, k = parse_format(fmt)
    ask = question_prompt if base == "choice-loglik" else mc_prompt
    if k == 0:
        return ask(item)
    if pool is None:
        pool = dev_items(load_mmlu())
    messages: Messages = []
    for s in shots_for(item, k, pool):
        messages += [{"role": "user", "content": ask(s)}, {"role": "assistant", "content": shot_answer(s, base)}]
    return [*messages, {"role": "user", "content": ask(item)}]


def _pool_for(fmt: str, pool: dict[str, list[MCItem]] | None) -> dict[str, list[MCItem]] | None:
    return dev_items(load_mmlu()) if pool is None and parse_format(fmt)[1] else pool


def mc_scores(handle: ModelHandle, items: Sequence[MCItem], plan: Any = None, *, format: str = DEFAULT_FORMAT,
              batch_size: int = 16, system: str | None = None, plans: Sequence[Any] | None = None,
              pool: dict[str, list[MCItem]] | None = None) -> list[list[float]]:
    """Per item, one score per choice in format `format` (letter log-probs, or mean choice log-likelihood;
    with `+cal`, those less the other items' mean under the same plan); the highest is the model's answer."""
    raw, cal = split_calibration(format)
    if cal:
        return calibrated_by_plan(mc_scores(handle, items, plan, format=raw, batch_size=batch_size, system=system,
                                            plans=plans, pool=pool), plans)
    base, _ = parse_format(format)
    pool = _pool_for(format, pool)
    prompts = [format_prompt(it, format, pool) for it in items]
    if base == "choice-loglik":
        return _loglik_scores(handle, items, prompts, plan, batch_size, system, plans)
    tail = CUE if base == "cue" else ""
    letter_ids = [single_token_id(handle.tokenizer, c) for c in LETTERS]
    out: list[list[float]] = [[] for _ in items]
    for b in score_batches(handle, prompts, [tail] * len(items), plan, batch_size, system=system, plans=plans):
        for r, i in enumerate(b.rows):
            k = len(items[i].choices)
            out[i] = b.logprobs[r, int(b.tail_lengths[r]), letter_ids[:k]].tolist()
    return out


def _loglik_scores(handle: ModelHandle, items: Sequence[MCItem], prompts: Sequence[str | Messages], plan: Any,
                   batch_size: int, system: str | None, plans: Sequence[Any] | None) -> list[list[float]]:
    rows = [(i, c) for i, it in enumerate(items) for c in range(len(it.choices))]
    out = [[float("-inf")] * len(it.choices) for it in items]
    row_plans = None if plans is None else [plans[i] for i, _ in rows]
    for b in score_batches(handle, [prompts[i] for i, _ in rows], [items[i].choices[c] for i, c in rows], plan,
                           batch_size, system=system, plans=row_plans):
        target = b.ids[:, b.width :]
        real = b.mask[:, b.width :].bool()
        lp = b.logprobs[:, :-1].gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [:, j] predicts token W + j
        mean = torch.where(real, lp, 0.0).sum(1) / real.sum(1).clamp(min=1)
        for r, j in enumerate(b.rows):
            if real[r].any():
                i, c = rows[j]
                out[i][c] = float(mean[r])
    return out


def mc_correct(handle: ModelHandle, items: Sequence[MCItem], plan: Any = None, *, batch_size: int = 16,
               system: str | None = None, plans: Sequence[Any] | None = None, format: str = DEFAULT_FORMAT,
               pool: dict[str, list[MCItem]] | None = None) -> list[bool]:
    """Per item, whether the model's answer in format `format` is the correct one (under `plan`, or under
    each item's own plan in `plans`). The default, `DEFAULT_FORMAT` ("cue+cal"), reads the letter after the
    answer cue with the letter prior removed (docs/results.md, "Capability measure")."""
    scores = mc_scores(handle, items, plan, format=format, batch_size=batch_size, system=system, plans=plans,
                       pool=pool)
    return [p == it.answer for p, it in zip(predicted(scores), items, strict=True)]


def mc_scores_formats(handle: ModelHandle, items: Sequence[MCItem], formats: Sequence[str], plan: Any = None, *,
                      batch_size: int = 16, pool: dict[str, list[MCItem]] | None = None
                      ) -> dict[str, list[list[float]]]:
    """`mc_scores` for several formats; "letter" and "cue" with the same shots share one pass (the letter
    is read at the reply start, the cue's letter after the cue, in the same forward)."""
    raws = list(dict.fromkeys(split_calibration(f)[0] for f in formats))
    if raws != list(formats):
        got = mc_scores_formats(handle, items, raws, plan, batch_size=batch_size, pool=pool)
        return {f: calibrated(got[r]) if c else got[r] for f in formats for r, c in [split_calibration(f)]}
    out: dict[str, list[list[float]]] = {}
    letter_ids = [single_token_id(handle.tokenizer, c) for c in LETTERS]
    todo = list(formats)
    for fmt in formats:
        base, k = parse_format(fmt)
        pair = f"letter-{k}shot" if k else "letter", f"cue-{k}shot" if k else "cue"
        if base in ("letter", "cue") and fmt in todo and all(p in todo for p in pair):
            p = _pool_for(fmt, pool)
            prompts = [format_prompt(it, pair[1], p) for it in items]
            lt: list[list[float]] = [[] for _ in items]
            cu: list[list[float]] = [[] for _ in items]
            for b in score_batches(handle, prompts, [CUE] * len(items), plan, batch_size):
                for r, i in enumerate(b.rows):
                    n = len(items[i].choices)
                    lt[i] = b.logprobs[r, 0, letter_ids[:n]].tolist()
                    cu[i] = b.logprobs[r, int(b.tail_lengths[r]), letter_ids[:n]].tolist()
            out[pair[0]], out[pair[1]] = lt, cu
            todo = [f for f in todo if f not in pair]
    for fmt in todo:
        out[fmt] = mc_scores(handle, items, plan, format=fmt, batch_size=batch_size, pool=pool)
    return {f: out[f] for f in formats}


def predicted(scores: Sequence[Sequence[float]]) -> list[str]:
    """The letter each item's scores pick."""
    return [LETTERS[int(np.argmax(s))] for s in scores]


def debiased(scores: Sequence[Sequence[float]]) -> list[list[float]]:
    """Scores with each choice position's mean over the items subtracted: a diagnostic that removes a constant
    letter preference (no labels used; the prior is estimated on the same items). Items need equal choices."""
    arr = np.asarray(scores, dtype=np.float64)
    return (arr - arr.mean(0, keepdims=True)).tolist()


def calibrated(scores: Sequence[Sequence[float]]) -> list[list[float]]:
    """Scores with a letter prior removed, label-free and never from the item itself: from each item's score
    for each choice position, that position's mean over all *other* items is subtracted (leave-one-out
    contextual calibration). A constant preference for one letter then no longer decides the answer; what
    is left is how much more the model favours a letter on this item than it does on average. Items need
    equal numbers of choices; fewer than two items are returned unchanged."""
    arr = np.asarray(scores, dtype=np.float64)
    n = len(arr)
    if n < 2:
        return arr.tolist()
    others = (arr.sum(0, keepdims=True) - arr) / (n - 1)
    return (arr - others).tolist()


def calibrated_by_plan(scores: Sequence[Sequence[float]], plans: Sequence[Any] | None) -> list[list[float]]:
    """`calibrated` within each group of rows steered alike: all rows when `plans` is None, else the rows
    whose entries in `plans` are the same object (a sweep passes one plan object per configuration, repeated
    over the items). A plan changes the letter prior, so each is calibrated on its own rows."""
    if plans is None:
        return calibrated(scores)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(plans):
        groups.setdefault(id(p), []).append(i)
    out: list[list[float]] = [[] for _ in scores]
    for rows in groups.values():
        for i, row in zip(rows, calibrated([scores[i] for i in rows]), strict=True):
            out[i] = row
    return out


def mc_correct_formats(handle: ModelHandle, items: Sequence[MCItem], formats: Sequence[str], plan: Any = None, *,
                       batch_size: int = 16, pool: dict[str, list[MCItem]] | None = None
                       ) -> dict[str, list[bool]]:
    """`mc_correct` for several formats, "letter" and "cue" sharing a pass (`mc_scores_formats`)."""
    scores = mc_scores_formats(handle, items, formats, plan, batch_size=batch_size, pool=pool)
    return {f: [p == it.answer for p, it in zip(predicted(s), items, strict=True)] for f, s in scores.items()}


def mmlu_accuracy(handle: ModelHandle, n_per_subject: int = DEFAULT_PER_SUBJECT, plan: Any = None, *,
                  items: Sequence[MCItem] | None = None, batch_size: int = 16, seed: int = 0,
                  format: str = DEFAULT_FORMAT) -> Rate:
    """Accuracy on `items` (default: the stratified subset of the bundled MMLU) in `format`, k/n with a CI."""
    items = stratified(load_mmlu(), n_per_subject, seed) if items is None else items
    return rate(mc_correct(handle, items, plan, batch_size=batch_size, format=format))


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


def mmlu_change(handle: ModelHandle, plan: Any, n_per_subject: int = DEFAULT_PER_SUBJECT, *,
                items: Sequence[MCItem] | None = None, batch_size: int = 16, seed: int = 0,
                format: str = DEFAULT_FORMAT) -> dict[str, Rate | Change]:
    """Accuracy unsteered and under `plan` on the same items, and the paired change with its interval."""
    items = stratified(load_mmlu(), n_per_subject, seed) if items is None else items
    base = mc_correct(handle, items, None, batch_size=batch_size, format=format)
    steered = mc_correct(handle, items, plan, batch_size=batch_size, format=format)
    return {"base": rate(base), "steered": rate(steered), "change": paired_change(steered, base, seed=seed)}
