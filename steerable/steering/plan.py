"""The one validator: turns user input (Python objects, CLI flags, plan JSON) into a checked plan.

A plan is a JSON object, or a list of them applied in order (docs/plans.md lists every key):
    {"vector": PATH_OR_NAME | DirectionSet | [PATHS], "method": METHOD, "strength": float, …method keys…,
     "layers": "A-B"|"A,B,C"|"all"|"discriminative"|"top:K"|"top-d:K"|[ints]|int,
     "gate": GATE, "direction": "per-layer"|"global"|LAYER, "site": SITE | [SITES]}
    {"method": "conditional", "vector": CONDITION, "layer": int|"auto", "threshold": float|"auto",
     "recall": float, "compare": ">"|"<", "then": PLAN}
Each method's own keys (angle, cap_floor, threshold, …) are declared by its spec class (steering/methods/);
the validator picks the class by "method" and refuses keys it does not take.
Per-user steering (add only) names a profile library instead of a vector:
    {"method": "add", "profile": PATH_OR_NAME | ProfileLibrary, "user": USER, "composition": COMPOSITION, …}
the validator asks the library for that user's vectors (`direction_set`) and records on the intervention
whether the user was missing and got the population vector (`Add.fallback`, `SteeringPlan.profile_uses`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from steerable.capture.sites import SITES
from steerable.directions.artifact import DirectionSet, layer_ranges, load_directions
from steerable.errors import PlanError, SteerableError
from steerable.fsutil import open_regular
from steerable.steering.builders import Plan
from steerable.steering.cast import CONDITIONAL_KEYS, CastCondition, build_condition
from steerable.steering.gates import parse_gate
from steerable.steering.layer_spec import parse_layers, resolve_layers
from steerable.steering.methods import METHOD_NAMES, METHODS, Intervention
from steerable.steering.methods.add import COMPOSITIONS, MAX_USER_CHARS, profile_label
from steerable.steering.spec import COMMON_FLAGS, COMMON_KEYS
from steerable.steering.values import number

__all__ = ["CONDITIONAL_KEYS", "PLAN_KEYS", "PROFILE_KEYS", "Intervention", "ProfileResolver", "ProfileSource",
           "ProfileUse", "SteeringPlan", "build_plan", "build_row_plans", "caching_profile_resolver",
           "caching_resolver", "parse_layers", "read_plan_file", "with_user"]

#: every key some method takes (each method takes COMMON_KEYS and its own)
PLAN_KEYS: frozenset[str] = frozenset(k for cls in METHODS.values() for k in cls.keys())  # noqa: SIM118
MAX_DEPTH = 8  # nesting of lists and conditionals
MAX_ENTRIES = 256  # interventions one plan may expand to
MAX_VECTORS = 16
MAX_PLAN_BYTES = 1 << 24  # a plan file is read whole
VectorResolver = Callable[[str], DirectionSet]
#: the keys that replace "vector" for per-user steering (taken by the methods that declare them: add)
PROFILE_KEYS = ("profile", "user", "composition")


@runtime_checkable
class ProfileSource(Protocol):
    """What the validator needs of a profile library (directions/profiles.py's ProfileLibrary)."""

    def direction_set(self, user: str | None, composition: str = "personalised") -> tuple[DirectionSet, bool]: ...

    def check_model(self, handle: Any) -> None: ...


#: a profile library's name or path → the library (the server passes one that only knows its own libraries)
ProfileResolver = Callable[[str], ProfileSource]


def load_vector_file(name: str) -> DirectionSet:
    return load_directions(name)


def load_profile_file(name: str) -> ProfileSource:
    from steerable.directions.profiles import load_profiles  # loads lazily: tensors are read per user

    lib: ProfileSource = load_profiles(name)
    return lib


def caching_profile_resolver(resolve: ProfileResolver = load_profile_file) -> ProfileResolver:
    """Open each profile library once per call site (per-row plans with many users share one library)."""
    seen: dict[str, ProfileSource] = {}

    def cached(name: str) -> ProfileSource:
        if name not in seen:
            seen[name] = resolve(name)
        return seen[name]
    return cached


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


def _check_profile_keys(spec: Mapping[str, Any], cls: type[Intervention]) -> bool:
    """Whether the entry steers with a profile; refuses profile keys where they do not apply."""
    given = [k for k in PROFILE_KEYS if k in spec]
    if not given:
        return False
    takers = [name for name, c in METHODS.items() if "profile" in c.options()]
    if "profile" not in cls.options():
        raise PlanError(f"{', '.join(repr(k) for k in given)} (per-user steering from a profile library) belong(s) to "
                        f"method {', '.join(takers)}, not {cls.method}")
    if spec.get("profile") is None:
        raise PlanError(f"{', '.join(repr(k) for k in given)} need(s) \"profile\": the profile library to take the "
                        "user's vector from")
    if "vector" in spec:
        raise PlanError("give \"vector\" or \"profile\", not both: a profile library supplies the vector")
    return True


def _profile_vectors(spec: Mapping[str, Any], handle: Any, resolve: ProfileResolver
                     ) -> tuple[str, DirectionSet, dict[str, Any]]:
    """The user's vectors as a direction set, and the profile fields the intervention records."""
    ref = spec["profile"]
    if isinstance(ref, str) and ref:
        if ref.startswith("<in-memory"):
            raise PlanError(f"profile {ref!r} names an in-memory ProfileLibrary: pass the object itself, or save it "
                            "and give its path")
        lib = resolve(ref)
    elif isinstance(ref, ProfileSource):
        lib = ref
    else:
        raise PlanError("\"profile\" must be the path or name of a profile library, or a ProfileLibrary (got "
                        f"{str(ref)[:40]!r})")
    lib.check_model(handle)
    user = spec.get("user")
    if user is not None and (not isinstance(user, str) or not user or len(user) > MAX_USER_CHARS):
        raise PlanError(f"user must be a user id (a string of 1 to {MAX_USER_CHARS} characters), got "
                        f"{str(user)[:40]!r}")
    composition = spec.get("composition") or "personalised"
    if composition not in COMPOSITIONS:
        raise PlanError(f"composition must be one of {', '.join(COMPOSITIONS)}, got {str(composition)[:40]!r}")
    ds, fallback = lib.direction_set(user, composition)
    site = getattr(lib, "site", None)
    if "site" not in ds.meta and isinstance(site, str):
        ds = dataclasses.replace(ds, meta={**ds.meta, "site": site})
    ds.check_model(handle)
    name = profile_label(ref)
    assert name is not None
    return name, ds, {"profile": ref, "user": user, "composition": composition, "fallback": bool(fallback)}


def _profile_layers(spec: Mapping[str, Any], iv: Intervention, n_layers: int) -> tuple[int, ...]:
    """A profile's layers: explicit ones inside the library's (default all of them). A library has no
    calibration statistics to choose layers or a global direction by, and no vector off its layers."""
    given = spec.get("layers")
    if isinstance(given, str) and (given == "discriminative" or given.startswith("top")):
        raise PlanError(f"layers {given!r} chooses by calibration statistics, which a profile library does not have: "
                        f"give its layers ({layer_ranges(iv.vectors.layers)}) or a subset")
    if iv.direction == "global":
        raise PlanError("direction \"global\" needs calibration statistics, which a profile library does not have: "
                        "use \"per-layer\" or a layer index")
    layers = parse_layers(given, n_layers, iv.vectors.layers)
    missing = [x for x in layers if x not in iv.vectors.layers]
    if missing:
        raise PlanError(f"layer {missing[0]} is not in profile library {iv.vector_name} (its layers: "
                        f"{layer_ranges(iv.vectors.layers)})")
    return layers


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
                       conditions: tuple[CastCondition, ...] = (),
                       profiles: ProfileResolver = load_profile_file) -> Intervention:
    if not isinstance(spec, Mapping):
        raise PlanError(f"a plan entry must be a JSON object, got {type(spec).__name__}")
    cls = _method(spec)
    uses_profile = _check_profile_keys(spec, cls)
    _check_keys(spec, cls.keys(), f"method {cls.method}")
    if isinstance(spec.get("vector"), list) and len(spec["vector"]) > 1 and not cls.multi_vector:
        raise PlanError(f"several vectors are only supported by method cap, not {cls.method}")
    recorded: dict[str, Any] = {}
    if uses_profile:
        name, ds, recorded = _profile_vectors(spec, handle, profiles)
        names, sets = [name], [ds]
    else:
        names, sets = _vectors(spec, handle, resolve)
    site = spec.get("site", sets[0].meta.get("site", "resid_post"))
    if site not in SITES:
        raise PlanError(f"unknown site {str(site)[:40]!r}: use one of {', '.join(SITES)}")
    iv = cls(
        vectors=sets[0], more_vectors=tuple(sets[1:]), vector_name=names[0] if len(names) == 1 else names,
        strength=_strength(spec), direction=_direction(spec, cls, sets),
        gate=parse_gate(spec.get("gate")), site_override=spec.get("site"), conditions=conditions,
        **{**cls.parse_options(spec), **recorded},
    )
    _check_gate_counts(iv, handle)
    layers = _profile_layers(spec, iv, handle.n_layers) if uses_profile else resolve_layers(
        spec.get("layers", cls.default_layers), iv, handle.n_layers)
    iv = dataclasses.replace(iv, layers=layers)
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
           depth: int = 0, profiles: ProfileResolver = load_profile_file) -> list[Intervention]:
    if depth > MAX_DEPTH:
        raise PlanError(f"plan is nested too deeply (lists and conditionals at most {MAX_DEPTH} levels)")
    out: list[Intervention] = []
    for entry in _entries(spec):
        if isinstance(entry, list | Plan):
            out += _build(entry, handle, resolve, conditions, depth + 1, profiles)
        elif isinstance(entry, Mapping) and entry.get("method") == "conditional":
            _check_keys(entry, list(CONDITIONAL_KEYS), "a conditional")
            if "then" not in entry:
                raise PlanError("a conditional plan needs \"then\": the plan to apply when the condition holds")
            names, sets = _vectors(entry, handle, resolve)
            if len(sets) != 1:
                raise PlanError("a conditional plan takes one condition vector")
            cond = build_condition(entry, names[0], sets[0], handle)
            out += _build(entry["then"], handle, resolve, (*conditions, cond), depth + 1, profiles)
        elif isinstance(entry, Mapping) and isinstance(entry.get("site"), list):
            # one intervention per site, e.g. ablation at every residual write
            sites = entry["site"]
            if not sites or len(sites) > len(SITES):
                raise PlanError(f"site lists {len(sites)} sites; give 1 to {len(SITES)}")
            out += [build_intervention({**entry, "site": s}, handle, resolve, conditions, profiles) for s in sites]
        else:
            out.append(build_intervention(entry, handle, resolve, conditions, profiles))
        if len(out) > MAX_ENTRIES:
            raise PlanError(f"plan expands to more than {MAX_ENTRIES} interventions")
    return out


@dataclass(frozen=True)
class ProfileUse:
    """One user's steering from a profile library, as an output reports it."""

    profile: str
    user: str | None
    composition: str
    fallback: bool  # the user is not in the library (or none was given): the population vector was used

    def to_json(self) -> dict[str, Any]:
        return {"profile": self.profile, "user": self.user, "composition": self.composition,
                "fallback": self.fallback}


@dataclass(frozen=True)
class SteeringPlan:
    """Checked interventions applied in order. An empty plan steers nothing."""

    interventions: tuple[Intervention, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.interventions)

    @property
    def needs_turns(self) -> bool:
        return any(iv.gate.needs_turns for iv in self.interventions)

    @property
    def profile_uses(self) -> tuple[ProfileUse, ...]:
        """Each distinct (library, user, composition) the plan steers with, and whether the user fell back to
        the population vector (not in the library)."""
        out: dict[ProfileUse, None] = {}
        for iv in self.interventions:
            if getattr(iv, "profile", None) is not None:
                label = profile_label(iv.profile)  # type: ignore[attr-defined]
                assert label is not None
                out[ProfileUse(label, iv.user, iv.composition, bool(iv.fallback))] = None  # type: ignore[attr-defined]
        return tuple(out)

    @property
    def profile_fallback(self) -> bool | None:
        """True if some profile intervention's user was not in its library (None: the plan uses no profile)."""
        uses = self.profile_uses
        return any(u.fallback for u in uses) if uses else None

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


def build_plan(spec: Any, handle: Any, resolve: VectorResolver = load_vector_file, *,
               profiles: ProfileResolver = load_profile_file) -> SteeringPlan:
    """Validate a plan given as a Plan, Intervention, SteeringPlan, dict, list of dicts, JSON text or None.
    `resolve` turns a "vector" name into a direction set, `profiles` a "profile" name into a profile library."""
    if spec is None:
        return SteeringPlan()
    if isinstance(spec, SteeringPlan):
        for iv in spec.interventions:
            iv.vectors.check_model(handle)
        return spec
    if isinstance(spec, Intervention):
        spec.vectors.check_model(handle)
        return SteeringPlan((spec,))
    return SteeringPlan(tuple(_build(spec, handle, resolve, (), 0, profiles)))


def build_row_plans(
    handle: Any, rows: Sequence[Any], resolve: VectorResolver | None = None, *,
    profiles: ProfileResolver | None = None,
) -> list[SteeringPlan | None]:
    """One checked plan (or None) per batch row; identical specs (the same object) are checked once and
    artifacts (direction files, profile libraries) are loaded once. A row's error names the row."""
    resolve = resolve or caching_resolver(load_vector_file)
    profiles = profiles or caching_profile_resolver(load_profile_file)
    seen: dict[int, SteeringPlan | None] = {}
    out: list[SteeringPlan | None] = []
    for i, spec in enumerate(rows):
        if spec is None:
            out.append(None)
            continue
        if id(spec) not in seen:
            try:
                plan = build_plan(spec, handle, resolve, profiles=profiles)
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
    """The plan entry the steering flags describe: `values` maps each plan_flags() key to its value (None: unset).
    With a "profile" value and no vector, the entry steers with the profile (giving both is the validator's
    "vector or profile" error)."""
    spec: dict[str, Any] = {"method": values.get("method") or "add"}
    if vector is not None or values.get("profile") is None:
        spec = {"vector": vector, **spec}
    spec.update({f.key: values[f.key] for f in plan_flags() if values.get(f.key) is not None})
    return spec


def with_user(spec: Any, user: str) -> Any:
    """`spec` (plan JSON: an object, a list, conditionals) with `user` as the user of every profile entry — how
    a prompts row's "user" picks its own vector from the shared plan. An entry naming another user, or a plan
    with no profile entry, is a PlanError."""
    found = 0

    def walk(entry: Any, depth: int) -> Any:
        nonlocal found
        if depth > MAX_DEPTH:
            raise PlanError(f"plan is nested too deeply (lists and conditionals at most {MAX_DEPTH} levels)")
        if isinstance(entry, Plan):
            entry = list(entry.entries)
        if isinstance(entry, list):
            return [walk(e, depth + 1) for e in entry]
        if not isinstance(entry, Mapping):
            return entry
        if entry.get("method") == "conditional" and "then" in entry:
            return {**entry, "then": walk(entry["then"], depth + 1)}
        if entry.get("profile") is None:
            return entry
        found += 1
        if entry.get("user") not in (None, user):
            raise PlanError(f"user {user!r} conflicts with the plan's \"user\": {str(entry['user'])[:40]!r}")
        return {**entry, "user": user}

    out = walk(spec, 0)
    if not found:
        raise PlanError(f"user {user!r}: the plan steers with no profile library (give --profiles, or a plan with "
                        "\"profile\")")
    return out


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
