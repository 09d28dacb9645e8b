"""Checked interventions and plans: what a validated plan holds, and how each method's numbers are derived
from the direction artifact (scales, planes, percentile thresholds)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from steerable.directions.artifact import DirectionSet
from steerable.directions.layers import global_direction, plane
from steerable.errors import SteerableError
from steerable.steering.gates import Gate
from steerable.steering.methods import METHODS

if TYPE_CHECKING:
    from steerable.steering.conditions import Condition

#: a threshold: a number in projection units, or ("pos"|"neg", q) = the q-th percentile of that class
Threshold = float | tuple[str, float] | tuple[Any, ...] | None
_PCT = re.compile(r"^([pn])(\d+(?:\.\d+)?)$")


def parse_threshold(name: str, value: Any) -> Threshold:
    """A number, "pNN" (NN-th percentile of the positive class's calibration projections), "nNN" (of the
    negative class), or a list of those (one per direction of a multi-direction cap)."""
    if value is None:
        return None
    if isinstance(value, list):
        return tuple(parse_threshold(name, v) for v in value)
    if isinstance(value, str):
        m = _PCT.match(value.strip())
        if not m or not 0 <= float(m.group(2)) <= 100:
            raise SteerableError(f"{name} must be a number or a percentile \"pNN\"/\"nNN\" (0-100), got {value!r}")
        return ("pos" if m.group(1) == "p" else "neg", float(m.group(2)))
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SteerableError(f"{name} must be a finite number or a percentile \"pNN\", got {value!r}")
    return float(value)


def threshold_json(t: Threshold) -> Any:
    if t is None or isinstance(t, float):
        return t
    if isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str):
        q = t[1]
        return f"{'p' if t[0] == 'pos' else 'n'}{int(q) if float(q).is_integer() else q}"
    return [threshold_json(x) for x in t]


def percentile(ds: DirectionSet, layer: int, cls: str, q: float) -> float:
    """The q-th percentile of class `cls`'s projections h·v̂ at a calibrated layer (linear between integers)."""
    row = ds.percentiles[ds.row(layer), 0 if cls == "pos" else 1]
    lo = int(math.floor(q))
    hi = min(lo + 1, 100)
    frac = q - lo
    return float(row[lo] * (1 - frac) + row[hi] * frac)


@dataclass(frozen=True, eq=False)
class Intervention:
    """One checked intervention: a method applied with one direction set on some layers."""

    method: str
    vectors: DirectionSet = field(repr=False)
    layers: tuple[int, ...]
    strength: float = 1.0
    direction: str | int = "per-layer"
    vector_name: str | list[str] = ""
    angle: float | None = None
    cap_floor: Threshold = None
    cap_ceiling: Threshold = None
    threshold: Threshold = None
    target: Threshold = None
    gate: Gate = field(default_factory=Gate)
    site_override: str | None = None
    more_vectors: tuple[DirectionSet, ...] = field(default=(), repr=False)
    conditions: tuple[Condition, ...] = ()

    @property
    def site(self) -> str:
        return self.site_override or str(self.vectors.meta.get("site", "resid_post"))

    def with_layers(self, layers: tuple[int, ...]) -> Intervention:
        return dataclasses.replace(self, layers=layers)

    # -- directions --------------------------------------------------------------------------

    def source_layer(self, layer: int) -> int:
        """The calibrated layer whose direction steers `layer`."""
        if self.direction == "per-layer":
            return layer
        if self.direction == "global":
            return global_direction(self.vectors)[1]
        return int(self.direction)

    def unit_direction(self, layer: int) -> torch.Tensor:
        return self.vectors.direction(self.source_layer(layer))

    def scale(self, layer: int) -> float:
        """(μ_P − μ_N)·v̂ at `layer` if it was calibrated there, else at the source layer."""
        ds, unit = self.vectors, self.unit_direction(layer)
        if layer in ds.layers:
            r = ds.row(layer)
            return float((ds.mean_pos[r] - ds.mean_neg[r]) @ unit)
        return float(ds.scales[ds.row(self.source_layer(layer))])

    def plane(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(b1, b2): b1 is the direction this layer uses, b2 the set's second axis made orthogonal to it."""
        b1_layer = None if self.direction == "global" else self.source_layer(layer)
        return plane(self.vectors, b1_layer)

    def _own_percentile(self, ds: DirectionSet, layer: int, t: tuple[Any, ...], name: str) -> float:
        src = self.source_layer(layer)
        if src != layer and layer in ds.layers and not torch.allclose(ds.direction(layer), ds.direction(src)):
            raise SteerableError(
                f"{name} {threshold_json(t)} is a percentile of layer {layer}'s own projections; it does not apply to "
                f"the direction of layer {src} (use direction \"per-layer\" or a number)")
        if src not in ds.layers and layer not in ds.layers:
            raise SteerableError(f"{name} {threshold_json(t)}: layer {layer} was not calibrated")
        return percentile(ds, layer if layer in ds.layers else src, t[0], t[1])

    def _value(self, ds: DirectionSet, layer: int, t: Threshold, name: str, i: int) -> float | None:
        if isinstance(t, tuple) and not isinstance(t[0], str):  # one per direction
            if len(t) != 1 + len(self.more_vectors):
                raise SteerableError(f"{name} has {len(t)} values for {1 + len(self.more_vectors)} directions")
            t = t[i]
        if t is None or isinstance(t, float):
            return t
        return self._own_percentile(ds, layer, t, name)  # type: ignore[arg-type]

    def cap_axes(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Orthonormalised axes [k, d] (Gram–Schmidt in the given order) and floors/ceilings [k].

        Percentile thresholds come from each artifact's own projections, so with several directions
        they are exact for the first axis and for axes already orthogonal to the earlier ones.
        """
        axes, lo, hi = [], [], []
        for i, ds in enumerate((self.vectors, *self.more_vectors)):
            v = ds.direction(self.source_layer(layer)).double()
            for a in axes:
                v = v - (v @ a) * a
            if float(v.norm()) < 1e-6:
                raise SteerableError(f"cap direction {i} is parallel to an earlier one at layer {layer}")
            axes.append(v / v.norm())
            floor = self._value(ds, layer, self.cap_floor, "cap_floor", i)
            ceil = self._value(ds, layer, self.cap_ceiling, "cap_ceiling", i)
            if floor is not None and ceil is not None and floor > ceil:
                raise SteerableError(f"cap_floor {floor:.4g} is above cap_ceiling {ceil:.4g} at layer {layer}")
            lo.append(-math.inf if floor is None else floor)
            hi.append(math.inf if ceil is None else ceil)
        return torch.stack(axes).float(), torch.tensor(lo), torch.tensor(hi)

    def score_thresholds(self, layer: int) -> tuple[float, float, float]:
        """(bias, threshold, target) of the probe score s = h·ŵ + bias, in score units (StTP/StMP).

        Defaults: threshold = 5th percentile of the positive (aligned) class's scores, target = its median
        for StTP and the threshold itself for StMP (mirror across it).
        """
        ds = self.vectors
        src = self.source_layer(layer)
        b = float(ds.bias[ds.row(src)])
        bias = 0.0 if math.isnan(b) else b

        def score(t: Threshold, default: Threshold) -> float:
            t = default if t is None else t
            return float(t) if isinstance(t, float) else self._own_percentile(ds, layer, t, "threshold") + bias

        threshold = score(self.threshold, ("pos", 5.0))
        target = score(self.target, ("pos", 50.0) if self.method == "sttp" else self.threshold or ("pos", 5.0))
        return bias, threshold, target

    # -- checks and JSON ---------------------------------------------------------------------

    def check(self) -> None:
        """Method-specific checks; compiles every layer once so a bad plan fails before any forward pass."""
        if self.method == "cap" and self.cap_floor is None and self.cap_ceiling is None:
            raise SteerableError("method cap needs cap_floor, cap_ceiling or both")
        if not self.layers:
            raise SteerableError(f"no layers to steer ({self.method} on {self.vector_name})")
        for layer in self.layers:
            for name, t in METHODS[self.method].prepare(self, layer).items():
                if name not in ("lo", "hi") and not bool(torch.isfinite(t).all()):
                    raise SteerableError(f"{self.method} at layer {layer}: {name} is not finite")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vector": self.vector_name, "method": self.method, "strength": self.strength,
                               "layers": list(self.layers), "direction": self.direction, "gate": self.gate.spec}
        optional = {"angle": self.angle, "cap_floor": threshold_json(self.cap_floor),
                    "cap_ceiling": threshold_json(self.cap_ceiling), "threshold": threshold_json(self.threshold),
                    "target": threshold_json(self.target), "site": self.site_override}
        out.update({k: v for k, v in optional.items() if v is not None})
        return out


@dataclass(frozen=True)
class SteeringPlan:
    """Interventions applied in order. An empty plan steers nothing."""

    interventions: tuple[Intervention, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.interventions)

    @property
    def needs_turns(self) -> bool:
        return any(iv.gate.needs_turns for iv in self.interventions)

    def to_json(self) -> list[dict[str, Any]]:
        return _nest(list(self.interventions), 0)


def _nest(ivs: list[Intervention], depth: int) -> list[dict[str, Any]]:
    """Interventions back to plan JSON, re-wrapping runs that share a condition."""
    out, i = [], 0
    while i < len(ivs):
        if len(ivs[i].conditions) <= depth:
            out.append(ivs[i].to_json())
            i += 1
            continue
        cond, j = ivs[i].conditions[depth], i
        while j < len(ivs) and len(ivs[j].conditions) > depth and ivs[j].conditions[depth] is cond:
            j += 1
        out.append({**cond.to_json(), "then": _nest(ivs[i:j], depth + 1)})
        i = j
    return out
