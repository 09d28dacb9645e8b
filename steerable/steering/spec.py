"""The spec every steering method shares, and how a method declares its own keys.

Each method is one frozen dataclass subclassing `Intervention` (steering/methods/): its plan keys are its
fields marked with `plan_key(...)` (help text, parser, JSON form, whether required), next to the maths
that turns them into per-layer parameters (`prepare`) and the op that runs per forward pass (`apply`).
The validator (steering/plan.py) picks the class by the plan's `"method"`, the way PEFT picks a config
class by its type key, and rejects any key the class does not declare. The keys every method takes —
vector, method, strength, layers, gate, direction, site — are `COMMON_KEYS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from steerable.directions.artifact import DirectionSet
from steerable.directions.geometry import global_direction
from steerable.errors import PlanError
from steerable.steering.gates import Gate
from steerable.steering.values import Percentile, Thresholds, direction_flag, threshold_flag, threshold_json

if TYPE_CHECKING:
    from steerable.steering.cast import CastCondition

Params = dict[str, torch.Tensor]

#: keys every method takes, with their help text (docs/plans.md and the CLI flags are checked against these)
COMMON_KEYS: dict[str, str] = {
    "vector": "direction file path or library name, an in-memory DirectionSet, or a list of them (multi-direction cap)",
    "method": "the intervention (default add)",
    "strength": "α: how much of the method's update to apply; 0 is the identity for every method (default 1)",
    "layers": '"A-B", "A,B,C", "all", "discriminative", "top:K", "top-d:K", an int or a list of ints',
    "gate": '"all", "prompt", "generated", "first:K", "assistant", "turns>=k", or several joined by "+"',
    "direction": '"per-layer", "global" or a layer index: which calibrated direction each steered layer uses',
    "site": "hook site to write at (default: the artifact's), or a list of sites (one intervention each)",
}


@dataclass(frozen=True)
class KeyInfo:
    """What a method-specific plan key is: how to read it from JSON and write it back."""

    help: str
    parse: Callable[[str, Any], Any]
    to_json: Callable[[Any], Any] = lambda v: v
    required: bool = False
    flag: Callable[[str], Any] = float  # reads the value of the CLI flag --key-name


def plan_key(default: Any, help: str, parse: Callable[[str, Any], Any], *, to_json: Callable[[Any], Any] | None = None,
             required: bool = False, flag: Callable[[str], Any] = float) -> Any:
    """A dataclass field that is also a plan key of its method."""
    info = KeyInfo(help, parse, to_json or (lambda v: v), required, flag)
    return field(default=default, metadata={"plan_key": info})


def threshold_key(help: str, parse: Callable[[str, Any], Any]) -> Any:
    return plan_key(None, help, parse, to_json=threshold_json, flag=threshold_flag)


#: how CLI flags of the common keys read their text
COMMON_FLAGS: dict[str, Callable[[str], Any]] = {"strength": float, "layers": str, "gate": str,
                                                  "direction": direction_flag, "site": str}


@dataclass(frozen=True, eq=False)
class Intervention:
    """One checked intervention: a method applied with a direction set on some layers.

    Subclasses set the class attributes and add their own keys as `plan_key` fields.
    """

    method: ClassVar[str]
    summary: ClassVar[str]
    knob: ClassVar[str] = "strength"  # the key a sweep's dose-response is drawn against
    default_layers: ClassVar[str] = "all"
    default_direction: ClassVar[str] = "per-layer"
    multi_vector: ClassVar[bool] = False  # accepts a list of vectors

    vectors: DirectionSet = field(repr=False)
    layers: tuple[int, ...] = ()
    strength: float = 1.0
    direction: str | int = "per-layer"
    vector_name: str | list[str] = ""
    gate: Gate = field(default_factory=Gate)
    site_override: str | None = None
    more_vectors: tuple[DirectionSet, ...] = field(default=(), repr=False)
    conditions: tuple[CastCondition, ...] = ()

    # -- the method's keys -------------------------------------------------------------------------

    @classmethod
    def options(cls) -> dict[str, KeyInfo]:
        """This method's own plan keys (beyond COMMON_KEYS), in declaration order."""
        return {f.name: f.metadata["plan_key"] for f in dataclasses.fields(cls) if "plan_key" in f.metadata}

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return (*COMMON_KEYS, *cls.options())

    @classmethod
    def parse_options(cls, entry: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for name, info in cls.options().items():
            if info.required and entry.get(name) is None:
                raise PlanError(f"method {cls.method} needs \"{name}\" ({info.help})")
            out[name] = info.parse(name, entry.get(name))
        return out

    # -- what a method defines -----------------------------------------------------------------------

    def prepare(self, layer: int) -> Params:
        """Float32 parameters for `layer`, computed once per plan: [k, d] matrices and [k] numbers."""
        raise NotImplementedError

    @classmethod
    def apply(cls, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        """The op, per forward pass: h' from h, the token gate (None: every token) and the parameters."""
        raise NotImplementedError

    def validate(self) -> None:
        """Method-specific checks beyond parsing (e.g. a cap needs a bound)."""

    # -- geometry shared by the methods ----------------------------------------------------------------

    @property
    def site(self) -> str:
        return self.site_override or str(self.vectors.meta.get("site", "resid_post"))

    def source_layer(self, layer: int) -> int:
        """The calibrated layer whose direction steers `layer`."""
        if self.direction == "per-layer":
            return layer
        if self.direction == "global":
            return global_direction(self.vectors)[1]
        return int(self.direction)

    def unit_direction(self, layer: int) -> torch.Tensor:
        return self.vectors.direction(self.source_layer(layer))

    def percentile_value(self, ds: DirectionSet, layer: int, t: Percentile, name: str) -> float:
        """A percentile threshold in projection units: the steered layer's own calibration percentile."""
        src = self.source_layer(layer)
        if src != layer and layer in ds.layers and not torch.allclose(ds.direction(layer), ds.direction(src)):
            raise PlanError(
                f"{name} {t} is a percentile of layer {layer}'s own projections; it does not apply to the direction "
                f"of layer {src} (use direction \"per-layer\" or a number)")
        if src not in ds.layers and layer not in ds.layers:
            raise PlanError(f"{name} {t}: layer {layer} was not calibrated")
        value = ds.percentile(layer if layer in ds.layers else src, t.cls, t.q)
        if value != value:  # NaN: the artifact has no calibration projections (an imported control vector)
            raise PlanError(f"{name} {t}: this direction set has no calibration percentiles (an imported control "
                            "vector?); give a number")
        return value

    def threshold_value(self, ds: DirectionSet, layer: int, t: Thresholds | None, name: str,
                        i: int = 0) -> float | None:
        """Direction `i`'s threshold at `layer` in projection units (None when not set)."""
        if isinstance(t, tuple):  # one per direction
            n = 1 + len(self.more_vectors)
            if len(t) != n:
                raise PlanError(f"{name} has {len(t)} values for {n} directions")
            t = t[i]
        if t is None or isinstance(t, float):
            return t
        return self.percentile_value(ds, layer, t, name)

    # -- checks and JSON --------------------------------------------------------------------------------

    def check(self) -> None:
        """Compile every layer once, so a bad plan fails before any forward pass."""
        if not self.layers:
            raise PlanError(f"no layers to steer ({self.method} on {self.vector_name})")
        self.validate()
        for layer in self.layers:
            for name, t in self.prepare(layer).items():
                if name not in ("lo", "hi") and not bool(torch.isfinite(t).all()):
                    raise PlanError(f"{self.method} at layer {layer}: {name} is not finite")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vector": self.vector_name, "method": self.method, "strength": self.strength,
                               "layers": list(self.layers), "direction": self.direction, "gate": self.gate.spec}
        for name, info in self.options().items():
            value = info.to_json(getattr(self, name))
            if value is not None:
                out[name] = value
        if self.site_override is not None:
            out["site"] = self.site_override
        return out
