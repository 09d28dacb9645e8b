"""Which plan a request runs under: its own `steering`, a named preset, the server's default, or none.

Request field `steering`:
  absent                      → the server's default plan (unsteered if the server has none)
  null, {"preset": "none"}    → unsteered, whatever the default
  {"preset": "default"}       → the default plan, said explicitly
  {"preset": NAME}            → preset NAME (a plan file in --presets DIR)
  a plan object or list       → that plan (docs/plans.md), its vectors named from the library
  {"preset": NAME, "user": U} → a preset that names a profile library, composed for user U

A plan entry may name a profile library instead of a vector — {"profile": NAME, "user": U, "composition":
"personalised", "strength": α, ...} — and the user defaults to the request's OpenAI `user` field. Each such
entry is bound before validation: its profile, user and composition are replaced by the user's composed
vectors (profiles.py), so `build_plan` sees an in-memory DirectionSet and checks the rest as for any vector.

Every plan, whatever its origin, is checked by `build_plan` (the one validator) against a resolver that
only knows the library; presets and the default plan are checked once, at start-up (those that name a
profile library are kept as templates, bound per request to the request's user, and checked at start-up
for the population vector).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerable.directions.artifact import DirectionSet
from steerable.errors import SteerableError
from steerable.models.load import ModelHandle
from steerable.serve.auth import Grant
from steerable.serve.errors import ApiError, bad_request
from steerable.serve.library import SUFFIX, VectorLibrary, check_name
from steerable.serve.profiles import ProfileShelf, check_user
from steerable.steering.plan import (
    ProfileResolver,
    ProfileSource,
    SteeringPlan,
    VectorResolver,
    build_plan,
    caching_resolver,
    read_plan_file,
)

RESERVED = ("none", "default")
_PRESET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_WALK = 16  # deeper plans are left to the validator, which refuses them


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
        uses = self.plan.profile_uses if self.plan is not None else ()
        if uses:
            # one user per request in practice; the list keeps each entry's own (library, user) all the same
            out["user"] = uses[0].user
            out["profile_fallback"] = any(u.fallback for u in uses)
            # by the served name, never the operator's path (a preset may name the library's file)
            out["profiles"] = [{**u.to_json(), "profile": _stem(u.profile)} for u in uses]
        return out


def _stem(name: str) -> str:
    base = Path(name).name
    return base[: -len(SUFFIX)] if base.endswith(SUFFIX) else base


def names_profile(spec: Any, depth: int = 0) -> bool:
    """Whether a plan (parsed JSON) has an entry naming a profile library (lists, conditionals' `then`)."""
    if depth > _MAX_WALK:
        return False
    if isinstance(spec, list):
        return any(names_profile(e, depth + 1) for e in spec)
    if isinstance(spec, Mapping):
        if spec.get("method") == "conditional":
            return names_profile(spec.get("then"), depth + 1)
        return spec.get("profile") is not None
    return False


def for_user(spec: Any, user: str | None, depth: int = 0) -> Any:
    """`spec` with `user` as the user of every profile entry that names none of its own (the request's OpenAI
    `user` field is the default; an entry's own `"user"` wins)."""
    if user is None or depth > _MAX_WALK:
        return spec  # (the validator refuses plans nested this deeply)
    if isinstance(spec, list):
        return [for_user(e, user, depth + 1) for e in spec]
    if not isinstance(spec, Mapping):
        return spec
    if spec.get("method") == "conditional":
        return {**spec, "then": for_user(spec["then"], user, depth + 1)} if "then" in spec else spec
    if spec.get("profile") is not None and "user" not in spec:
        return {**spec, "user": user}
    return spec


@dataclass(frozen=True)
class Template:
    """A preset or default plan that names a profile library: given each request's user, then built."""

    spec: Any
    resolve: VectorResolver  # the operator file's vectors, resolved once and kept
    profiles: ProfileResolver
    origin: str


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


def file_profiles(shelf: ProfileShelf, origin: str) -> ProfileResolver:
    """For operator files: a profile library named by its path is matched to the shelf by file name."""

    def resolve(name: str) -> ProfileSource:
        p = Path(name)
        stem = p.name[: -len(SUFFIX)] if p.name.endswith(SUFFIX) else p.name
        if stem not in shelf:
            raise SteerableError(f"{origin}: profile library {name!r} is not one the server was started with "
                                 f"(--profiles {stem}{SUFFIX})")
        if p.name != name and p.is_file() and p.resolve() != shelf.sources[stem].resolve() \
                and _sha256(p) != _sha256(shelf.sources[stem]):
            raise SteerableError(f"{origin}: profile library {name!r} differs from the served {shelf.sources[stem]}")
        return shelf.source(stem)
    return resolve


def request_profiles(shelf: ProfileShelf, grant: Grant) -> ProfileResolver:
    def resolve(name: str) -> ProfileSource:
        stem = check_name(name, "profile library", "steering.profile")  # 400 for anything path-like, first
        grant.check_profile(stem)  # 403 before existence, so a restricted key cannot probe the shelf
        return shelf.source(shelf.get(stem))
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

    def __init__(self, handle: ModelHandle, library: VectorLibrary, presets: dict[str, SteeringPlan | Template],
                 default: SteeringPlan | Template | None, default_name: str | None, max_entries: int = 32,
                 shelf: ProfileShelf | None = None) -> None:
        self.handle = handle
        self.library = library
        self.presets = presets
        self.default = default
        self.default_name = default_name
        self.max_entries = max_entries
        self.shelf = shelf if shelf is not None else ProfileShelf.empty()

    @classmethod
    def load(cls, handle: ModelHandle, library: VectorLibrary, presets_dir: str | Path | None,
             default_plan: str | None, max_entries: int = 32, shelf: ProfileShelf | None = None) -> PlanBook:
        shelf = shelf if shelf is not None else ProfileShelf.empty()
        presets: dict[str, SteeringPlan | Template] = {}
        if presets_dir is not None:
            d = Path(presets_dir)
            if not d.is_dir():
                raise SteerableError(f"--presets {d}: not a directory")
            for path in sorted(d.glob("*.json")):
                name = path.stem
                if not _PRESET.fullmatch(name) or name in RESERVED:
                    raise SteerableError(f"{path}: {name!r} cannot be a preset name (reserved or odd characters)")
                presets[name] = _operator_plan(_read(path), handle, library, shelf, f"preset {name}",
                                               f"preset {name} ({path})")
        default: SteeringPlan | Template | None = None
        default_name = None
        if default_plan is not None:
            if Path(default_plan).is_file():
                default = _operator_plan(_read(default_plan), handle, library, shelf, "default plan",
                                         f"default plan {default_plan}")
                default_name = str(default_plan)
            elif default_plan in presets:
                default, default_name = presets[default_plan], f"preset {default_plan}"
            else:
                raise SteerableError(f"--default-plan {default_plan!r} is neither a plan file nor a preset name")
        return cls(handle, library, presets, default, default_name, max_entries, shelf)

    def choose(self, value: Any, present: bool, grant: Grant, user: str | None = None) -> Chosen:
        """The plan a request's `steering` field selects (see the module docstring); `user` is the request's
        OpenAI `user` field, the user of any profile entry that names none."""
        if not present:
            return self._chosen(self.default, "default", user) if self.default is not None else Chosen(None, "none")
        if value is None:
            return Chosen(None, "none")
        if isinstance(value, Mapping) and "preset" in value:
            if set(value) - {"preset", "user"}:
                raise bad_request("steering: {\"preset\": NAME} takes no other keys but \"user\"; write a plan "
                                  "instead", "steering", "invalid_plan")
            if "user" in value:
                user = check_user(value["user"], "steering.user")
            return self._preset(value["preset"], grant, user)
        if not isinstance(value, Mapping | list):
            raise bad_request(f"steering must be a plan (an object or a list of objects), {{\"preset\": NAME}} or "
                              f"null, got {type(value).__name__}", "steering", "invalid_plan")
        if count_entries(value) > self.max_entries:
            raise bad_request(f"steering: the plan has more than {self.max_entries} interventions", "steering",
                              "invalid_plan")
        if user == "":
            user = None  # an OpenAI client's empty `user`: no user (the population vector)
        try:
            plan = build_plan(for_user(value, user), self.handle, request_resolver(self.library, grant),
                              profiles=request_profiles(self.shelf, grant))
        except SteerableError as e:
            raise bad_request(f"steering: {e}", "steering", "invalid_plan") from None
        return Chosen(plan if plan else None, "request")

    def instance(self, plan: SteeringPlan | Template, user: str | None) -> SteeringPlan:
        """A preset or default plan as it runs for `user` (a template is given the user, then built)."""
        if not isinstance(plan, Template):
            return plan
        try:
            return build_plan(for_user(plan.spec, user or None), self.handle, plan.resolve, profiles=plan.profiles)
        except SteerableError as e:  # e.g. a user id the validator refuses
            raise bad_request(f"steering: {plan.origin} for user {str(user)[:40]!r}: {e}", "steering",
                              "invalid_plan") from None

    def _chosen(self, plan: SteeringPlan | Template, source: str, user: str | None,
                preset: str | None = None) -> Chosen:
        return Chosen(self.instance(plan, user), source, preset)

    def _preset(self, name: Any, grant: Grant, user: str | None) -> Chosen:
        if not isinstance(name, str):
            raise bad_request(f"steering.preset must be a string, got {json.dumps(name)[:40]}", "steering.preset")
        if name == "none":
            return Chosen(None, "none")
        if name == "default":
            return self._chosen(self.default, "default", user) if self.default is not None else Chosen(None, "none")
        grant.check_preset(name)
        if name not in self.presets:
            raise ApiError(400, f"unknown preset {name!r} (GET /v1/models lists the presets you may use)",
                           param="steering.preset", code="unknown_preset", kind="invalid_request")
        return self._chosen(self.presets[name], "preset", user, name)


def _read(path: str | Path) -> Any:
    try:
        return read_plan_file(path)
    except SteerableError:
        raise
    except (OSError, ValueError, RecursionError) as e:
        raise SteerableError(f"{path}: cannot read plan file ({type(e).__name__}: {e})") from None


def _operator_plan(spec: Any, handle: ModelHandle, library: VectorLibrary, shelf: ProfileShelf, what: str,
                   origin: str) -> SteeringPlan | Template:
    """A preset or the default plan, checked now: built, or (naming a profile library) a template, built here
    once for no user (the population vector), so that a fault stops the server now."""
    resolve = file_resolver(library, what)
    profiles = file_profiles(shelf, what)
    if not names_profile(spec):
        return _checked(lambda: build_plan(spec, handle, resolve, profiles=profiles), origin)
    template = Template(spec, caching_resolver(resolve), profiles, origin)
    _checked(lambda: build_plan(spec, handle, template.resolve, profiles=profiles), origin)
    return template


def _checked(build: Callable[[], SteeringPlan], origin: str) -> SteeringPlan:
    try:
        return build()
    except SteerableError as e:
        raise SteerableError(f"{origin}: {e}") from None
    except ApiError as e:
        raise SteerableError(f"{origin}: {e.message}") from None
    except Exception as e:  # e.g. a plan nested too deeply: a start-up fault all the same
        raise SteerableError(f"{origin}: {type(e).__name__}: {e}") from None
