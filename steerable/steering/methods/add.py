"""add (ActAdd / CAA, methods.md §5): h + α·s_ℓ·v̂ — with a direction set, or a user's vector from a profile
library (methods.md §7: `profile`, `user`, `composition` instead of `vector`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from steerable.errors import PlanError
from steerable.steering import ops
from steerable.steering.spec import Intervention, Params, plan_key

#: how a profile library turns a user into a vector (directions/profiles.py)
COMPOSITIONS = ("personalised", "population", "dislike_weighted")
MAX_USER_CHARS = 256


def profile_label(ref: Any) -> str | None:
    """How plans name a profile library: the name or path it was given by, else the in-memory library's path
    (or a placeholder that no resolver accepts, like an in-memory DirectionSet's label)."""
    if ref is None or isinstance(ref, str):
        return ref
    path = getattr(ref, "path", None)
    return str(path) if path else f"<in-memory ProfileLibrary {id(ref):x}>"


def _profile(name: str, value: Any) -> Any:
    if value is None or (isinstance(value, str) and value):
        return value
    if callable(getattr(value, "direction_set", None)) and callable(getattr(value, "check_model", None)):
        return value  # an in-memory ProfileLibrary
    raise PlanError(f"{name} must be the path or name of a profile library, or a ProfileLibrary, got "
                    f"{str(value)[:40]!r}")


def _user(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_USER_CHARS:
        raise PlanError(f"{name} must be a user id (a string of 1 to {MAX_USER_CHARS} characters), got "
                        f"{str(value)[:40]!r}")
    return value


def _composition(name: str, value: Any) -> str | None:
    if value is None or value in COMPOSITIONS:
        return value
    raise PlanError(f"{name} must be one of {', '.join(COMPOSITIONS)}, got {str(value)[:40]!r}")


@dataclass(frozen=True, eq=False)
class Add(Intervention):
    """h + α·s_ℓ·v̂ with s_ℓ = (μ_P − μ_N)·v̂ at the steered layer: α = 1 moves the negative mean onto the
    positive mean along v̂ (for mean-diff, s_ℓ·v̂ is the raw mean difference). With a profile, `vectors` is
    the user's composed set (s_ℓ·v̂ = the user's vector v_ℓ, so α = 1 adds v_ℓ) and `fallback` says whether
    the user was missing from the library and got the population vector."""

    method: ClassVar[str] = "add"
    summary: ClassVar[str] = "h + α·(μP−μN)·v̂ (ActAdd / CAA)"

    profile: Any = plan_key(  # noqa: RUF009 - returns a dataclasses.field
        None, "profile library (steerable users fit): a path, a library name (server) or a ProfileLibrary "
        "(Python), instead of vector", _profile, to_json=profile_label, flag=str)
    user: str | None = plan_key(
        None, "the user whose vector a profile gives (absent or not in the library: the population vector)",
        _user, flag=str)
    composition: str | None = plan_key(
        None, f"how a profile composes the user's vector: {', '.join(COMPOSITIONS)} (default personalised)",
        _composition, flag=str)
    fallback: bool | None = None  # set by the validator: the user is not in the profile library

    def scale(self, layer: int) -> float:
        """(μ_P − μ_N)·v̂ at `layer` if it was calibrated there, else at the source layer."""
        ds, unit = self.vectors, self.unit_direction(layer)
        if layer in ds.layers:
            r = ds.row(layer)
            return float((ds.mean_pos[r] - ds.mean_neg[r]) @ unit)
        return float(ds.scales[ds.row(self.source_layer(layer))])

    def prepare(self, layer: int) -> Params:
        return {"vector": (self.strength * self.scale(layer) * self.unit_direction(layer))[None]}

    @classmethod
    def apply(cls, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        return ops.add(h, p["vector"], gate)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if self.profile is not None:  # the profile stands in for the vector
            out = {"profile": out.pop("profile"), **{k: v for k, v in out.items() if k != "vector"}}
        return out
