"""Methods in a (b1, b2) plane (methods.md §5): Selective Steering's rotation, SAS and AAS."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from steerable.directions.geometry import plane
from steerable.steering import ops
from steerable.steering.spec import Intervention, Params, plan_key
from steerable.steering.values import number


def _degrees(name: str, value: Any) -> float:
    x = number(name, value, None, bound=3600.0)
    assert x is not None  # required: checked before parsing
    return x


@dataclass(frozen=True, eq=False)
class PlaneMethod(Intervention):
    """A method that turns the in-plane part of h; the plane is b1 (the layer's direction) and b2."""

    knob: ClassVar[str] = "angle"
    default_direction: ClassVar[str] = "global"

    angle: float = plan_key(0.0, "degrees (θ)", _degrees, required=True)

    def plane(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(b1, b2): b1 is the direction this layer uses, b2 the set's second axis made orthogonal to it."""
        return plane(self.vectors, None if self.direction == "global" else self.source_layer(layer))


@dataclass(frozen=True, eq=False)
class Rotate(PlaneMethod):
    """Selective Steering: rotate the (b1, b2)-plane part of h by α·θ, exactly norm-preserving."""

    method: ClassVar[str] = "rotate"
    summary: ClassVar[str] = "rotate the b1/b2-plane part by θ (Selective Steering)"
    default_layers: ClassVar[str] = "discriminative"

    def prepare(self, layer: int) -> Params:
        b1, b2 = self.plane(layer)
        theta = math.radians(self.angle) * self.strength
        return {"basis": ops.plane_basis(b1, b2), "write": ops.rotation_write(b1, b2, theta)}

    @classmethod
    def apply(cls, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        return ops.rotate_plane(h, p["basis"], p["write"], gate)


@dataclass(frozen=True, eq=False)
class Angular(PlaneMethod):
    """SAS: set the in-plane angle of every token to θ (α < 1 moves part of the way)."""

    method: ClassVar[str] = "angular"
    summary: ClassVar[str] = "set the b1/b2-plane angle to θ (standard angular steering)"
    adaptive: ClassVar[bool] = False

    def prepare(self, layer: int) -> Params:
        b1, b2 = self.plane(layer)
        return {"basis": ops.plane_basis(b1, b2),
                "write": ops.angular_write(b1, b2, math.radians(self.angle), self.strength)}

    @classmethod
    def apply(cls, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        return ops.angular_plane(h, p["basis"], p["write"], gate, cls.adaptive)


@dataclass(frozen=True, eq=False)
class AngularAdaptive(Angular):
    """AAS: SAS only on tokens with h·b1 > 0."""

    method: ClassVar[str] = "angular-adaptive"
    summary: ClassVar[str] = "SAS on tokens with h·b1 > 0 (adaptive angular steering)"
    adaptive: ClassVar[bool] = True
