"""One exception family for every user-facing problem, so CLI and server can report it cleanly.

Callers and tests tell failures apart by type, never by matching message text; every message still
names the problem (file, row, key) for the person reading it.
"""


class SteerableError(ValueError):
    """Bad input or an incompatible artifact/model; the message names the problem."""


class PlanError(SteerableError):
    """A steering plan (Python, JSON, CLI flags, per-row or server field) is malformed or does not apply."""


class ArtifactError(SteerableError):
    """A direction file, profile library or adapter cannot be read or fails its checks."""


class ModelMismatchError(ArtifactError):
    """An artifact was made for another model (hidden size, layer count or config hash differ)."""


class DataError(SteerableError):
    """A prompts, pairs, conversations or preference file (or a built-in set name) is malformed."""


__all__ = ["ArtifactError", "DataError", "ModelMismatchError", "PlanError", "SteerableError"]
