"""Which plan a request runs under: its own `steering`, a named preset, the server's default, or none.

Request field `steering`:
  absent                      → the server's default plan (unsteered if the server has none)
  null, {"preset": "none"}    → unsteered, whatever the default
  {"preset": "default"}       → the default plan, said explicitly
  {"preset": NAME}            → preset NAME (a plan file in --presets DIR)
  a plan object or list       → that plan (docs/plans.md), its vectors named from the library

Every plan, whatever its origin, is checked by `build_plan` (the one validator) against a resolver that
only knows the library; presets and the default plan are checked once, at start-up.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerable.directions.artifact import DirectionSet
from steerable.errors import SteerableError
from steerable.models.load import ModelHandle
from steerable.serve.auth import Grant
from steerable.serve.errors import ApiError, bad_request
from steerable.serve.library import SUFFIX, VectorLibrary, check_name
from steerable.steering.plan import SteeringPlan, VectorResolver, build_plan, read_plan_file

RESERVED = ("none", "default")
_PRESET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Chosen:
    """A request's plan (None: unsteered) and where it came from, reported back in the response."""

    plan: SteeringPlan | None
    source: str  # "request", "preset", "default" or "none"
    preset: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"plan": self.source}
        if self.preset is not None:
            out["preset"] = self.preset
        return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_resolver(library: VectorLibrary, origin: str) -> VectorResolver:
    """For operator files (presets, the default plan): `steerable tune` writes the vector's path, so a path
    is matched to the library by file name — and refused if a file at that path differs from the library's."""

    def resolve(name: str) -> DirectionSet:
        p = Path(name)
        stem = p.name[: -len(SUFFIX)] if p.name.endswith(SUFFIX) else p.name
        if stem not in library:
            raise SteerableError(f"{origin}: vector {name!r} is not in the vector library {library.directory} "
                                 f"(put {stem}{SUFFIX} there)")
        if p.name != name and p.is_file() and _sha256(p) != _sha256(library.path(stem)):
            raise SteerableError(f"{origin}: vector {name!r} differs from the library's {stem}{SUFFIX}")
        return library.get(stem)
    return resolve


def request_resolver(library: VectorLibrary, grant: Grant) -> VectorResolver:
    def resolve(name: str) -> DirectionSet:
        stem = check_name(name)  # 400 for anything path-like, before the grant or the library is consulted
        grant.check_vector(stem)  # 403 before existence, so a restricted key cannot probe the library
        return library.get(stem)
    return resolve


def count_entries(spec: Any, depth: int = 0) -> int:
    """Interventions a plan asks for (an upper bound), so a huge plan is refused before it is built."""
    if depth > 8:
        raise bad_request("steering: conditionals are nested too deeply (at most 8 levels)", "steering",
                          "invalid_plan")
    if isinstance(spec, list):
        return sum(count_entries(e, depth + 1) for e in spec)
    if isinstance(spec, Mapping):
        if spec.get("method") == "conditional":
            return 1 + count_entries(spec.get("then"), depth + 1)
        sites = spec.get("site")
        return len(sites) if isinstance(sites, list) else 1
    return 1


class PlanBook:
    """Presets, the default plan, and turning a request's `steering` field into a checked plan."""

    def __init__(self, handle: ModelHandle, library: VectorLibrary, presets: dict[str, SteeringPlan],
                 default: SteeringPlan | None, default_name: str | None, max_entries: int = 32) -> None:
        self.handle = handle
        self.library = library
        self.presets = presets
        self.default = default
        self.default_name = default_name
        self.max_entries = max_entries

    @classmethod
    def load(cls, handle: ModelHandle, library: VectorLibrary, presets_dir: str | Path | None,
             default_plan: str | None, max_entries: int = 32) -> PlanBook:
        presets: dict[str, SteeringPlan] = {}
        if presets_dir is not None:
            d = Path(presets_dir)
            if not d.is_dir():
                raise SteerableError(f"--presets {d}: not a directory")
            for path in sorted(d.glob("*.json")):
                name = path.stem
                if not _PRESET.fullmatch(name) or name in RESERVED:
                    raise SteerableError(f"{path}: {name!r} cannot be a preset name (reserved or odd characters)")
                presets[name] = _checked(_read(path), handle, file_resolver(library, f"preset {name}"),
                                         f"preset {name} ({path})")
        default, default_name = None, None
        if default_plan is not None:
            if Path(default_plan).is_file():
                default = _checked(_read(default_plan), handle,
                                   file_resolver(library, "default plan"), f"default plan {default_plan}")
                default_name = str(default_plan)
            elif default_plan in presets:
                default, default_name = presets[default_plan], f"preset {default_plan}"
            else:
                raise SteerableError(f"--default-plan {default_plan!r} is neither a plan file nor a preset name")
        return cls(handle, library, presets, default, default_name, max_entries)

    def choose(self, value: Any, present: bool, grant: Grant) -> Chosen:
        """The plan a request's `steering` field selects (see the module docstring)."""
        if not present:
            return Chosen(self.default, "default") if self.default is not None else Chosen(None, "none")
        if value is None:
            return Chosen(None, "none")
        if isinstance(value, Mapping) and "preset" in value:
            if set(value) != {"preset"}:
                raise bad_request("steering: {\"preset\": NAME} takes no other keys; write a plan instead",
                                  "steering", "invalid_plan")
            return self._preset(value["preset"], grant)
        if not isinstance(value, Mapping | list):
            raise bad_request(f"steering must be a plan (an object or a list of objects), {{\"preset\": NAME}} or "
                              f"null, got {type(value).__name__}", "steering", "invalid_plan")
        if count_entries(value) > self.max_entries:
            raise bad_request(f"steering: the plan has more than {self.max_entries} interventions", "steering",
                              "invalid_plan")
        try:
            plan = build_plan(value, self.handle, request_resolver(self.library, grant))
        except SteerableError as e:
            raise bad_request(f"steering: {e}", "steering", "invalid_plan") from None
        return Chosen(plan if plan else None, "request")

    def _preset(self, name: Any, grant: Grant) -> Chosen:
        if not isinstance(name, str):
            raise bad_request(f"steering.preset must be a string, got {json.dumps(name)[:40]}", "steering.preset")
        if name == "none":
            return Chosen(None, "none")
        if name == "default":
            return Chosen(self.default, "default") if self.default is not None else Chosen(None, "none")
        grant.check_preset(name)
        if name not in self.presets:
            raise ApiError(400, f"unknown preset {name!r} (GET /v1/models lists the presets you may use)",
                           param="steering.preset", code="unknown_preset", kind="invalid_request")
        return Chosen(self.presets[name], "preset", name)


def _read(path: str | Path) -> Any:
    try:
        return read_plan_file(path)
    except SteerableError:
        raise
    except (OSError, ValueError, RecursionError) as e:
        raise SteerableError(f"{path}: cannot read plan file ({type(e).__name__}: {e})") from None


def _checked(spec: Any, handle: ModelHandle, resolve: VectorResolver, origin: str) -> SteeringPlan:
    try:
        return build_plan(spec, handle, resolve)
    except SteerableError as e:
        raise SteerableError(f"{origin}: {e}") from None
    except ApiError as e:
        raise SteerableError(f"{origin}: {e.message}") from None
    except Exception as e:  # e.g. a plan nested too deeply: a start-up fault all the same
        raise SteerableError(f"{origin}: {type(e).__name__}: {e}") from None
