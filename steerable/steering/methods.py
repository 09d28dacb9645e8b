"""Each intervention method as a small class: what it takes from a checked plan, and which op runs.

`prepare` runs once per steered layer when a plan is compiled and returns float32 tensors: 2-D
[k, d] matrices (directions to read or write) and 1-D [k] numbers (thresholds). Rows of a batch
with different plans stack them along a new batch dimension ([B, k, d] and [B, 1, k]), and a row
without this method gets zeros, which every op leaves untouched. `apply` runs per forward pass.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch

from steerable.steering import ops

if TYPE_CHECKING:
    from steerable.steering.plan import Intervention

Params = dict[str, torch.Tensor]


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]

    def prepare(self, iv: Intervention, layer: int) -> Params:
        raise NotImplementedError

    def apply(self, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        raise NotImplementedError


class Add(Method):
    """h + α·s_ℓ·v̂, where s_ℓ = (μ_P − μ_N)·v̂ at the steered layer: α = 1 moves the negative mean
    onto the positive mean along v̂ (for mean-diff, v̂·s_ℓ is the raw mean difference)."""

    name = "add"
    summary = "h + α·(μP−μN)·v̂ (ActAdd / CAA)"

    def prepare(self, iv: Intervention, layer: int) -> Params:
        return {"vector": (iv.strength * iv.scale(layer) * iv.unit_direction(layer))[None]}

    def apply(self, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        return ops.add(h, p["vector"], gate)


class Ablate(Method):
    """h − α(h·r̂) r̂: α = 1 (the default) removes the direction."""

    name = "ablate"
    summary = "h − α(h·r̂)r̂ (directional ablation)"

    def prepare(self, iv: Intervention, layer: int) -> Params:
        u = iv.unit_direction(layer)[None]
        return {"unit": u, "write": iv.strength * u}

    def apply(self, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        return ops.ablate(h, p["unit"], p["write"], gate)


class Cap(Method):
    """Keep h·â inside [floor, ceiling] for one or several (orthonormalised) directions."""

    name = "cap"
    summary = "clamp h·â into [cap_floor, cap_ceiling] (activation capping)"

    def prepare(self, iv: Intervention, layer: int) -> Params:
        axes, lo, hi = iv.cap_axes(layer)
        return {"axes": axes, "write": iv.strength * axes, "lo": lo, "hi": hi}

    def apply(self, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        return ops.cap(h, p["axes"], p["lo"], p["hi"], p["write"], gate)


class Rotate(Method):
    """Selective Steering: rotate the (b1, b2)-plane part of h by α·θ, norm-preserving."""

    name = "rotate"
    summary = "rotate the b1/b2-plane part by θ (Selective Steering)"

    def prepare(self, iv: Intervention, layer: int) -> Params:
        b1, b2 = iv.plane(layer)
        theta = math.radians(iv.angle or 0.0) * iv.strength
        return {"basis": ops.plane_basis(b1, b2), "write": ops.rotation_write(b1, b2, theta)}

    def apply(self, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        return ops.rotate_plane(h, p["basis"], p["write"], gate)


class Angular(Method):
    """SAS: set the in-plane angle of every token to θ (α < 1 moves part of the way)."""

    name = "angular"
    summary = "set the b1/b2-plane angle to θ (standard angular steering)"
    adaptive: ClassVar[bool] = False

    def prepare(self, iv: Intervention, layer: int) -> Params:
        b1, b2 = iv.plane(layer)
        theta = math.radians(iv.angle or 0.0)
        return {"basis": ops.plane_basis(b1, b2), "write": ops.angular_write(b1, b2, theta, iv.strength)}

    def apply(self, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        return ops.angular_plane(h, p["basis"], p["write"], gate, self.adaptive)


class AngularAdaptive(Angular):
    """AAS: SAS only on tokens with h·b1 > 0."""

    name = "angular-adaptive"
    summary = "SAS on tokens with h·b1 > 0 (adaptive angular steering)"
    adaptive = True


class StTP(Method):
    """Tokens whose probe score s = h·ŵ + b is below `threshold` move onto `target`."""

    name = "sttp"
    summary = "move tokens with score < threshold onto target (projection-aware)"
    factor: ClassVar[float] = 1.0

    def prepare(self, iv: Intervention, layer: int) -> Params:
        u = iv.unit_direction(layer)
        bias, threshold, target = iv.score_thresholds(layer)
        num = lambda x: torch.tensor([x], dtype=torch.float32)
        return {"unit": u[None], "write": iv.strength * u[None], "bias": num(bias),
                "threshold": num(threshold), "target": num(target)}

    def apply(self, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        return ops.project_steer(h, p["unit"], p["bias"], p["threshold"], p["target"], self.factor, p["write"], gate)


class StMP(StTP):
    """Tokens whose score is below `threshold` are mirrored across `target` (default: the threshold)."""

    name = "stmp"
    summary = "mirror tokens with score < threshold across target (projection-aware)"
    factor = 2.0


METHODS: dict[str, Method] = {m.name: m for m in (Add(), Ablate(), Cap(), Rotate(), Angular(), AngularAdaptive(),
                                                    StTP(), StMP())}
PLANE_METHODS = ("rotate", "angular", "angular-adaptive")
#: every value the plan key "method" accepts (conditional wraps another plan)
METHOD_NAMES = (*METHODS, "conditional")
