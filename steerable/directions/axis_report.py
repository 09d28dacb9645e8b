"""How much to trust an Assistant Axis: the estimators' agreement per layer, and their stability across
bootstrap resamples and calibration sizes (seed 000, experiment 1, on a real model)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from steerable.directions.axis import AXIS_ESTIMATORS, AxisData


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


def _summary(values: Sequence[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "p5": float(t.quantile(0.05)), "min": float(t.min()), "n": len(values)}


def _train_by_persona(data: AxisData) -> tuple[dict[str, list[int]], list[int]]:
    train = ~data.heldout
    roles: dict[str, list[int]] = {}
    for i, r in enumerate(data.rows):
        if bool(train[i]) and r.kind == "role":
            roles.setdefault(str(r.persona), []).append(i)
    asst = [i for i, r in enumerate(data.rows) if bool(train[i]) and r.kind == "assistant"]
    return roles, asst


def layer_agreement(data: AxisData, estimators: Sequence[str] = AXIS_ESTIMATORS,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Per layer: each pair of estimators' cosine (all fitted on the training questions)."""
    out = []
    for layer in tqdm(data.layers, desc="estimators per layer", disable=not progress, leave=False):
        fits = {e: data.fit(e, layer).direction for e in estimators}
        out.append({"layer": layer, "cosine": {f"{a}|{b}": round(_cos(fits[a], fits[b]), 4)
                                               for a, b in itertools.combinations(estimators, 2)}})
    return out


def stability(data: AxisData, layer: int, *, estimators: Sequence[str] = AXIS_ESTIMATORS, bootstrap: int = 20,
              sizes: Sequence[int] = (2, 4, 8, 16), repeats: int = 5, seed: int = 0,
              progress: bool = True) -> dict[str, Any]:
    """At `layer`, per estimator: cosine of the full-data direction with (a) fits on bootstrap resamples
    (personas and Assistant answers drawn with replacement) and (b) fits on k randomly chosen personas with
    the Assistant answers to the questions those personas answered."""
    gen = torch.Generator().manual_seed(seed)
    roles, asst = _train_by_persona(data)
    names = sorted(roles)
    full = {e: data.fit(e, layer).direction for e in estimators}
    boot: dict[str, list[float]] = {e: [] for e in estimators}
    bar = tqdm(total=bootstrap + repeats * len(sizes), desc=f"axis stability @ layer {layer}", disable=not progress,
               leave=False)
    for _ in range(bootstrap):
        pick = torch.randint(len(names), (len(names),), generator=gen).tolist()
        idx = [i for p in pick for i in roles[names[p]]]
        idx += [asst[j] for j in torch.randint(len(asst), (len(asst),), generator=gen).tolist()]
        for e in estimators:
            boot[e].append(_cos(data.fit(e, layer, torch.tensor(idx)).direction, full[e]))
        bar.update()
    by_size: dict[str, dict[str, dict[str, float]]] = {e: {} for e in estimators}
    for k in [k for k in sizes if k < len(names)] + [len(names)]:
        vals: dict[str, list[float]] = {e: [] for e in estimators}
        for _ in range(repeats if k < len(names) else 1):
            chosen = [names[j] for j in torch.randperm(len(names), generator=gen)[:k].tolist()]
            idx = [i for p in chosen for i in roles[p]]
            answered = {data.rows[i].question_id for i in idx}
            idx += [i for i in asst if data.rows[i].question_id in answered]
            for e in estimators:
                vals[e].append(_cos(data.fit(e, layer, torch.tensor(idx)).direction, full[e]))
            bar.update()
        for e in estimators:
            by_size[e][str(k)] = _summary(vals[e])
    bar.close()
    return {"layer": layer, "bootstrap": {e: _summary(v) for e, v in boot.items()}, "sizes": by_size,
            "n_personas": len(names), "n_assistant": len(asst)}
