"""Choosing a CAST condition (layer, threshold, comparison) from an artifact's score percentiles.

Works only from `DirectionSet.cast_percentiles` ([layer, fold, class, 101] percentiles of the CAST
score cast_score(h, v̂)) and the held-out class counts in `meta["counts"]`, so a condition can be chosen
for any saved artifact without the model or the calibration data.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

import torch

from steerable.directions.artifact import DirectionSet
from steerable.errors import SteerableError

COMPARES = (">", "<")
#: condition scores: CAST's cos(h, tanh(P_c h)) (blind to the side of ĉ h lies on), or the signed projection h·ĉ
SCORES = ("cast", "projection")
TRAIN, HELDOUT = 0, 1
POS, NEG = 0, 1


@dataclass(frozen=True)
class CastChoice:
    """A sequence is steered when `score compare threshold`; rates are estimated from percentile curves."""

    layer: int
    threshold: float
    compare: str  # ">" or "<"
    recall: float  # held-out
    precision: float  # held-out, at the held-out class balance
    fpr: float  # held-out
    train_recall: float
    train_fpr: float
    score: str = "cast"  # one of SCORES


def _check_score(score: str) -> str:
    if score not in SCORES:
        raise SteerableError(f"unknown condition score {score!r}: use one of {', '.join(SCORES)}")
    return score


def available_scores(ds: DirectionSet) -> list[str]:
    """The condition scores this artifact has per-fold percentiles for."""
    return [s for s, t in zip(SCORES, (ds.cast_percentiles, ds.projection_percentiles), strict=True) if t is not None]


def _require_percentiles(ds: DirectionSet, score: str = "cast") -> torch.Tensor:
    t = ds.cast_percentiles if _check_score(score) == "cast" else ds.projection_percentiles
    if t is None:
        name = "cast_percentiles" if score == "cast" else "projection_percentiles"
        raise SteerableError(
            f"this direction set has no {score} score percentiles ({name}), which choosing a condition needs: "
            "recalibrate with this version of steerable"
        )
    return t


def _curves(ds: DirectionSet, layer: int, score: str = "cast") -> list[list[list[float]]]:
    """[fold][class] → the 101 percentiles of the condition score at `layer`, as Python floats."""
    return _require_percentiles(ds, score)[ds.row(layer)].double().tolist()


def _quantile(q: list[float], p: float) -> float:
    """The score at percentile p ∈ [0, 100], interpolating linearly between the stored integer percentiles."""
    lo = min(math.floor(p), 99)
    return q[lo] + (p - lo) * (q[lo + 1] - q[lo])


def _cdf(q: list[float], x: float) -> float:
    """Fraction of the class with score ≤ x: the piecewise-linear CDF through the 101 percentiles."""
    if math.isnan(x) or any(math.isnan(v) for v in q):
        return math.nan
    i = bisect_right(q, x)  # percentile points ≤ x; ties make the CDF jump, as a point mass should
    if i == 0:
        return 0.0
    if i == len(q):
        return 1.0
    return (i - 1 + (x - q[i - 1]) / (q[i] - q[i - 1])) / (len(q) - 1)


def _rates(fold: list[list[float]], threshold: float, compare: str) -> tuple[float, float]:
    """(recall, false-positive rate) of the rule `score compare threshold` on one fold's curves."""
    below_pos, below_neg = _cdf(fold[POS], threshold), _cdf(fold[NEG], threshold)
    if compare == ">":
        return 1 - below_pos, 1 - below_neg
    return below_pos, below_neg


def _heldout_counts(ds: DirectionSet) -> tuple[float, float]:
    """Held-out class sizes for precision; equal classes when the artifact does not record them."""
    counts = ds.meta.get("counts") or {}
    n_pos, n_neg = counts.get("heldout_pos"), counts.get("heldout_neg")
    if not n_pos or not n_neg:
        return 1.0, 1.0
    return float(n_pos), float(n_neg)


def _precision(recall: float, fpr: float, n_pos: float, n_neg: float) -> float:
    flagged = recall * n_pos + fpr * n_neg
    return recall * n_pos / flagged if flagged > 0 else math.nan


def heldout_rates(ds: DirectionSet, layer: int, threshold: float, compare: str,
                  score: str = "cast") -> tuple[float, float, float]:
    """Held-out (precision, recall, FPR) of the condition `score compare threshold` at `layer`.

    NaN when the held-out fold had no samples of a class (or, for precision, nothing is flagged).
    """
    if compare not in COMPARES:
        raise SteerableError(f"compare must be one of {COMPARES}, got {compare!r}")
    recall, fpr = _rates(_curves(ds, layer, score)[HELDOUT], float(threshold), compare)
    return _precision(recall, fpr, *_heldout_counts(ds)), recall, fpr


def _f1(precision: float, recall: float) -> float:
    if math.isnan(precision) or math.isnan(recall):
        return 0.0 if recall == 0 else math.nan
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _candidate(
    ds: DirectionSet, layer: int, threshold: float | None, recall_target: float, score: str = "cast"
) -> tuple[CastChoice, float, float]:
    """One layer's choice, with its held-out F1 and normalised train gap (the ranking keys)."""
    train, held = _curves(ds, layer, score)
    pos, neg = train[POS], train[NEG]
    compare = ">" if pos[50] > neg[50] else "<"
    hi, lo = 100 * recall_target, 100 * (1 - recall_target)
    if compare == ">":  # positives above: keep recall_target of them, let 1 − recall_target negatives through
        t_rec, t_neg = _quantile(pos, lo), _quantile(neg, hi)
        gap = t_rec - t_neg
    else:
        t_rec, t_neg = _quantile(pos, hi), _quantile(neg, lo)
        gap = t_neg - t_rec
    if threshold is None:
        threshold = (t_rec + t_neg) / 2 if gap > 0 else t_rec
    spread = max(_quantile(pos, 95), _quantile(neg, 95)) - min(_quantile(pos, 5), _quantile(neg, 5))
    recall, fpr = _rates(held, threshold, compare)
    train_recall, train_fpr = _rates(train, threshold, compare)
    precision = _precision(recall, fpr, *_heldout_counts(ds))
    choice = CastChoice(layer, float(threshold), compare, recall, precision, fpr, train_recall, train_fpr, score)
    return choice, _f1(precision, recall), gap / max(spread, 1e-12)


def choose_cast(
    ds: DirectionSet, layer: int | None = None, threshold: float | None = None, recall_target: float = 0.95,
    score: str = "cast",
) -> CastChoice:
    """Pick the CAST condition layer, threshold and comparison from the artifact's percentile curves.

    Per candidate layer (every calibrated layer, or only `layer`), on the TRAIN percentiles:
    - compare = ">" if the positive class's median score is above the negative's, else "<";
    - t_rec = the score keeping `recall_target` of the positives (their (1 − recall_target) quantile for
      ">"), t_neg = the score letting 1 − recall_target of the negatives through (their recall_target
      quantile for ">"); "<" mirrors both;
    - if the classes leave a gap (t_neg below t_rec for ">"), threshold = the gap's midpoint, else t_rec.
      Maximum margin on purpose: calibration prompts separate far more easily than real traffic, and a
      threshold at the positives' edge misses shifted positives (a max-F1 threshold caught only 68 % of
      unseen harmful prompts in a prototype). A given `threshold` replaces this step.
    Held-out recall and FPR at that threshold come from the held-out percentile curves (piecewise-linear
    CDF), precision from them and the held-out class counts. The layer with the highest held-out F1 wins;
    ties go to the larger gap / (span of both classes' train p5..p95), then to the lower layer.

    `score` is "cast", "projection" (the signed h·ĉ: it knows which side of the condition direction h lies on,
    so its comparison cannot flip between layers) or "auto": both scores are candidates, and those whose
    held-out recall meets `recall_target` rank first, then by held-out F1 as above (a given `threshold` is in
    one score's units, so "auto" needs threshold None).
    """
    if not 0 < recall_target < 1:
        raise SteerableError(f"recall_target must be in (0, 1), got {recall_target}")
    if score == "auto" and threshold is not None:
        raise SteerableError("score \"auto\" chooses the threshold too: give a score with a numeric threshold")
    scores = available_scores(ds) if score == "auto" else [_check_score(score)]
    for s in scores:
        _require_percentiles(ds, s)
    if not scores:
        _require_percentiles(ds)
    layers = [layer] if layer is not None else ds.layers
    if layer is not None:
        ds.row(layer)  # names the calibrated layers if `layer` is not one
    scored = [_candidate(ds, x, threshold, recall_target, s) for s in scores for x in layers
              if all(not math.isnan(v) for c in _curves(ds, x, s)[TRAIN] for v in c)]
    if not scored:
        raise SteerableError(f"no condition score percentiles on the training fold for layer(s) {layers}")

    def rank(item: tuple[CastChoice, float, float]) -> tuple[int, float, float, int, int]:
        choice, f1, gap = item
        misses = int(score == "auto" and not choice.recall >= recall_target)
        return (misses, -f1 if not math.isnan(f1) else math.inf, -gap, choice.layer, SCORES.index(choice.score))
    return min(scored, key=rank)[0]
