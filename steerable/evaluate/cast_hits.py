"""How a CAST condition decides on real prompts: the rows it fires on, and precision/recall on labelled sets
(overall, or per named source of prompts: what `steerable generate` reports for a conditional plan)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from steerable.errors import PlanError
from steerable.models.batch import PromptBatch
from steerable.models.load import Messages, ModelHandle
from steerable.steering.hooks import steer
from steerable.steering.plan import build_plan, build_row_plans


@torch.inference_mode()
def cast_hits(handle: ModelHandle, plan: Any, prompts: Sequence[str | Messages], *, batch_size: int = 16,
                   system: str | None = None) -> list[bool]:
    """For each prompt, whether the first condition of `plan` (a conditional plan) holds."""
    checked = build_plan(plan, handle)
    conds = [c for iv in checked.interventions for c in iv.conditions]
    if not conds:
        raise PlanError("the plan has no condition")
    out: list[bool] = []
    for start in range(0, len(prompts), batch_size):
        batch = PromptBatch.encode(handle, prompts[start : start + batch_size], system)
        with steer(handle, checked, batch=batch) as session:
            handle.model(**batch.inputs())  # the positions generate() uses, so decisions match generation
            out += session.decisions[conds[0]].flatten().bool().tolist()
    return out


def hit_rates(hits_pos: Sequence[bool], hits_neg: Sequence[bool]) -> dict[str, float | int]:
    tp, fp = sum(hits_pos), sum(hits_neg)
    return {"recall": tp / max(len(hits_pos), 1), "precision": tp / max(tp + fp, 1),
            "fpr": fp / max(len(hits_neg), 1), "n_pos": len(hits_pos), "n_neg": len(hits_neg)}


@torch.inference_mode()
def rows_fired(handle: ModelHandle, plans: Sequence[Any], prompts: Sequence[str | Messages], *,
               batch_size: int = 16, system: str | None = None) -> list[bool | None]:
    """Per prompt, whether the first condition of its own plan holds (None: its plan has no condition), from
    one pass over the prompts under the rows' plans, at the positions `generate` decides at."""
    if len(plans) != len(prompts):
        raise PlanError(f"{len(plans)} plans for {len(prompts)} prompts")
    checked = build_row_plans(handle, plans)
    firsts = [next((c for iv in p.interventions for c in iv.conditions), None) if p else None for p in checked]
    out: list[bool | None] = [None] * len(prompts)
    gated = [i for i, c in enumerate(firsts) if c is not None]
    for start in range(0, len(gated), batch_size):
        rows = gated[start : start + batch_size]
        batch = PromptBatch.encode(handle, [prompts[i] for i in rows], system)
        with steer(handle, rows=[checked[i] for i in rows], batch=batch) as session:
            handle.model(**batch.inputs())
            for j, i in enumerate(rows):
                out[i] = bool(session.decisions[firsts[i]][j].item())  # type: ignore[index]
    return out


def fired_by_source(fired: Sequence[bool | None], sources: Sequence[str | None],
                    classes: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per source name, how often the condition fired on its rows that have one: `n`, `fired`, `rate`, and,
    where `classes` names the source "positive" (the condition should fire: the rate is its recall) or
    "negative" (it should not: the rate is its false-positive rate), `class` and `measures`. Rows without a
    condition are left out; rows without a source count under "(none)"."""
    out: dict[str, dict[str, Any]] = {}
    for hit, src in zip(fired, sources, strict=True):
        if hit is None:
            continue
        row = out.setdefault(src if src is not None else "(none)", {"n": 0, "fired": 0})
        row["n"] += 1
        row["fired"] += int(hit)
    for name, row in out.items():
        row["rate"] = row["fired"] / row["n"]
        cls = (classes or {}).get(name)
        if cls in ("positive", "negative"):
            row.update({"class": cls, "measures": "recall" if cls == "positive" else "fpr"})
    return out
