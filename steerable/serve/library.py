"""The server's vector library: the only direction files a request can name, all loaded and checked at start-up.

A request names a vector by its bare file name (`refusal` or `refusal.safetensors`); anything that could
reach another file (path separators, `..`, absolute paths, odd characters) is refused before any lookup,
so no request can make the server open a file outside the library.
"""

from __future__ import annotations

import re
from pathlib import Path

from steerable.directions.artifact import DirectionSet, load_directions
from steerable.errors import SteerableError
from steerable.models.load import ModelHandle
from steerable.serve.errors import ApiError, bad_request

SUFFIX = ".safetensors"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: object, what: str = "vector", param: str = "steering") -> str:
    """The canonical (suffix-less) library name, or a 400 that says what is wrong with `name`."""
    if not isinstance(name, str) or not name:
        raise bad_request(f"{what} name must be a non-empty string, got {name!r}", param)
    if "/" in name or "\\" in name or ".." in name or name.startswith(("~", ".")) or "\x00" in name:
        raise bad_request(f"{what} {name!r} is not a library name: file paths are refused (no '/', '\\', "
                          "'..' or leading '.'); give the bare name of a vector the server serves", param)
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if not _NAME.fullmatch(stem):
        raise bad_request(f"{what} {name!r} is not a library name: use letters, digits, '.', '_' and '-'", param)
    return stem


class VectorLibrary:
    """Every `*.safetensors` file of one directory, loaded once and checked against the served model."""

    def __init__(self, directory: Path, sets: dict[str, DirectionSet]) -> None:
        self.directory = directory
        self._sets = sets

    @classmethod
    def load(cls, directory: str | Path, handle: ModelHandle) -> VectorLibrary:
        directory = Path(directory)
        if not directory.is_dir():
            raise SteerableError(f"--vectors {directory}: not a directory")
        sets: dict[str, DirectionSet] = {}
        for path in sorted(directory.glob(f"*{SUFFIX}")):
            stem = path.name[: -len(SUFFIX)]
            if not _NAME.fullmatch(stem):
                raise SteerableError(f"{path}: file name is not a valid vector name (letters, digits, '.', '_', '-')")
            try:
                sets[stem] = load_directions(path, handle)
            except SteerableError as e:
                raise SteerableError(f"vector library: {e}" if str(path) in str(e) else f"{path}: {e}") from None
            except Exception as e:  # a file corrupt in a way the loader does not name: still a start-up fault
                raise SteerableError(f"vector library: {path}: cannot be read ({type(e).__name__}: {e})") from None
        return cls(directory, sets)

    @property
    def names(self) -> list[str]:
        return sorted(self._sets)

    def __contains__(self, name: str) -> bool:
        return name in self._sets

    def get(self, name: str, param: str = "steering") -> DirectionSet:
        """The set a (request-given) name refers to: 400 for a path or an unknown name."""
        stem = check_name(name, param=param)
        if stem not in self._sets:
            raise ApiError(400, f"unknown vector {name!r}: it is not in this server's vector library "
                                "(GET /v1/models lists the vectors you may use)", param=param,
                           code="unknown_vector", kind="invalid_request")
        return self._sets[stem]

    def path(self, name: str) -> Path:
        return self.directory / f"{check_name(name)}{SUFFIX}"
