"""Plans built in Python: one function per method, composed with `+`, conditioned with `.when(...)`.

    from steerable import add, cap
    plan = add(refusal, 0.8, layers="9-11") + cap(axis, floor="p25", layers="16-19")
    with steer(handle, plan):
        ...

A `Plan` is an ordered list of plan entries — the same objects a plan file holds, except that a vector
may be an in-memory `DirectionSet` (and a profile an in-memory `ProfileLibrary`) — and is checked by the one
validator when it is used. Per-user steering: `add(profile=library, user="u17", strength=8.0)`. Composition is
of plans (interventions applied in order), never algebra on directions: a direction set's percentiles
and AUROC do not survive a linear combination (`DirectionSet.combine` says which statistics it drops).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from steerable.directions.artifact import DirectionSet
from steerable.steering.methods.add import profile_label


@dataclass(frozen=True)
class Plan:
    """An ordered, unchecked plan: entries as plan JSON holds them (vectors may be DirectionSet objects)."""

    entries: tuple[Mapping[str, Any], ...]

    def __add__(self, other: Plan | Mapping[str, Any]) -> Plan:
        if isinstance(other, Plan):
            return Plan((*self.entries, *other.entries))
        if isinstance(other, Mapping):
            return Plan((*self.entries, other))
        return NotImplemented

    def __radd__(self, other: Mapping[str, Any]) -> Plan:
        if isinstance(other, Mapping):
            return Plan((other, *self.entries))
        return NotImplemented

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def when(self, condition: Any, *, layer: int | str = "auto", threshold: float | str = "auto",
             recall: float | None = None, compare: str | None = None) -> Plan:
        """This plan applied only to rows whose prompt meets a CAST condition (methods.md §5)."""
        return conditional(condition, self, layer=layer, threshold=threshold, recall=recall, compare=compare)

    def to_json(self) -> list[dict[str, Any]]:
        """The plan as JSON; in-memory direction sets and profile libraries appear by their label (their file
        path once saved)."""
        return [_json(e) for e in self.entries]


def _json(entry: Mapping[str, Any]) -> dict[str, Any]:
    def vec(v: Any) -> Any:
        if isinstance(v, DirectionSet):
            return v.label
        return [vec(x) for x in v] if isinstance(v, list) else v
    out = {k: vec(v) if k == "vector" else profile_label(v) if k == "profile" else v for k, v in entry.items()}
    then = out.get("then")
    if isinstance(then, Plan):
        out["then"] = then.to_json()
    return out


def _entry(method: str, vector: Any, **keys: Any) -> Plan:
    head = {"method": method} if vector is None and keys.get("profile") is not None else {
        "method": method, "vector": vector}
    return Plan(({**head, **{k: v for k, v in keys.items() if v is not None}},))


def add(vector: Any = None, strength: float = 1.0, *, layers: Any = None, gate: str | None = None,
        direction: str | int | None = None, site: str | list[str] | None = None, profile: Any = None,
        user: str | None = None, composition: str | None = None) -> Plan:
    """h + α·(μ_P − μ_N)·v̂ on `layers` (default: every calibrated layer). With `profile` (a profile library's
    path or a ProfileLibrary) instead of `vector`: h + α·v_u, user `user`'s vector composed by `composition`
    (default personalised; a user the library lacks gets the population vector), on the library's layers."""
    return _entry("add", vector, strength=strength, layers=layers, gate=gate, direction=direction, site=site,
                  profile=profile, user=user, composition=composition)


def ablate(vector: Any, strength: float = 1.0, *, layers: Any = None, gate: str | None = None,
           direction: str | int | None = None, site: str | list[str] | None = None) -> Plan:
    """h − α(h·r̂)r̂: remove the direction (α = 1)."""
    return _entry("ablate", vector, strength=strength, layers=layers, gate=gate, direction=direction, site=site)


def cap(vector: Any, floor: Any = None, ceiling: Any = None, *, strength: float = 1.0, layers: Any = None,
        gate: str | None = None, direction: str | int | None = None, site: str | list[str] | None = None) -> Plan:
    """Keep h·â inside [floor, ceiling]: numbers or percentiles "pNN"/"nNN" of the calibration projections."""
    return _entry("cap", vector, cap_floor=floor, cap_ceiling=ceiling, strength=strength, layers=layers, gate=gate,
                  direction=direction, site=site)


def rotate(vector: Any, angle: float, *, strength: float = 1.0, layers: Any = None, gate: str | None = None,
           direction: str | int | None = None, site: str | list[str] | None = None) -> Plan:
    """Selective Steering: rotate the (b1, b2)-plane part by θ degrees (default layers: discriminative)."""
    return _entry("rotate", vector, angle=angle, strength=strength, layers=layers, gate=gate, direction=direction,
                  site=site)


def angular(vector: Any, angle: float, *, strength: float = 1.0, layers: Any = None, gate: str | None = None,
            direction: str | int | None = None, site: str | list[str] | None = None, adaptive: bool = False) -> Plan:
    """SAS (AAS with `adaptive`): set the in-plane angle to θ degrees."""
    return _entry("angular-adaptive" if adaptive else "angular", vector, angle=angle, strength=strength, layers=layers,
                  gate=gate, direction=direction, site=site)


def sttp(vector: Any, threshold: Any = None, target: Any = None, *, strength: float = 1.0, layers: Any = None,
         gate: str | None = None, direction: str | int | None = None, site: str | list[str] | None = None,
         mirror: bool = False) -> Plan:
    """Projection-aware steering: tokens scoring below `threshold` move onto `target` (StMP with `mirror`)."""
    return _entry("stmp" if mirror else "sttp", vector, threshold=threshold, target=target, strength=strength,
                  layers=layers, gate=gate, direction=direction, site=site)


def conditional(condition: Any, then: Plan | Mapping[str, Any] | list[Any], *, layer: int | str = "auto",
                threshold: float | str = "auto", recall: float | None = None, compare: str | None = None) -> Plan:
    """CAST: apply `then` only to rows whose prompt's score on `condition` passes the threshold."""
    body = list(then.entries) if isinstance(then, Plan) else then
    return _entry("conditional", condition, layer=layer, threshold=threshold, recall=recall, compare=compare,
                  then=body)


#: builder name → the plan methods it can produce (a test checks each against the methods' specs)
BUILDERS: dict[str, tuple[str, ...]] = {
    "add": ("add",), "ablate": ("ablate",), "cap": ("cap",), "rotate": ("rotate",),
    "angular": ("angular", "angular-adaptive"), "sttp": ("sttp", "stmp"), "conditional": ("conditional",),
}

__all__ = ["BUILDERS", "Plan", "ablate", "add", "angular", "cap", "conditional", "rotate", "sttp"]
