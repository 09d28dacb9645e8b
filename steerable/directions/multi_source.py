"""A CAST condition fitted on several sources per class and chosen by leave-one-source-out validation.

A condition calibrated on one harmful set (advbench vs benign) places its threshold at that set's margin and
fires on only part of other harmful distributions. Here every candidate (score × layer) is validated the way
real traffic tests it: for each source in turn, the direction and the threshold are fitted without it and its
recall (a harmful source) or false-positive rate (a benign one) is measured on all of its prompts. The
candidate whose worst held-out source still meets the targets (recall ≥ `min_recall`, FPR ≤ `max_fpr`) wins;
among those, or failing that among all, the one with the best mean balanced accuracy over held-out sources.

The direction is the source-balanced mean difference (every source weighs the same, whatever its size), or
(estimator "logistic") an L2 logistic probe whose rows are weighted the same way, read at the last prompt
token, where a condition reads it. The threshold lets at most `max_fpr` of every fitted
benign source through (rule "fpr", the default: over-refusal is what users notice), or follows
cast_calibration's max-margin rule at the recall target (rule "margin"). Candidates meeting both targets on
every held-out source rank first; then those meeting the false-positive budget, by their worst held-out
recall; then the rest by balanced accuracy. The artifact records the choice and the
leave-one-source-out table in `meta["condition"]`; a conditional plan with layer and threshold "auto" uses it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerable.capture.features import prompt_features
from steerable.directions.artifact import DirectionSet
from steerable.directions.calibrate import artifact_meta
from steerable.directions.cast_calibration import SCORES
from steerable.directions.quality import auroc, cast_score, cohens_d, percentiles
from steerable.errors import DataError
from steerable.models.load import ModelHandle

HELDOUT_EVERY = 5  # prompt k of a source is in the held-out fold when k % 5 == 4 (quality statistics)
ESTIMATORS = ("mean-diff", "logistic")
RULES = ("fpr", "margin")


@dataclass(frozen=True)
class Source:
    name: str
    label: int  # 1: the condition should fire (e.g. harmful), 0: it should not
    prompts: Sequence[Any]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


def _balanced_direction(x: torch.Tensor, groups: list[torch.Tensor], labels: list[int]) -> torch.Tensor:
    """mean over positive sources of their means − the same over negative sources, as a unit vector."""
    pos = torch.stack([x[g].mean(0) for g, y in zip(groups, labels, strict=True) if y == 1]).mean(0)
    neg = torch.stack([x[g].mean(0) for g, y in zip(groups, labels, strict=True) if y == 0]).mean(0)
    return _unit(pos - neg)


def _weights(groups: list[torch.Tensor], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, labels, weights): every class weighs the same, and within it every source."""
    per_class = {y: sum(1 for v in labels if v == y) for y in (0, 1)}
    rows = torch.cat(groups)
    y = torch.cat([torch.full((len(g),), v) for g, v in zip(groups, labels, strict=True)])
    w = torch.cat([torch.full((len(g),), 1.0 / (len(g) * per_class[v])) for g, v in zip(groups, labels, strict=True)])
    return rows, y, w * len(rows) / w.sum()


def _logistic_direction(x: torch.Tensor, groups: list[torch.Tensor], labels: list[int],
                        l2: float = 1.0) -> torch.Tensor:
    """An L2 logistic probe's weight vector (scikit-learn, lbfgs) as a unit vector toward the positive class.

    Rows are weighted so that each class and each source within it weighs the same; features are centred and
    divided by one scalar (the root of the average per-coordinate variance), so the geometry stays the raw one
    (directions/estimators.py `logistic` explains the penalty: `l2` per training row in units of that variance).
    """
    from sklearn.exceptions import ConvergenceWarning  # imported here: scikit-learn takes seconds to import
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    rows, y, w = _weights(groups, labels)
    xs = x[rows].double()
    xc = xs - xs.mean(0)
    scale = float(xc.pow(2).sum(1).mean().div(x.shape[1]).sqrt())
    if not (math.isfinite(scale) and scale > 0):
        raise DataError("logistic condition: the prompts' features have no variance")
    model = LogisticRegression(C=1.0 / (l2 * len(rows)), solver="lbfgs", tol=1e-6, max_iter=2000)
    # one BLAS thread: the fit is small, and a thread pool per fit oversubscribes the cores tenfold
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # the direction is what is used, not the optimum
        model.fit((xc / scale).numpy(), y.numpy(), sample_weight=w.numpy())
    return _unit(torch.as_tensor(model.coef_[0], dtype=torch.float64))


def _direction(x: torch.Tensor, groups: list[torch.Tensor], labels: list[int], estimator: str) -> torch.Tensor:
    if estimator == "logistic":
        return _logistic_direction(x, groups, labels)
    return _balanced_direction(x, groups, labels)


def _score(x: torch.Tensor, unit: torch.Tensor, score: str) -> torch.Tensor:
    return x @ unit if score == "projection" else cast_score(x, unit)


def _fpr_threshold(pos: torch.Tensor, negs: list[torch.Tensor], max_fpr: float) -> tuple[float, str]:
    """(threshold, compare) that lets at most `max_fpr` of *every* negative source through: the false-positive
    budget is what real traffic punishes, so it is met first and recall is whatever remains."""
    neg = torch.cat(negs)
    compare = ">" if float(pos.median()) > float(neg.median()) else "<"
    if compare == ">":
        return max(float(torch.quantile(n, 1 - max_fpr)) for n in negs), compare
    return min(float(torch.quantile(n, max_fpr)) for n in negs), compare


def _threshold(pos: torch.Tensor, neg: torch.Tensor, recall: float) -> tuple[float, str]:
    """(threshold, compare) from positive and negative scores, by cast_calibration's max-margin rule."""
    compare = ">" if float(pos.median()) > float(neg.median()) else "<"
    q = torch.tensor([1 - recall, recall], dtype=pos.dtype)
    if compare == ">":
        t_rec, t_neg = float(torch.quantile(pos, q[0])), float(torch.quantile(neg, q[1]))
        gap = t_rec - t_neg
    else:
        t_rec, t_neg = float(torch.quantile(pos, q[1])), float(torch.quantile(neg, q[0]))
        gap = t_neg - t_rec
    return ((t_rec + t_neg) / 2 if gap > 0 else t_rec), compare


def _fires(s: torch.Tensor, threshold: float, compare: str) -> torch.Tensor:
    return s > threshold if compare == ">" else s < threshold


def _fit(x: torch.Tensor, unit: torch.Tensor, groups: list[torch.Tensor], labels: list[int], score: str,
         recall: float, max_fpr: float | None) -> tuple[float, str]:
    pos = torch.cat([_score(x[g], unit, score) for g, y in zip(groups, labels, strict=True) if y == 1])
    negs = [_score(x[g], unit, score) for g, y in zip(groups, labels, strict=True) if y == 0]
    return _threshold(pos, torch.cat(negs), recall) if max_fpr is None else _fpr_threshold(pos, negs, max_fpr)


def _loso(x: torch.Tensor, groups: list[torch.Tensor], labels: list[int], names: list[str], score: str,
          recall: float, max_fpr: float | None = None, estimator: str = "mean-diff",
          units: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
    """Per source, the rate of firing on its prompts when direction and threshold are fitted without it."""
    out = {}
    for k in range(len(groups)):
        rest = [i for i in range(len(groups)) if i != k]
        if len({labels[i] for i in rest}) < 2:
            out[names[k]] = math.nan  # the last source of its class cannot be left out
            continue
        if units is not None and k in units:
            unit = units[k]
        else:
            unit = _direction(x, [groups[i] for i in rest], [labels[i] for i in rest], estimator)
            if units is not None:
                units[k] = unit  # the same direction serves both scores
        t, cmp = _fit(x, unit, [groups[i] for i in rest], [labels[i] for i in rest], score, recall, max_fpr)
        out[names[k]] = float(_fires(_score(x[groups[k]], unit, score), t, cmp).double().mean())
    return out


def calibrate_condition(handle: ModelHandle, sources: Sequence[Source], *, layers: Sequence[int] | None = None,
                        site: str = "resid_post", recall: float = 0.9, max_fpr: float = 0.1, rule: str = "fpr",
                        estimator: str = "mean-diff", batch_size: int = 16, progress: bool = True,
                        features: torch.Tensor | None = None) -> DirectionSet:
    """A condition artifact from several sources per class, with the leave-one-source-out choice in its meta.

    `rule` places each threshold: "fpr" (default) lets at most `max_fpr` of every fitted negative source
    through; "margin" is cast_calibration's max-margin rule at the `recall` target. `estimator` is the
    direction: "mean-diff" (source-balanced) or "logistic" (an L2 probe, rows weighted the same way).
    `features` ([len(layers), n prompts, d], the sources' prompts in order, as `capture.features.prompt_features`
    returns them) skips the model pass, for experiments that fit several conditions on the same prompts.
    """
    if rule not in RULES:
        raise DataError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if estimator not in ESTIMATORS:
        raise DataError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    fpr_rule = max_fpr if rule == "fpr" else None
    if not any(s.label == 1 for s in sources) or not any(s.label == 0 for s in sources):
        raise DataError("a condition needs at least one source of each class (label 1 and label 0)")
    empty = [s.name for s in sources if len(s.prompts) < HELDOUT_EVERY]
    if empty:
        raise DataError(f"sources {empty} have fewer than {HELDOUT_EVERY} prompts")
    if not 0 < recall < 1 or not 0 <= max_fpr < 1:
        raise DataError(f"recall must be in (0, 1) and max_fpr in [0, 1), got {recall}, {max_fpr}")
    layers = list(range(handle.n_layers)) if layers is None else sorted(set(layers))
    prompts = [p for s in sources for p in s.prompts]
    if features is None:
        feats = prompt_features(handle, prompts, layers, site=site, batch_size=batch_size, progress=progress)
    elif tuple(features.shape) != (len(layers), len(prompts), handle.hidden_size):
        raise DataError(f"features of shape {tuple(features.shape)} for {len(layers)} layers × {len(prompts)} "
                        f"prompts × d = {handle.hidden_size}")
    else:
        feats = features
    groups, start = [], 0
    for s in sources:
        groups.append(torch.arange(start, start + len(s.prompts)))
        start += len(s.prompts)
    labels, names = [s.label for s in sources], [s.name for s in sources]
    label = torch.tensor([s.label for s in sources for _ in s.prompts])
    held = torch.cat([torch.arange(len(s.prompts)) % HELDOUT_EVERY == HELDOUT_EVERY - 1 for s in sources])
    train_groups = [g[~held[g]] for g in groups]

    rows: list[dict[str, torch.Tensor]] = []
    table: list[dict[str, Any]] = []
    for j, layer in enumerate(layers):
        x = feats[j].double()
        unit = _direction(x, train_groups, labels, estimator)
        rows.append(_layer_stats(x, unit, label, held, train_groups, labels))
        units: dict[int, torch.Tensor] = {}
        for score in SCORES:
            rates = _loso(x, groups, labels, names, score, recall, fpr_rule, estimator, units)
            hits = [rates[n] for n, y in zip(names, labels, strict=True) if y == 1 and not math.isnan(rates[n])]
            fprs = [rates[n] for n, y in zip(names, labels, strict=True) if y == 0 and not math.isnan(rates[n])]
            table.append({"layer": layer, "score": score, "estimator": estimator, "rates": rates,
                          "min_recall": min(hits, default=math.nan), "max_fpr": max(fprs, default=math.nan),
                          "balanced": (sum(hits) / max(len(hits), 1) + 1 - sum(fprs) / max(len(fprs), 1)) / 2})

    def rank(r: dict[str, Any]) -> tuple[int, float, int]:
        # both targets met; else the false-positive budget met, most recall first; else the best balance
        if r["min_recall"] >= recall and r["max_fpr"] <= max_fpr:
            return (0, -r["balanced"], r["layer"])
        if r["max_fpr"] <= max_fpr:
            return (1, -r["min_recall"], r["layer"])
        return (2, -r["balanced"], r["layer"])
    best = min(table, key=rank)
    j = layers.index(best["layer"])
    x = feats[j].double()
    unit = rows[j]["direction"].double()
    train = torch.cat(train_groups)
    s_all = _score(x, unit, best["score"])
    threshold, compare = _fit(x, unit, train_groups, labels, best["score"], recall, fpr_rule)
    fires = _fires(s_all, threshold, compare)
    per_source = {n: {"class": "positive" if y else "negative", "n": len(g), "fires": float(fires[g].double().mean()),
                      "n_heldout": int(held[g].sum()), "heldout_fires": float(fires[g][held[g]].double().mean())}
                  for n, g, y in zip(names, groups, labels, strict=True)}
    meta = artifact_meta(handle, {"sources": [{"name": n, "label": y, "n": len(g)}
                                              for n, g, y in zip(names, groups, labels, strict=True)],
                                  "heldout_rule": f"prompt index within its source % {HELDOUT_EVERY} == "
                                                  f"{HELDOUT_EVERY - 1}"})
    meta.update(estimator=f"{estimator} (source-balanced)", site=site, position="last",
                counts={"train_pos": int((label[train] == 1).sum()), "train_neg": int((label[train] == 0).sum()),
                        "heldout_pos": int((label[held] == 1).sum()), "heldout_neg": int((label[held] == 0).sum())},
                condition={"layer": best["layer"], "score": best["score"], "estimator": estimator,
                           "compare": compare, "threshold": threshold,
                           "recall_target": recall, "max_fpr": max_fpr, "rule": rule,
                           "meets_targets": rank(best)[0] == 0, "loso": best["rates"],
                           "loso_min_recall": best["min_recall"], "loso_max_fpr": best["max_fpr"],
                           "fires_per_source": per_source,
                           "candidates": table})
    return _direction_set(layers, rows, meta)


def _layer_stats(x: torch.Tensor, unit: torch.Tensor, label: torch.Tensor, held: torch.Tensor,
                 train_groups: list[torch.Tensor], labels: list[int]) -> dict[str, torch.Tensor]:
    pos_mean = torch.stack([x[g].mean(0) for g, y in zip(train_groups, labels, strict=True) if y == 1]).mean(0)
    neg_mean = torch.stack([x[g].mean(0) for g, y in zip(train_groups, labels, strict=True) if y == 0]).mean(0)
    proj = x @ unit
    unit_x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    tr = ~held

    def fold_pct(values: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.stack([percentiles(values[f & (label == c)].float()) for c in (1, 0)])
                            for f in (tr, held)])
    return {
        "direction": unit.float(), "raw_norm": (pos_mean - neg_mean).norm().float(),
        "scale": ((pos_mean - neg_mean) @ unit).float(), "mean_pos": pos_mean.float(), "mean_neg": neg_mean.float(),
        "percentiles": torch.stack([percentiles(proj[label == 1].float()), percentiles(proj[label == 0].float())]),
        "auroc": torch.tensor(auroc(proj[held & (label == 1)].float(), proj[held & (label == 0)].float())),
        "cohens_d": torch.tensor(cohens_d(proj[held & (label == 1)].float(), proj[held & (label == 0)].float())),
        "mean_unit_pos": unit_x[tr & (label == 1)].mean(0).float(),
        "mean_unit_neg": unit_x[tr & (label == 0)].mean(0).float(),
        "cast_percentiles": fold_pct(cast_score(x, unit)), "projection_percentiles": fold_pct(proj),
    }


def _direction_set(layers: list[int], rows: list[dict[str, torch.Tensor]], meta: dict[str, Any]) -> DirectionSet:
    def stack(key: str) -> torch.Tensor:
        return torch.stack([r[key] for r in rows])
    n = len(layers)
    return DirectionSet(
        layers=layers, directions=stack("direction"), raw_norms=stack("raw_norm"), scales=stack("scale"),
        bias=torch.full((n,), math.nan), mean_pos=stack("mean_pos"), mean_neg=stack("mean_neg"),
        percentiles=stack("percentiles"), auroc=stack("auroc"), cohens_d=stack("cohens_d"),
        mean_unit_pos=stack("mean_unit_pos"), mean_unit_neg=stack("mean_unit_neg"),
        cast_percentiles=stack("cast_percentiles"), projection_percentiles=stack("projection_percentiles"),
        meta=meta)
