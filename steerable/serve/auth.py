"""API keys (`--api-keys FILE`): who may call the server, and which vectors and presets each key may use.

The file is JSON: {"KEY": {"vectors": ["refusal", ...] | "*", "presets": [...] | "*", "profiles": [...] | "*"},
"KEY2": "*"}. A missing or unknown key gets 401; using a vector, preset or profile library the key is not
granted gets 403 (a key that lists no "profiles" may use none). The server's default plan and the presets a
key is granted are the operator's choice and apply whatever profile libraries they name.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerable.errors import SteerableError
from steerable.serve.errors import ApiError
from steerable.serve.library import check_name


@dataclass(frozen=True)
class Grant:
    """What one caller may use; None means everything."""

    vectors: frozenset[str] | None = None
    presets: frozenset[str] | None = None
    profiles: frozenset[str] | None = None

    def check_vector(self, name: str, param: str = "steering") -> None:
        if self.vectors is not None and check_name(name, param=param) not in self.vectors:
            raise ApiError(403, f"this API key may not use vector {name!r}", param=param, code="vector_not_granted",
                           kind="permission")

    def check_preset(self, name: str) -> None:
        if self.presets is not None and name not in self.presets:
            raise ApiError(403, f"this API key may not use preset {name!r}", param="steering",
                           code="preset_not_granted", kind="permission")

    def check_profile(self, name: str, param: str = "steering.profile") -> None:
        if self.profiles is not None and check_name(name, "profile library", param) not in self.profiles:
            raise ApiError(403, f"this API key may not use profile library {name!r}", param=param,
                           code="profile_not_granted", kind="permission")

    def allows_profile(self, name: str) -> bool:
        return self.profiles is None or name in self.profiles

    def allows_vector(self, name: str) -> bool:
        return self.vectors is None or name in self.vectors

    def allows_preset(self, name: str) -> bool:
        return self.presets is None or name in self.presets


EVERYTHING = Grant()


def _names(key_label: str, field: str, value: Any) -> frozenset[str] | None:
    if value == "*":
        return None
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SteerableError(f"api keys: {key_label}: \"{field}\" must be \"*\" or a list of names")
    try:
        what = {"vectors": "vector", "profiles": "profile library"}.get(field)
        return frozenset(check_name(v, what) if what else v for v in value)
    except ApiError as e:
        raise SteerableError(f"api keys: {key_label}: {e.message}") from None


class ApiKeys:
    """No file: everyone may use everything. With one: every request needs a listed key."""

    def __init__(self, grants: dict[str, Grant] | None) -> None:
        self._grants = grants

    @property
    def enabled(self) -> bool:
        return self._grants is not None

    @classmethod
    def load(cls, path: str | Path | None) -> ApiKeys:
        if path is None:
            return cls(None)
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SteerableError(f"no such API keys file: {path}") from None
        except json.JSONDecodeError as e:
            raise SteerableError(f"{path}: API keys file is not valid JSON ({e.msg})") from None
        except (OSError, ValueError, RecursionError) as e:
            raise SteerableError(f"{path}: cannot read the API keys file ({type(e).__name__})") from None
        if not isinstance(raw, dict) or not raw:
            raise SteerableError(f"{path}: API keys file must be a non-empty JSON object of key → grant")
        grants: dict[str, Grant] = {}
        for i, (key, spec) in enumerate(raw.items()):
            label = f"key #{i + 1}"  # never echo a key into logs or errors
            if len(key) < 8:
                raise SteerableError(f"api keys: {label} is shorter than 8 characters")
            if spec == "*":
                grants[key] = EVERYTHING
                continue
            if not isinstance(spec, dict) or set(spec) - {"vectors", "presets", "profiles"}:
                raise SteerableError(f"api keys: {label}: grant must be \"*\" or {{\"vectors\": …, \"presets\": …, "
                                     "\"profiles\": …}")
            grants[key] = Grant(_names(label, "vectors", spec.get("vectors")),
                                _names(label, "presets", spec.get("presets")),
                                _names(label, "profiles", spec.get("profiles")))
        return cls(grants)

    def check(self, authorization: str | None) -> Grant:
        if self._grants is None:
            return EVERYTHING
        if not authorization:
            raise ApiError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key",
                           kind="auth")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        found = None
        if scheme.lower() == "bearer" and key:
            # compare against every key in constant time, so timing does not reveal a prefix match
            for candidate, grant in self._grants.items():
                if hmac.compare_digest(candidate.encode(), key.encode()):
                    found = grant
        if found is None:
            raise ApiError(401, "incorrect API key", code="invalid_api_key", kind="auth")
        return found
