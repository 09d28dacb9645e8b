"""cap (activation capping, methods.md §5): keep h·â inside [floor, ceiling], per (orthonormalised) direction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from steerable.errors import PlanError
from steerable.steering import ops
from steerable.steering.spec import Intervention, Params, threshold_key
from steerable.steering.values import Thresholds, parse_threshold

_BOUND = "a number (projection units), \"pNN\"/\"nNN\" (a calibration percentile), or a list (one per direction)"


@dataclass(frozen=True, eq=False)
class Cap(Intervention):
    """Floor h + max(τ − p, 0)·â, ceiling h − max(p − τ, 0)·â, or both (seed 000's band)."""

    method: ClassVar[str] = "cap"
    summary: ClassVar[str] = "clamp h·â into [cap_floor, cap_ceiling] (activation capping)"
    knob: ClassVar[str] = "cap_floor"
    multi_vector: ClassVar[bool] = True

    cap_floor: Thresholds | None = threshold_key(  # noqa: RUF009 - returns a dataclasses.field
        f"lower bound on h·â: {_BOUND}", parse_threshold)
    cap_ceiling: Thresholds | None = threshold_key(  # noqa: RUF009 - returns a dataclasses.field
        f"upper bound on h·â: {_BOUND}", parse_threshold)

    def validate(self) -> None:
        if self.cap_floor is None and self.cap_ceiling is None:
            raise PlanError("method cap needs cap_floor, cap_ceiling or both")

    def axes(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Orthonormalised axes [k, d] (Gram–Schmidt in the given order) and floors/ceilings [k].

        Percentile thresholds come from each artifact's own projections, so with several directions
        they are exact for the first axis and for axes already orthogonal to the earlier ones.
        """
        axes: list[torch.Tensor] = []
        lo, hi = [], []
        for i, ds in enumerate((self.vectors, *self.more_vectors)):
            v = ds.direction(self.source_layer(layer)).double()
            for a in axes:
                v = v - (v @ a) * a
            if float(v.norm()) < 1e-6:
                raise PlanError(f"cap direction {i} is parallel to an earlier one at layer {layer}")
            axes.append(v / v.norm())
            floor = self.threshold_value(ds, layer, self.cap_floor, "cap_floor", i)
            ceil = self.threshold_value(ds, layer, self.cap_ceiling, "cap_ceiling", i)
            if floor is not None and ceil is not None and floor > ceil:
                raise PlanError(f"cap_floor {floor:.4g} is above cap_ceiling {ceil:.4g} at layer {layer}")
            lo.append(-math.inf if floor is None else floor)
            hi.append(math.inf if ceil is None else ceil)
        return torch.stack(axes).float(), torch.tensor(lo), torch.tensor(hi)

    def prepare(self, layer: int) -> Params:
        axes, lo, hi = self.axes(layer)
        return {"axes": axes, "write": self.strength * axes, "lo": lo, "hi": hi}

    @classmethod
    def apply(cls, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        return ops.cap(h, p["axes"], p["lo"], p["hi"], p["write"], gate)
