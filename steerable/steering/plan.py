"""The one validator: turns user input (Python objects, CLI flags, plan JSON) into a checked plan.

Plan JSON (an object, or a list of objects applied in order):
    {"vector": PATH_OR_NAME, "method": "add"|"ablate", "strength": float,
     "layers": "A-B" | "A,B,C" | "all" | [ints] | int, "direction": "per-layer"|"global"|LAYER}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerable.directions.artifact import DirectionSet, load_directions
from steerable.directions.layers import global_direction
from steerable.errors import SteerableError
from steerable.steering.methods import METHODS

PLAN_KEYS = {"vector", "method", "strength", "layers", "direction"}
VectorResolver = Callable[[str], DirectionSet]


@dataclass(frozen=True)
class Intervention:
    """One checked intervention: a method applied with one direction set on some layers."""

    method: str
    vectors: DirectionSet = field(repr=False)
    layers: tuple[int, ...]
    strength: float = 1.0
    direction: str | int = "per-layer"
    vector_name: str = ""

    @property
    def site(self) -> str:
        return str(self.vectors.meta.get("site", "resid_post"))

    def source_layer(self, layer: int) -> int:
        """The calibrated layer whose direction steers `layer`."""
        if self.direction == "per-layer":
            return layer
        if self.direction == "global":
            return global_direction(self.vectors)[1]
        return int(self.direction)

    def unit_direction(self, layer: int) -> torch.Tensor:
        return self.vectors.direction(self.source_layer(layer))

    def to_json(self) -> dict[str, Any]:
        return {"vector": self.vector_name, "method": self.method, "strength": self.strength,
                "layers": list(self.layers), "direction": self.direction}


@dataclass(frozen=True)
class SteeringPlan:
    """Interventions applied in order. An empty plan steers nothing."""

    interventions: tuple[Intervention, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.interventions)

    def to_json(self) -> list[dict[str, Any]]:
        return [iv.to_json() for iv in self.interventions]


def parse_layers(spec: Any, n_layers: int, calibrated: Sequence[int]) -> tuple[int, ...]:
    """"A-B" (inclusive), "A,B,C", "all" (every calibrated layer), an int, or a list of ints."""
    if spec is None or spec == "all":
        return tuple(calibrated)
    if isinstance(spec, bool):
        raise SteerableError(f"layers must be a range, list or int, got {spec!r}")
    if isinstance(spec, int):
        out = [spec]
    elif isinstance(spec, str):
        out = []
        for part in spec.replace(" ", "").split(","):
            lo, dash, hi = part.partition("-")
            try:
                out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
            except ValueError:
                raise SteerableError(f"cannot parse layers {spec!r}: use A-B, A,B,C or all") from None
    elif isinstance(spec, list | tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
        out = list(spec)
    else:
        raise SteerableError(f"layers must be \"A-B\", \"A,B,C\", \"all\", an int or a list of ints, got {spec!r}")
    if not out:
        raise SteerableError("layers is empty")
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise SteerableError(f"layer {max(bad)} out of range: the model has layers 0-{n_layers - 1}")
    return tuple(sorted(set(out)))


def _number(name: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SteerableError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SteerableError(f"{name} must be finite, got {value!r}")
    if abs(value) > 1e6:
        raise SteerableError(f"{name} {value!r} is out of range (|{name}| ≤ 1e6)")
    return float(value)


def load_vector_file(name: str) -> DirectionSet:
    return load_directions(name)


def build_intervention(
    spec: Mapping[str, Any], handle: Any, resolve: VectorResolver = load_vector_file
) -> Intervention:
    if not isinstance(spec, Mapping):
        raise SteerableError(f"a plan entry must be a JSON object, got {type(spec).__name__}")
    unknown = set(spec) - PLAN_KEYS
    if unknown:
        raise SteerableError(f"unknown plan key(s) {sorted(unknown)}: allowed keys are {sorted(PLAN_KEYS)}")
    method = spec.get("method", "add")
    if method not in METHODS:
        raise SteerableError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    name = spec.get("vector")
    if not isinstance(name, str) or not name:
        raise SteerableError("plan needs \"vector\": the name or path of a direction file")
    vectors = resolve(name)
    vectors.check_model(handle)
    direction = spec.get("direction", "per-layer")
    is_layer = isinstance(direction, int) and not isinstance(direction, bool)
    if direction not in ("per-layer", "global") and not is_layer:
        raise SteerableError(f"direction must be \"per-layer\", \"global\" or a layer index, got {direction!r}")
    if is_layer:
        vectors.row(direction)  # must be a calibrated layer
    layers = parse_layers(spec.get("layers"), handle.n_layers, vectors.layers)
    if direction == "per-layer":
        missing = [x for x in layers if x not in vectors.layers]
        if missing:
            raise SteerableError(
                f"layer {missing[0]} has no calibrated direction in {name} (use direction \"global\" or a layer "
                "index to steer uncalibrated layers)"
            )
    strength = _number("strength", spec.get("strength"), 1.0)
    return Intervention(method, vectors, layers, strength, direction, name)


def build_plan(
    spec: Any, handle: Any, resolve: VectorResolver = load_vector_file
) -> SteeringPlan:
    """Validate a plan given as an Intervention, SteeringPlan, dict, list of dicts, JSON text or None."""
    if spec is None:
        return SteeringPlan()
    if isinstance(spec, SteeringPlan):
        for iv in spec.interventions:
            iv.vectors.check_model(handle)
        return spec
    if isinstance(spec, Intervention):
        spec.vectors.check_model(handle)
        return SteeringPlan((spec,))
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise SteerableError(f"plan is not valid JSON: {e.msg}") from e
    entries = spec if isinstance(spec, list) else [spec]
    return SteeringPlan(tuple(build_intervention(e, handle, resolve) for e in entries))


def read_plan_file(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SteerableError(f"no such plan file: {path}") from None
    except json.JSONDecodeError as e:
        raise SteerableError(f"{path}: plan is not valid JSON ({e.msg})") from e
