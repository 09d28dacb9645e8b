"""Calibration: contrastive examples → captured statistics → per-layer directions and quality."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

import torch

from steerable.capture.run import HELDOUT_EVERY, CaptureResult, capture_stats
from steerable.capture.sites import LAYER_CONVENTION
from steerable.capture.stats import LayerStats
from steerable.data.loaders import Example
from steerable.directions.artifact import DirectionSet
from steerable.directions.estimators import Estimate, get_estimator
from steerable.directions.quality import auroc, cast_score, cohens_d, percentiles
from steerable.errors import SteerableError
from steerable.models.load import ModelHandle


def _layer_entry(stats: LayerStats, est: Estimate) -> dict[str, Any]:
    v = est.direction.double()
    diff = stats.pos.mean - stats.neg.mean

    def proj(x: torch.Tensor) -> torch.Tensor:
        return (x.double() @ v).float()

    pos_all = torch.cat([stats.pos.sample.rows, stats.heldout_pos.rows])
    neg_all = torch.cat([stats.neg.sample.rows, stats.heldout_neg.rows])
    hp, hn = proj(stats.heldout_pos.rows), proj(stats.heldout_neg.rows)
    return {
        "direction": est.direction,
        "raw_norm": float(diff.norm()),
        "scale": float(diff @ v),
        "bias": est.bias,
        "mean_pos": stats.pos.mean.float(),
        "mean_neg": stats.neg.mean.float(),
        "percentiles": torch.stack([percentiles(proj(pos_all)), percentiles(proj(neg_all))]),
        "auroc": auroc(hp, hn),
        "cohens_d": cohens_d(hp, hn),
        "mean_unit_pos": stats.pos.mean_unit.float(),
        "mean_unit_neg": stats.neg.mean_unit.float(),
        "cast_percentiles": _fold_percentiles(stats, lambda x: cast_score(x, est.direction.float())),
        "projection_percentiles": _fold_percentiles(stats, lambda x: x @ est.direction.float()),
    }


def _fold_percentiles(stats: LayerStats, score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[fold (train, held-out), class (pos, neg), 101] percentiles of a condition score of the samples.

    Kept per fold so a threshold can be chosen on train and its recall/FPR estimated on held-out.
    """
    folds = ((stats.pos.sample.rows, stats.neg.sample.rows), (stats.heldout_pos.rows, stats.heldout_neg.rows))
    return torch.stack([torch.stack([percentiles(score(x.float())) for x in fold]) for fold in folds])


def directions_from_capture(
    cap: CaptureResult, estimator: str, meta: dict[str, Any],
    fit: Callable[[int, LayerStats], Estimate] | None = None,
) -> DirectionSet:
    """Per-layer directions and quality from captured statistics; `fit(layer, stats)` replaces the named
    estimator's function for estimators that need more than the statistics (the Assistant Axis's roles)."""
    fit = fit or (lambda _layer, stats: get_estimator(estimator).fn(stats))
    layers, rows, skipped = [], [], {}
    for layer in sorted(cap.stats):
        try:
            rows.append(_layer_entry(cap.stats[layer], fit(layer, cap.stats[layer])))
            layers.append(layer)
        except SteerableError as e:  # e.g. layer 0 at a fixed template token: both classes identical
            skipped[str(layer)] = str(e)
    if not layers:
        raise SteerableError(f"no layer gave a direction: {next(iter(skipped.values()))}")
    first = cap.stats[layers[0]]
    counts = {
        "train_pos": first.pos.n, "train_neg": first.neg.n,
        "heldout_pos": first.heldout_pos.seen, "heldout_neg": first.heldout_neg.seen,
    }
    return DirectionSet(
        layers=layers,
        directions=torch.stack([r["direction"] for r in rows]),
        raw_norms=torch.tensor([r["raw_norm"] for r in rows]),
        scales=torch.tensor([r["scale"] for r in rows]),
        bias=torch.tensor([r["bias"] for r in rows]),
        mean_pos=torch.stack([r["mean_pos"] for r in rows]),
        mean_neg=torch.stack([r["mean_neg"] for r in rows]),
        percentiles=torch.stack([r["percentiles"] for r in rows]),
        auroc=torch.tensor([r["auroc"] for r in rows]),
        cohens_d=torch.tensor([r["cohens_d"] for r in rows]),
        mean_unit_pos=torch.stack([r["mean_unit_pos"] for r in rows]),
        mean_unit_neg=torch.stack([r["mean_unit_neg"] for r in rows]),
        cast_percentiles=torch.stack([r["cast_percentiles"] for r in rows]),
        projection_percentiles=torch.stack([r["projection_percentiles"] for r in rows]),
        meta={**meta, "estimator": estimator, "site": cap.site, "position": cap.position,
              "layer_convention": LAYER_CONVENTION, "counts": counts,
              **({"skipped_layers": skipped} if skipped else {})},
    )


def calibrate(
    handle: ModelHandle,
    examples: Sequence[Example],
    *,
    estimator: str = "mean-diff",
    layers: Sequence[int] | None = None,
    site: str = "resid_post",
    position: str = "last",
    batch_size: int = 16,
    data: dict[str, Any] | None = None,
    progress: bool = True,
) -> DirectionSet:
    """Estimate a direction per layer; quality statistics come from a held-out 20 % of the examples."""
    est = get_estimator(estimator)
    cap = capture_stats(
        handle, examples, layers, site=site, position=position, batch_size=batch_size,
        second_moments=est.second_moments, progress=progress,
    )
    return directions_from_capture(cap, estimator, artifact_meta(handle, calibration_data(examples, data)))


def calibration_data(examples: Sequence[Example], data: dict[str, Any] | None) -> dict[str, Any]:
    """The `data` metadata of a calibrated file: what the caller names, the count and the held-out rule."""
    return {**(data or {}), "n_examples": len(examples),
            "heldout_rule": f"pair (or example) index % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1}"}


def merge_captures(parts: Sequence[CaptureResult]) -> CaptureResult:
    """One `CaptureResult` of captures of disjoint shards of a set (`capture_batches`): equal to capturing the
    whole set in one pass (counts exactly, sums up to float64 rounding, reservoirs and folds row for row)."""
    if not parts:
        raise SteerableError("no captured shards to merge")
    first = parts[0]
    stats = {layer: copy.deepcopy(st) for layer, st in first.stats.items()}
    for p in parts[1:]:
        if (p.site, p.position, sorted(p.stats)) != (first.site, first.position, sorted(first.stats)):
            raise SteerableError("cannot merge captures of different sites, positions or layers")
        for layer, st in p.stats.items():
            stats[layer].merge(st)
    return CaptureResult(stats, first.site, first.position, sum(p.n_examples for p in parts),
                         sum(p.n_tokens for p in parts))


def model_meta(handle: ModelHandle) -> dict[str, Any]:
    """The model a direction file belongs to, as its metadata records it."""
    return {"name": handle.name, "config_hash": handle.config_hash, "hidden_size": handle.hidden_size,
            "n_layers": handle.n_layers, "family": handle.layout.family}


def artifact_meta(handle: ModelHandle | dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The metadata every direction file carries: the model it belongs to (a handle, or its `model_meta`),
    its data, when and by what."""
    return {
        "model": dict(handle) if isinstance(handle, dict) else model_meta(handle),
        "data": data,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tool": "steerable",
    }
