"""Each intervention method as a small class: what it needs from a plan, and its math (in ops.py).

`prepare` runs once when a plan is compiled (per steered layer) and returns the tensors the op
needs, already on the model's device and dtype; `apply` runs per forward pass and is O(d) per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from steerable.steering import ops

if TYPE_CHECKING:
    from steerable.steering.plan import Intervention


class Method:
    name: ClassVar[str]
    #: whether strength 0 makes it the identity (ablate has no strength)
    uses_strength: ClassVar[bool] = True

    def prepare(self, iv: Intervention, layer: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def apply(self, h: torch.Tensor, **params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Add(Method):
    """h + α·s_ℓ·v̂, where s_ℓ = (μ_P − μ_N)·v̂ at the steered layer: α = 1 moves the negative mean
    onto the positive mean along v̂ (for mean-diff, v̂·s_ℓ is the raw mean difference)."""

    name = "add"

    def prepare(self, iv: Intervention, layer: int) -> dict[str, torch.Tensor]:
        unit = iv.unit_direction(layer)
        row = iv.vectors.row(layer) if layer in iv.vectors.layers else None
        if row is not None:
            scale = float((iv.vectors.mean_pos[row] - iv.vectors.mean_neg[row]) @ unit)
        else:  # steering a layer the set was not calibrated at: use the source layer's scale
            scale = float(iv.vectors.scales[iv.vectors.row(iv.source_layer(layer))])
        return {"vector": iv.strength * scale * unit}

    def apply(self, h: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return ops.add(h, vector)


class Ablate(Method):
    """h − (h·r̂) r̂: removes the direction; strength is ignored."""

    name = "ablate"
    uses_strength = False

    def prepare(self, iv: Intervention, layer: int) -> dict[str, torch.Tensor]:
        return {"unit": iv.unit_direction(layer)}

    def apply(self, h: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return ops.ablate(h, unit)


METHODS: dict[str, Method] = {m.name: m for m in (Add(), Ablate())}
