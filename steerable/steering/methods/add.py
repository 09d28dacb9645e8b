"""add (ActAdd / CAA, methods.md §5): h + α·s_ℓ·v̂."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from steerable.steering import ops
from steerable.steering.spec import Intervention, Params


@dataclass(frozen=True, eq=False)
class Add(Intervention):
    """h + α·s_ℓ·v̂ with s_ℓ = (μ_P − μ_N)·v̂ at the steered layer: α = 1 moves the negative mean onto the
    positive mean along v̂ (for mean-diff, s_ℓ·v̂ is the raw mean difference)."""

    method: ClassVar[str] = "add"
    summary: ClassVar[str] = "h + α·(μP−μN)·v̂ (ActAdd / CAA)"

    def scale(self, layer: int) -> float:
        """(μ_P − μ_N)·v̂ at `layer` if it was calibrated there, else at the source layer."""
        ds, unit = self.vectors, self.unit_direction(layer)
        if layer in ds.layers:
            r = ds.row(layer)
            return float((ds.mean_pos[r] - ds.mean_neg[r]) @ unit)
        return float(ds.scales[ds.row(self.source_layer(layer))])

    def prepare(self, layer: int) -> Params:
        return {"vector": (self.strength * self.scale(layer) * self.unit_direction(layer))[None]}

    @classmethod
    def apply(cls, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        return ops.add(h, p["vector"], gate)
