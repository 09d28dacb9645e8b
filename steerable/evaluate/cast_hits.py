"""How a CAST condition decides on real prompts: the rows it fires on, and precision/recall on labelled sets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from steerable.errors import PlanError
from steerable.models.batch import PromptBatch
from steerable.models.load import Messages, ModelHandle
from steerable.steering.hooks import steer
from steerable.steering.plan import build_plan


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
