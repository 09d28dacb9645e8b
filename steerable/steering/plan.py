"""The one validator: turns user input (Python objects, CLI flags, plan JSON) into a checked plan.

A plan is a JSON object, or a list of them applied in order (docs/plans.md lists every key):
    {"vector": PATH_OR_NAME | [PATHS], "method": METHOD, "strength": float, "angle": degrees,
     "cap_floor": float|"pNN", "cap_ceiling": float|"pNN", "threshold": float|"pNN", "target": float|"pNN",
     "layers": "A-B"|"A,B,C"|"all"|"discriminative"|"top:K"|"top-d:K"|[ints]|int,
     "gate": GATE, "direction": "per-layer"|"global"|LAYER, "site": SITE}
    {"method": "conditional", "vector": CONDITION_PATH, "layer": int|"auto", "threshold": float|"auto",
     "recall": float, "then": PLAN}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from steerable.capture.sites import SITES
from steerable.directions.artifact import DirectionSet, load_directions
from steerable.errors import SteerableError
from steerable.steering.conditions import Condition, build_condition
from steerable.steering.gates import parse_gate
from steerable.steering.intervention import Intervention, SteeringPlan, parse_threshold
from steerable.steering.layers import parse_layers, resolve_layers
from steerable.steering.methods import METHOD_NAMES, PLANE_METHODS

__all__ = ["PLAN_KEYS", "Intervention", "SteeringPlan", "build_plan", "build_row_plans", "parse_layers",
           "read_plan_file"]

PLAN_KEYS = {"vector", "method", "strength", "angle", "cap_floor", "cap_ceiling", "threshold", "target",
             "layers", "gate", "direction", "site"}
CONDITIONAL_KEYS = {"vector", "method", "layer", "threshold", "recall", "compare", "then"}
VectorResolver = Callable[[str], DirectionSet]


def number(name: str, value: Any, default: float | None) -> float | None:
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


def caching_resolver(resolve: VectorResolver = load_vector_file) -> VectorResolver:
    """Load each artifact once per call site (per-row plans often share vectors)."""
    seen: dict[str, DirectionSet] = {}

    def cached(name: str) -> DirectionSet:
        if name not in seen:
            seen[name] = resolve(name)
        return seen[name]
    return cached


def _vectors(
    spec: Mapping[str, Any], handle: Any, resolve: VectorResolver
) -> tuple[tuple[str, ...], list[DirectionSet]]:
    name = spec.get("vector")
    names = name if isinstance(name, list) else [name]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise SteerableError("plan needs \"vector\": the name or path of a direction file (or a list of them)")
    sets = [resolve(n) for n in names]
    for ds in sets:
        ds.check_model(handle)
    return tuple(names), sets


def build_intervention(spec: Mapping[str, Any], handle: Any, resolve: VectorResolver = load_vector_file,
                       conditions: tuple[Condition, ...] = ()) -> Intervention:
    if not isinstance(spec, Mapping):
        raise SteerableError(f"a plan entry must be a JSON object, got {type(spec).__name__}")
    method = spec.get("method", "add")
    if method not in METHOD_NAMES:
        raise SteerableError(f"unknown method {method!r}: use one of {', '.join(METHOD_NAMES)}")
    unknown = set(spec) - PLAN_KEYS
    if unknown:
        raise SteerableError(f"unknown plan key(s) {sorted(unknown)}: allowed keys are {sorted(PLAN_KEYS)}")
    if isinstance(spec.get("vector"), list) and len(spec["vector"]) > 1 and method != "cap":
        raise SteerableError(f"several vectors are only supported by method cap, not {method}")
    names, sets = _vectors(spec, handle, resolve)
    vectors = sets[0]
    plane_method = method in PLANE_METHODS
    direction = spec.get("direction", "global" if plane_method else "per-layer")
    is_layer = isinstance(direction, int) and not isinstance(direction, bool)
    if direction not in ("per-layer", "global") and not is_layer:
        raise SteerableError(f"direction must be \"per-layer\", \"global\" or a layer index, got {direction!r}")
    if is_layer:
        for ds in sets:
            ds.row(direction)  # must be a calibrated layer
    site = spec.get("site", vectors.meta.get("site", "resid_post"))
    if site not in SITES:
        raise SteerableError(f"unknown site {site!r}: use one of {', '.join(SITES)}")
    angle = number("angle", spec.get("angle"), None)
    if plane_method and angle is None:
        raise SteerableError(f"method {method} needs \"angle\" (degrees)")
    iv = Intervention(
        method=method, vectors=vectors, layers=(), strength=number("strength", spec.get("strength"), 1.0),
        direction=direction, vector_name=names[0] if len(names) == 1 else list(names), angle=angle,
        cap_floor=parse_threshold("cap_floor", spec.get("cap_floor")),
        cap_ceiling=parse_threshold("cap_ceiling", spec.get("cap_ceiling")),
        threshold=parse_threshold("threshold", spec.get("threshold")),
        target=parse_threshold("target", spec.get("target")),
        gate=parse_gate(spec.get("gate")), site_override=spec.get("site"), more_vectors=tuple(sets[1:]),
        conditions=conditions,
    )
    default_layers = "discriminative" if method == "rotate" else "all"
    layers = resolve_layers(spec.get("layers", default_layers), iv, handle.n_layers)
    iv = iv.with_layers(layers)
    iv.check()
    return iv


def _entries(spec: Any) -> list[Any]:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise SteerableError(f"plan is not valid JSON: {e.msg}") from e
    if isinstance(spec, list):
        if not spec:
            raise SteerableError("plan is an empty list")
        return spec
    return [spec]


def _build(spec: Any, handle: Any, resolve: VectorResolver, conditions: tuple[Condition, ...]) -> list[Intervention]:
    out: list[Intervention] = []
    for entry in _entries(spec):
        if isinstance(entry, Mapping) and entry.get("method") == "conditional":
            unknown = set(entry) - CONDITIONAL_KEYS
            if unknown:
                raise SteerableError(
                    f"unknown conditional key(s) {sorted(unknown)}: allowed keys are {sorted(CONDITIONAL_KEYS)}")
            if "then" not in entry:
                raise SteerableError("a conditional plan needs \"then\": the plan to apply when the condition holds")
            names, sets = _vectors(entry, handle, resolve)
            if len(sets) != 1:
                raise SteerableError("a conditional plan takes one condition vector")
            cond = build_condition(entry, names[0], sets[0], handle)
            out += _build(entry["then"], handle, resolve, (*conditions, cond))
        elif isinstance(entry, Mapping) and isinstance(entry.get("site"), list):
            # one intervention per site, e.g. ablation at every residual write
            if not entry["site"]:
                raise SteerableError("site is an empty list")
            out += [build_intervention({**entry, "site": s}, handle, resolve, conditions) for s in entry["site"]]
        else:
            out.append(build_intervention(entry, handle, resolve, conditions))
    return out


def build_plan(spec: Any, handle: Any, resolve: VectorResolver = load_vector_file) -> SteeringPlan:
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
    return SteeringPlan(tuple(_build(spec, handle, resolve, ())))


def build_row_plans(
    handle: Any, rows: Sequence[Any], resolve: VectorResolver | None = None
) -> list[SteeringPlan | None]:
    """One checked plan (or None) per batch row; identical specs (the same object) are checked once and
    artifacts are loaded once."""
    resolve = resolve or caching_resolver(load_vector_file)
    seen: dict[int, SteeringPlan | None] = {}
    out: list[SteeringPlan | None] = []
    for spec in rows:
        if spec is None:
            out.append(None)
            continue
        if id(spec) not in seen:
            plan = build_plan(spec, handle, resolve)
            seen[id(spec)] = plan if plan else None
        out.append(seen[id(spec)])
    return out


def read_plan_file(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SteerableError(f"no such plan file: {path}") from None
    except json.JSONDecodeError as e:
        raise SteerableError(f"{path}: plan is not valid JSON ({e.msg})") from e
