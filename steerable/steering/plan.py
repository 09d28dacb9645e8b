"""The one validator: turns user input (Python objects, CLI flags, plan JSON) into a checked plan.

A plan is a JSON object, or a list of them applied in order (docs/plans.md lists every key):
    {"vector": PATH_OR_NAME | DirectionSet | [PATHS], "method": METHOD, "strength": float, …method keys…,
     "layers": "A-B"|"A,B,C"|"all"|"discriminative"|"top:K"|"top-d:K"|[ints]|int,
     "gate": GATE, "direction": "per-layer"|"global"|LAYER, "site": SITE | [SITES]}
    {"method": "conditional", "vector": CONDITION, "layer": int|"auto", "threshold": float|"auto",
     "recall": float, "compare": ">"|"<", "then": PLAN}
Each method's own keys (angle, cap_floor, threshold, …) are declared by its spec class (steering/methods/);
the validator picks the class by "method" and refuses keys it does not take.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerable.capture.sites import SITES
from steerable.directions.artifact import DirectionSet, load_directions
from steerable.errors import PlanError, SteerableError
from steerable.fsutil import open_regular
from steerable.steering.builders import Plan
from steerable.steering.cast import CONDITIONAL_KEYS, CastCondition, build_condition
from steerable.steering.gates import parse_gate
from steerable.steering.layer_spec import parse_layers, resolve_layers
from steerable.steering.methods import METHOD_NAMES, METHODS, Intervention
from steerable.steering.spec import COMMON_FLAGS, COMMON_KEYS
from steerable.steering.values import number

__all__ = ["CONDITIONAL_KEYS", "PLAN_KEYS", "Intervention", "SteeringPlan", "build_plan", "build_row_plans",
           "parse_layers", "read_plan_file"]

#: every key some method takes (each method takes COMMON_KEYS and its own)
PLAN_KEYS: frozenset[str] = frozenset(k for cls in METHODS.values() for k in cls.keys())  # noqa: SIM118
MAX_DEPTH = 8  # nesting of lists and conditionals
MAX_ENTRIES = 256  # interventions one plan may expand to
MAX_VECTORS = 16
MAX_PLAN_BYTES = 1 << 24  # a plan file is read whole
VectorResolver = Callable[[str], DirectionSet]


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


def _vectors(spec: Mapping[str, Any], handle: Any, resolve: VectorResolver) -> tuple[list[str], list[DirectionSet]]:
    given = spec.get("vector")
    refs = given if isinstance(given, list) else [given]
    if not refs or len(refs) > MAX_VECTORS:
        raise PlanError(f"plan \"vector\" lists {len(refs)} vectors; give 1 to {MAX_VECTORS}")
    names, sets = [], []
    for ref in refs:
        if isinstance(ref, DirectionSet):
            ds, name = ref, ref.label
        elif isinstance(ref, str) and ref:
            if ref.startswith("<in-memory"):
                raise PlanError(f"vector {ref!r} names an in-memory DirectionSet: pass the object itself, or save it "
                                "(save_directions) and give its path")
            ds, name = resolve(ref), ref
        else:
            raise PlanError("plan needs \"vector\": the name or path of a direction file, a DirectionSet, or a list "
                            f"of them (got {str(ref)[:40]!r})")
        ds.check_model(handle)
        names.append(name)
        sets.append(ds)
    return names, sets


def _direction(spec: Mapping[str, Any], cls: type[Intervention], sets: list[DirectionSet]) -> str | int:
    direction = spec.get("direction", cls.default_direction)
    is_layer = isinstance(direction, int) and not isinstance(direction, bool)
    if direction not in ("per-layer", "global") and not is_layer:
        raise PlanError(f"direction must be \"per-layer\", \"global\" or a layer index, got {str(direction)[:40]!r}")
    if is_layer:
        for ds in sets:
            ds.row(direction)  # must be a calibrated layer
    return direction


def _strength(spec: Mapping[str, Any]) -> float:
    x = number("strength", spec.get("strength"), 1.0)
    assert x is not None
    return x


def _check_gate_counts(iv: Intervention, handle: Any) -> None:
    """K of first:K and k of turns>=k cannot exceed the model's context (longer gates would never change)."""
    context = getattr(getattr(handle.model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and context > 0:
        for kind, k in iv.gate.terms:
            if kind in ("first", "turns") and k > context:
                raise PlanError(f"gate {iv.gate.spec!r}: {k} is more than the model's context of {context} tokens")


def _method(spec: Mapping[str, Any]) -> type[Intervention]:
    method = spec.get("method", "add")
    if not isinstance(method, str) or method not in METHODS:
        raise PlanError(f"unknown method {str(method)[:40]!r}: use one of {', '.join(METHOD_NAMES)}")
    return METHODS[method]


def _check_keys(spec: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    bad = [k for k in spec if not isinstance(k, str)]
    if bad:
        raise PlanError(f"plan keys must be strings, got {bad[0]!r}")
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        elsewhere = [k for k in unknown if k in PLAN_KEYS or k in CONDITIONAL_KEYS]
        note = f" ({', '.join(elsewhere)} belong(s) to other methods)" if elsewhere else ""
        raise PlanError(f"unknown plan key(s) {unknown} for {what}{note}: allowed keys are {sorted(allowed)}")


def build_intervention(spec: Mapping[str, Any], handle: Any, resolve: VectorResolver = load_vector_file,
                       conditions: tuple[CastCondition, ...] = ()) -> Intervention:
    if not isinstance(spec, Mapping):
        raise PlanError(f"a plan entry must be a JSON object, got {type(spec).__name__}")
    cls = _method(spec)
    _check_keys(spec, cls.keys(), f"method {cls.method}")
    if isinstance(spec.get("vector"), list) and len(spec["vector"]) > 1 and not cls.multi_vector:
        raise PlanError(f"several vectors are only supported by method cap, not {cls.method}")
    names, sets = _vectors(spec, handle, resolve)
    site = spec.get("site", sets[0].meta.get("site", "resid_post"))
    if site not in SITES:
        raise PlanError(f"unknown site {str(site)[:40]!r}: use one of {', '.join(SITES)}")
    iv = cls(
        vectors=sets[0], more_vectors=tuple(sets[1:]), vector_name=names[0] if len(names) == 1 else names,
        strength=_strength(spec), direction=_direction(spec, cls, sets),
        gate=parse_gate(spec.get("gate")), site_override=spec.get("site"), conditions=conditions,
        **cls.parse_options(spec),
    )
    _check_gate_counts(iv, handle)
    iv = dataclasses.replace(iv, layers=resolve_layers(spec.get("layers", cls.default_layers), iv, handle.n_layers))
    iv.check()
    return iv


def _entries(spec: Any) -> list[Any]:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e.msg}") from e
        except (RecursionError, ValueError) as e:
            raise PlanError(f"plan is not valid JSON: {str(e)[:80] or 'nested too deeply'}") from None
    if isinstance(spec, Plan):
        spec = list(spec.entries)
    if isinstance(spec, list):
        if not spec:
            raise PlanError("plan is an empty list")
        return spec
    return [spec]


def _build(spec: Any, handle: Any, resolve: VectorResolver, conditions: tuple[CastCondition, ...],
           depth: int = 0) -> list[Intervention]:
    if depth > MAX_DEPTH:
        raise PlanError(f"plan is nested too deeply (lists and conditionals at most {MAX_DEPTH} levels)")
    out: list[Intervention] = []
    for entry in _entries(spec):
        if isinstance(entry, list | Plan):
            out += _build(entry, handle, resolve, conditions, depth + 1)
        elif isinstance(entry, Mapping) and entry.get("method") == "conditional":
            _check_keys(entry, list(CONDITIONAL_KEYS), "a conditional")
            if "then" not in entry:
                raise PlanError("a conditional plan needs \"then\": the plan to apply when the condition holds")
            names, sets = _vectors(entry, handle, resolve)
            if len(sets) != 1:
                raise PlanError("a conditional plan takes one condition vector")
            cond = build_condition(entry, names[0], sets[0], handle)
            out += _build(entry["then"], handle, resolve, (*conditions, cond), depth + 1)
        elif isinstance(entry, Mapping) and isinstance(entry.get("site"), list):
            # one intervention per site, e.g. ablation at every residual write
            sites = entry["site"]
            if not sites or len(sites) > len(SITES):
                raise PlanError(f"site lists {len(sites)} sites; give 1 to {len(SITES)}")
            out += [build_intervention({**entry, "site": s}, handle, resolve, conditions) for s in sites]
        else:
            out.append(build_intervention(entry, handle, resolve, conditions))
        if len(out) > MAX_ENTRIES:
            raise PlanError(f"plan expands to more than {MAX_ENTRIES} interventions")
    return out


@dataclass(frozen=True)
class SteeringPlan:
    """Checked interventions applied in order. An empty plan steers nothing."""

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


def build_plan(spec: Any, handle: Any, resolve: VectorResolver = load_vector_file) -> SteeringPlan:
    """Validate a plan given as a Plan, Intervention, SteeringPlan, dict, list of dicts, JSON text or None."""
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
    artifacts are loaded once. A row's error names the row."""
    resolve = resolve or caching_resolver(load_vector_file)
    seen: dict[int, SteeringPlan | None] = {}
    out: list[SteeringPlan | None] = []
    for i, spec in enumerate(rows):
        if spec is None:
            out.append(None)
            continue
        if id(spec) not in seen:
            try:
                plan = build_plan(spec, handle, resolve)
            except SteerableError as e:
                if len(rows) == 1:
                    raise
                raise type(e)(f"row {i}: {e}") from None
            seen[id(spec)] = plan if plan else None
        out.append(seen[id(spec)])
    return out


@dataclass(frozen=True)
class Flag:
    """A plan key as a CLI flag: --name (dashes), how its text is read, which methods take it."""

    key: str
    help: str
    read: Callable[[str], Any]
    methods: tuple[str, ...]

    @property
    def name(self) -> str:
        return "--" + self.key.replace("_", "-")


def plan_flags() -> list[Flag]:
    """Every plan key but vector and method, as the flags `generate`, `sweep` and friends take (derived from
    the methods' specs, so a new key is a new flag)."""
    out = [Flag(k, COMMON_KEYS[k], COMMON_FLAGS[k], tuple(METHODS)) for k in COMMON_KEYS if k in COMMON_FLAGS]
    seen: dict[str, Flag] = {}
    for name, cls in METHODS.items():
        for key, info in cls.options().items():
            prev = seen.get(key)
            seen[key] = Flag(key, info.help, info.flag, (*prev.methods, name) if prev else (name,))
    return out + list(seen.values())


def plan_from_flags(values: Mapping[str, Any], vector: Any) -> dict[str, Any]:
    """The plan entry the steering flags describe: `values` maps each plan_flags() key to its value (None: unset)."""
    spec = {"vector": vector, "method": values.get("method") or "add"}
    spec.update({f.key: values[f.key] for f in plan_flags() if values.get(f.key) is not None})
    return spec


def read_plan_file(path: str | Path) -> Any:
    """The JSON of a plan file. A missing file, a directory, a FIFO (never waited on), non-UTF-8 text, invalid,
    too deeply nested or overflowing JSON is a PlanError naming the file."""
    with open_regular(path, "plan file", PlanError) as f:
        raw = f.read(MAX_PLAN_BYTES + 1)
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanError(f"{path}: plan file is larger than {MAX_PLAN_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PlanError(f"{path}: plan file is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: plan is not valid JSON ({e.msg})") from e
    except (RecursionError, ValueError) as e:
        raise PlanError(f"{path}: plan is not valid JSON ({str(e)[:80] or 'nested too deeply'})") from None
