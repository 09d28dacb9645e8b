"""One exception type for every user-facing problem, so CLI and server can report it cleanly."""


class SteerableError(ValueError):
    """Bad input or an incompatible artifact/model; the message names the problem."""
