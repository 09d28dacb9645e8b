"""A sweep's grid: methods × layer choices × the knob each method turns (strength, angle or cap floor).

Each point is a `Config`; its plan is an ordinary plan dict, so whatever a sweep finds can be handed to
`generate`, the server or `tune --out` unchanged. The unsteered baseline is a config too (method "none").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from steerable.errors import PlanError, SteerableError
from steerable.steering.methods import METHODS

BASELINE = "none"
DEFAULT_STRENGTHS = {"add": (0.5, 1.0, 2.0, 4.0)}
DEFAULT_ANGLES = (90.0, 180.0, 270.0)
DEFAULT_CAP_FLOORS = ("p10", "p25", "p50")


@dataclass(frozen=True)
class Config:
    method: str
    layers: str | None = None
    strength: float | None = None
    angle: float | None = None
    cap_floor: float | str | None = None
    cap_ceiling: float | str | None = None  # with a floor: seed 000's band

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE

    @property
    def knob(self) -> str:
        """The parameter this method's dose-response is drawn against (declared by the method's spec)."""
        return "strength" if self.is_baseline else METHODS[self.method].knob

    @property
    def value(self) -> float | str | None:
        return getattr(self, self.knob)

    def plan(self, vector: str, extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The configuration's plan entry; with a "profile" in `extra` (a sweep over one user's vector from a
        profile library) the profile names the vectors, and `vector` (the library's path) is not repeated."""
        if self.is_baseline:
            return None
        head = {} if (extra or {}).get("profile") is not None else {"vector": vector}
        return {**head, **self.to_json(), **(extra or {})}

    def label(self) -> str:
        if self.is_baseline:
            return "unsteered"
        parts = [self.method, f"layers={self.layers or 'default'}"]
        if self.strength is not None and (self.knob == "strength" or self.strength != 1):
            parts.append(f"α={self.strength:g}")
        if self.angle is not None:
            parts.append(f"θ={self.angle:g}°")
        if self.cap_floor is not None and self.cap_ceiling is not None:
            parts.append(f"band=[{self.cap_floor}, {self.cap_ceiling}]")
        elif self.cap_floor is not None:
            parts.append(f"floor={self.cap_floor}")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def config_key(config: Config, context: dict[str, Any]) -> str:
    """A stable id of one configuration under one sweep setting (model, vector, prompts, lengths, …):
    a restarted sweep skips exactly the keys it finds in its output."""
    blob = json.dumps({"config": config.to_json(), "context": context}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_list(text: str | None) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()] if text else []


def layer_choices(text: str | None) -> list[str | None]:
    """Layer choices of a sweep: "8-16,discriminative" is two choices. Separate with ";" to give a choice that
    is itself a comma list ("3,5,7;top:4")."""
    if not text:
        return [None]
    parts = text.split(";") if ";" in text else text.split(",")
    return [p.strip() for p in parts if p.strip()]


def numbers(name: str, text: str | None) -> list[float]:
    out = []
    for p in split_list(text):
        try:
            out.append(float(p))
        except ValueError:
            raise SteerableError(f"--{name}: {p!r} is not a number") from None
    return out


def thresholds(text: str | None) -> list[float | str]:
    out: list[float | str] = []
    for p in split_list(text):
        try:
            out.append(float(p))
        except ValueError:
            out.append(p)  # "pNN"/"nNN": checked by the plan validator
    return out


def bands(text: str | None) -> list[tuple[float | str, float | str]]:
    """Cap bands "LO:HI" joined with commas, each bound a number or a percentile: "p10:p90,p25:p75"."""
    out = []
    for p in split_list(text):
        lo, sep, hi = p.partition(":")
        if not sep or not lo or not hi:
            raise SteerableError(f"--cap-bands: {p!r} is not LO:HI (e.g. p10:p90)")
        out.append((thresholds(lo)[0], thresholds(hi)[0]))
    return out


def expand(methods: Sequence[str], layers: Sequence[str | None], strengths: Sequence[float] = (),
           angles: Sequence[float] = (), cap_floors: Sequence[float | str] = (),
           cap_bands: Sequence[tuple[float | str, float | str]] = ()) -> list[Config]:
    """Every configuration of the grid, baseline first. A method sweeps its own knob (plane methods the angle,
    cap the floor — or, given `cap_bands`, a floor and a ceiling — the rest the strength). When every method
    of the sweep is a plane method or cap, given strengths are crossed with their knob instead (e.g. rotate by
    each angle at each α)."""
    for method in methods:
        if method not in METHODS:
            raise PlanError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    cross: list[float | None] = list(strengths) if all(METHODS[m].knob != "strength" for m in methods) else []
    out = [Config(BASELINE)]
    for method in methods:
        knob = METHODS[method].knob
        for lay in layers:
            if knob == "angle":
                for a in angles or DEFAULT_ANGLES:
                    out += [Config(method, lay, s, a) for s in (cross or [None])]
            elif knob == "cap_floor":
                pairs = [(f, None) for f in cap_floors] + list(cap_bands)
                for f, c in pairs or [(f, None) for f in DEFAULT_CAP_FLOORS]:
                    out += [Config(method, lay, s, cap_floor=f, cap_ceiling=c) for s in (cross or [None])]
            else:
                for s in strengths or DEFAULT_STRENGTHS.get(method, (1.0,)):
                    out.append(Config(method, lay, s))
    return list(dict.fromkeys(out))  # first occurrence of each, in order
