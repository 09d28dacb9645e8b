"""Pick the operating point from sweep lines: the criteria of `steerable tune` and the report's marked point.

- budget (default): the highest behaviour rate among configurations within every side-effect budget
  given (KL on benign prompts, median-perplexity increase, capability drop, over-refusal increase).
- f1 (seed 000): harm reduction H and capability preservation C, F1 = 2HC / (H + C).
- angle (seed 003): the highest behaviour rate among configurations with zero perplexity violations.
- error (seed 002): the lowest behaviour error 1 − rate (no budget; ties go to the weakest setting).
Ties on the criterion go to the smaller KL, then the smaller knob value: the gentlest setting that does
as well.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from steerable.errors import DataError, SteerableError
from steerable.sweeps.records import SweepRecord, baseline_of, capability_change, ppl_violations

CRITERIA = ("budget", "f1", "angle", "error")


@dataclass(frozen=True)
class Budget:
    """Side-effect budgets of the `budget` criterion (None: not budgeted) and the `angle` criterion's threshold."""

    max_kl: float | None = None
    max_ppl_increase: float | None = None  # absolute increase of the median completion perplexity
    max_capability_drop: float | None = None  # accuracy points, e.g. 0.02
    max_over_refusal: float | None = None  # increase of the benign refusal rate, e.g. 0.05
    ppl_threshold: float | None = None  # a completion above it is a violation (default 2 × baseline median)


@dataclass(frozen=True)
class Choice:
    """The chosen line, its score under the criterion, why (in words), and how many lines were weighed."""

    record: SweepRecord
    score: float
    criterion: str
    why: str
    considered: int
    admissible: int


def median_ppl(record: SweepRecord) -> float:
    """Median unsteered-model perplexity over every completion of the line (both prompt sets)."""
    vals = [p for s in record.summaries() for p in s.perplexities if p is not None]
    return statistics.median(vals) if vals else math.nan


def ppl_threshold(records: Sequence[SweepRecord], budget: Budget) -> float:
    """The perplexity of a violating completion: the budget's, else twice the unsteered median."""
    return budget.ppl_threshold if budget.ppl_threshold is not None else 2 * median_ppl(baseline_of(records))


def _benign_refusal(record: SweepRecord) -> float | None:
    return record.benign.refusal.rate if record.benign is not None else None


def violations(record: SweepRecord, base: SweepRecord, budget: Budget) -> list[str]:
    """The budgets this configuration breaks, in words (empty: admissible)."""
    out = []
    kl = record.kl or 0.0
    if budget.max_kl is not None and kl > budget.max_kl:
        out.append(f"KL {kl:.3g} > {budget.max_kl:g}")
    if budget.max_ppl_increase is not None:
        d = median_ppl(record) - median_ppl(base)
        if d > budget.max_ppl_increase:
            out.append(f"perplexity +{d:.3g} > {budget.max_ppl_increase:g}")
    if budget.max_capability_drop is not None:
        change = capability_change(record, base)
        if change is None:
            raise SteerableError("a capability budget needs MMLU results: sweep with --mmlu N")
        if -change.change > budget.max_capability_drop:
            out.append(f"capability {change.change:+.1%} < −{budget.max_capability_drop:.1%}")
    if budget.max_over_refusal is not None:
        mine, theirs = _benign_refusal(record), _benign_refusal(base)
        if mine is None or theirs is None:
            raise SteerableError("an over-refusal budget needs benign prompts: sweep with --benign")
        if mine - theirs > budget.max_over_refusal:
            out.append(f"over-refusal +{mine - theirs:.1%} > {budget.max_over_refusal:.1%}")
    return out


def f1_score(record: SweepRecord, base: SweepRecord) -> tuple[float, float, float]:
    """(F1, H, C): H the share of the baseline's missing behaviour that steering supplies (for refusal, the
    fraction of harmful completions blocked), C the capability kept — MMLU accuracy over the baseline's
    when measured, else the share of benign prompts still answered."""
    b, r = base.behaviour.rate, record.behaviour.rate
    h = max(0.0, (r - b) / (1 - b)) if b < 1 else 1.0
    if record.capability is not None and base.capability is not None:
        acc, acc0 = record.capability.accuracy.rate, base.capability.accuracy.rate
        c = min(1.0, acc / acc0) if acc0 else 0.0
    elif record.benign is not None and base.benign is not None:
        ok, ok0 = 1 - record.benign.refusal.rate, 1 - base.benign.refusal.rate
        c = min(1.0, ok / ok0) if ok0 else 0.0
    else:
        raise SteerableError("F1 needs capability (--mmlu) or benign prompts (--benign) in the sweep")
    return (2 * h * c / (h + c) if h + c else 0.0), h, c


def _knob(record: SweepRecord) -> float:
    v = record.value
    if isinstance(v, int | float):
        return abs(float(v))
    if isinstance(v, str) and v[1:].isdigit():
        return float(v[1:])
    return 0.0


def _behaviour(r: SweepRecord) -> float:
    return r.behaviour.rate


def _minus_error(r: SweepRecord) -> float:
    return -(1 - r.behaviour.rate)


def select(records: Sequence[SweepRecord], criterion: str = "budget", budget: Budget | None = None) -> Choice:
    """The operating point among `records` (all from one sweep) by `criterion`."""
    if criterion not in CRITERIA:
        raise SteerableError(f"unknown criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    budget = budget or Budget()
    base = baseline_of(records)
    threshold = ppl_threshold(records, budget)
    candidates = [r for r in records if not r.is_baseline]
    if not candidates:
        raise DataError("the sweep has no steered configuration to choose from")
    score: Callable[[SweepRecord], float]
    if criterion == "budget":
        pool = [r for r in candidates if not violations(r, base, budget)]
        score = _behaviour
    elif criterion == "angle":
        pool = [r for r in candidates if ppl_violations(r, threshold) == 0]
        score = _behaviour
    elif criterion == "f1":
        pool = candidates

        def score(r: SweepRecord) -> float:
            return f1_score(r, base)[0]
    else:
        pool = candidates
        score = _minus_error
    if not pool and criterion == "angle":
        raise SteerableError(f"every configuration has completions above perplexity {threshold:.2f} (twice the "
                             "unsteered median unless --ppl-threshold is given); sweep weaker settings")
    if not pool:
        worst = {r.label: violations(r, base, budget) for r in candidates[:3]}
        raise SteerableError(f"no configuration meets the budget (e.g. {worst}); loosen it or sweep weaker settings")
    best = max(pool, key=lambda r: (score(r), -(r.kl or 0.0), -_knob(r)))
    why = _explain(best, base, criterion, threshold)
    if best.behaviour.rate <= base.behaviour.rate:
        why = "no admissible configuration beats the unsteered model; " + why
    return Choice(best, score(best), criterion, why, len(candidates), len(pool))


def _explain(r: SweepRecord, base: SweepRecord, criterion: str, threshold: float) -> str:
    b = r.behaviour
    parts = [f"{b.name} {b.rate:.1%} [{b.ci95[0]:.0%}, {b.ci95[1]:.0%}] (n={b.n}) "
             f"vs {base.behaviour.rate:.1%} unsteered"]
    if r.kl is not None:
        parts.append(f"KL {r.kl:.3g}")
    parts.append(f"median perplexity {median_ppl(r):.2f} (unsteered {median_ppl(base):.2f})")
    if criterion == "angle":
        parts.append(f"0 completions above perplexity {threshold:.2f}")
    if criterion == "f1":
        f1, h, c = f1_score(r, base)
        parts.append(f"F1 {f1:.3f} (H {h:.2f}, C {c:.2f})")
    change = capability_change(r, base)
    if change:
        parts.append(f"MMLU {change.change:+.1%}")
    return "; ".join(parts)
