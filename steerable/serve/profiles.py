"""The server's profile libraries (`--profiles`): per-user steering, each row's vectors composed per request.

A request names a library by its bare name (the file's stem, as it names a vector) and a user: the plan
entry's `user` key, else the request's OpenAI `user` field. The plan validator (steering/plan.py) asks the
library this shelf hands it for the user's vectors, composed from the library's shared basis and that user's
weights when the request is admitted (`ProfileLibrary.direction_set`); a user the library does not hold (or
no user at all) gets the population vector, and the response says so.

Memory stays bounded whatever the number of users: a library is read lazily (safetensors), and the only
per-user state the server keeps is a small LRU of recently composed sets, so a 100 000-user library costs
its basis and a few composed vectors, never a resident d-vector per user.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerable.directions.artifact import DirectionSet, layer_ranges
from steerable.directions.profiles import ProfileLibrary, load_profiles
from steerable.errors import SteerableError
from steerable.models.load import ModelHandle
from steerable.serve.errors import ApiError, bad_request
from steerable.serve.library import _NAME, SUFFIX, check_name
from steerable.steering.methods.add import MAX_USER_CHARS

CACHE_SIZE = 32  # composed sets kept (each L×d floats a few times over); a miss costs one small matmul


def check_user(user: object, param: str) -> str | None:
    """A request-given user id (None: no user), or a 400 saying what is wrong with it."""
    if user is None:
        return None
    if not isinstance(user, str):
        raise bad_request(f"{param} must be a string (a user id), got {type(user).__name__}", param, "invalid_user")
    if len(user) > MAX_USER_CHARS:
        raise bad_request(f"{param} has {len(user)} characters; a user id has at most {MAX_USER_CHARS}", param,
                          "invalid_user")
    return user


class ProfileShelf:
    """Every profile library the server was started with, checked against the model once, at start-up."""

    def __init__(self, libraries: dict[str, ProfileLibrary], sources: dict[str, Path],
                 cache_size: int = CACHE_SIZE) -> None:
        self._libraries = libraries
        self.sources = sources
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str | None, str], tuple[DirectionSet, bool]] = OrderedDict()
        self._lock = threading.Lock()  # admission runs on one thread, but Ray Serve may call from several

    @classmethod
    def load(cls, paths: Sequence[str | Path], handle: ModelHandle, cache_size: int = CACHE_SIZE) -> ProfileShelf:
        """Each path a library file, or a directory whose `*.safetensors` are libraries; names are file stems."""
        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                found = sorted(p.glob(f"*{SUFFIX}"))
                if not found:
                    raise SteerableError(f"--profiles {p}: the directory holds no *{SUFFIX} profile library")
                files += found
            elif p.is_file():
                files.append(p)
            else:
                raise SteerableError(f"--profiles {p}: no such file or directory")
        libraries: dict[str, ProfileLibrary] = {}
        sources: dict[str, Path] = {}
        for path in files:
            stem = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
            if not _NAME.fullmatch(stem):
                raise SteerableError(f"{path}: file name is not a valid profile library name "
                                     "(letters, digits, '.', '_', '-')")
            if stem in libraries:
                raise SteerableError(f"--profiles: two libraries are named {stem!r} ({sources[stem]} and {path})")
            try:
                lib = load_profiles(path)
                lib.check_model(handle)
            except SteerableError as e:
                raise SteerableError(f"profile library {path}: {e}" if str(path) not in str(e) else str(e)) from None
            except Exception as e:  # corrupt in a way the loader does not name: a start-up fault all the same
                raise SteerableError(f"profile library {path}: cannot be read ({type(e).__name__}: {e})") from None
            libraries[stem], sources[stem] = lib, path
        return cls(libraries, sources, cache_size)

    @classmethod
    def empty(cls) -> ProfileShelf:
        return cls({}, {})

    @property
    def names(self) -> list[str]:
        return sorted(self._libraries)

    def __bool__(self) -> bool:
        return bool(self._libraries)

    def __contains__(self, name: str) -> bool:
        return name in self._libraries

    def library(self, name: str) -> ProfileLibrary:
        return self._libraries[name]

    def get(self, name: object, param: str = "steering.profile") -> str:
        """The canonical name of the library a (request-given) name refers to: 400 for a path or an unknown name."""
        stem = check_name(name, "profile library", param)
        if stem not in self._libraries:
            listed = "this server serves no profile library" if not self._libraries else \
                "GET /v1/models lists the profile libraries you may use"
            raise ApiError(400, f"unknown profile library {name!r} ({listed})", param=param, code="unknown_profile",
                           kind="invalid_request")
        return stem

    def source(self, name: str) -> CachedProfiles:
        """What the plan validator gets for library `name` (a canonical name, see `get`)."""
        return CachedProfiles(self, name)

    def compose(self, name: str, user: str | None, composition: str) -> tuple[DirectionSet, bool]:
        """`user`'s vectors from library `name` (add at α adds α·v) and whether they fell back to the
        population vector, through the LRU. Users the library lacks share one entry per composition."""
        lib = self._libraries[name]
        key = (name, user if user is not None and user in lib else None, composition)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        hit = lib.direction_set(key[1], composition)
        with self._lock:
            self._cache[key] = hit
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return hit

    def describe(self) -> list[str]:
        out = []
        for name in self.names:
            lib = self._libraries[name]
            out.append(f"{name} ({len(lib.users)} users, K={lib.k}, layers {layer_ranges(list(lib.layers))})")
        return out


class CachedProfiles:
    """One library of a shelf as the validator's ProfileSource: its compositions go through the shelf's LRU."""

    def __init__(self, shelf: ProfileShelf, name: str) -> None:
        self.shelf = shelf
        self.name = name
        self.library = shelf.library(name)
        self.path = name  # how plans and responses name it: the bare library name
        self.site = self.library.site

    def direction_set(self, user: str | None, composition: str = "personalised") -> tuple[DirectionSet, bool]:
        return self.shelf.compose(self.name, user, composition)

    def check_model(self, handle: Any) -> None:
        self.library.check_model(handle)
