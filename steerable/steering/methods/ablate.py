"""ablate (directional ablation, methods.md §5): h − α(h·r̂)r̂."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from steerable.steering import ops
from steerable.steering.spec import Intervention, Params


@dataclass(frozen=True, eq=False)
class Ablate(Intervention):
    """h − α(h·r̂) r̂: α = 1 (the default) removes the direction; `steerable bake` writes it into weights."""

    method: ClassVar[str] = "ablate"
    summary: ClassVar[str] = "h − α(h·r̂)r̂ (directional ablation)"

    def prepare(self, layer: int) -> Params:
        u = self.unit_direction(layer)[None]
        return {"unit": u, "write": self.strength * u}

    @classmethod
    def apply(cls, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        return ops.ablate(h, p["unit"], p["write"], gate)
