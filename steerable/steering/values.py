"""Parsing of the scalar values a plan carries: bounded finite numbers and percentile thresholds.

Numbers are strict: booleans, strings, NaN/inf and integers too large for a float are refused, and
every key has a stated range, so no value the validator accepts can overflow or turn logits to NaN.
Percentiles are written "pNN" (the positive class's NN-th calibration percentile) or "nNN" (the
negative class's), NN in 0–100 with ASCII digits only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from steerable.errors import PlanError

#: ASCII digits only: Python's int() and \d also take "١٠" and "1_0"
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_PCT = re.compile(r"([pn])([0-9]{1,3}(?:\.[0-9]{1,6})?)", re.ASCII)


def number(name: str, value: Any, default: float | None, bound: float = 1e6) -> float | None:
    """A finite number with |value| ≤ bound, or `default` when the value is absent (None)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanError(f"{name} must be a number, got {_show(value)}")
    try:
        x = float(value)
    except OverflowError:
        raise PlanError(f"{name} is out of range (|{name}| ≤ {bound:g})") from None
    if not math.isfinite(x):
        raise PlanError(f"{name} must be finite, got {x!r}")
    if abs(x) > bound:
        raise PlanError(f"{name} {_show(value)} is out of range (|{name}| ≤ {bound:g})")
    return x


def ascii_int(name: str, text: str, lo: int, hi: int) -> int:
    """A decimal integer written in ASCII digits, checked against [lo, hi] before it is used."""
    if not _DIGITS.fullmatch(text) or len(text) > len(str(hi)) + 1:
        raise PlanError(f"{name}: {_show(text)} is not a whole number in {lo}–{hi}")
    n = int(text)
    if not lo <= n <= hi:
        raise PlanError(f"{name}: {n} is out of range ({lo}–{hi})")
    return n


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}…"


@dataclass(frozen=True)
class Percentile:
    """The q-th percentile (0–100) of one class's calibration projections at the steered layer."""

    cls: Literal["pos", "neg"]
    q: float

    def __str__(self) -> str:
        q = int(self.q) if float(self.q).is_integer() else self.q
        return f"{'p' if self.cls == 'pos' else 'n'}{q}"


#: a threshold in projection (or score) units, or a percentile of the artifact's calibration projections
Threshold = float | Percentile
#: one threshold, or one per direction of a multi-direction cap
Thresholds = Threshold | tuple[Threshold, ...]


def parse_threshold(name: str, value: Any, bound: float = 1e4) -> Thresholds | None:
    """A number, "pNN"/"nNN", or a list of those (one per direction); None when absent."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        if not value or len(value) > 16:
            raise PlanError(f"{name}: a list needs 1 to 16 values (one per direction), got {len(value)}")
        out = tuple(parse_threshold(name, v, bound) for v in value)
        if any(isinstance(v, tuple) for v in out):
            raise PlanError(f"{name}: a list of thresholds cannot nest")
        return out  # type: ignore[return-value]
    if isinstance(value, str):
        m = _PCT.fullmatch(value.strip())
        if not m or not 0 <= float(m.group(2)) <= 100:
            raise PlanError(f"{name} must be a number or a percentile \"pNN\"/\"nNN\" (0-100), got {_show(value)}")
        return Percentile("pos" if m.group(1) == "p" else "neg", float(m.group(2)))
    x = number(name, value, None, bound)
    assert x is not None
    return x


def threshold_json(t: Thresholds | None) -> Any:
    if t is None or isinstance(t, float):
        return t
    if isinstance(t, Percentile):
        return str(t)
    return [threshold_json(x) for x in t]


# -- reading the same values from CLI flags (text) -------------------------------------------------

def threshold_flag(text: str) -> float | str:
    """A flag value that is a number or a percentile "pNN"/"nNN" (checked by the validator)."""
    try:
        return float(text)
    except ValueError:
        return text


def direction_flag(text: str) -> str | int:
    """"per-layer", "global" or a layer index."""
    return int(text) if _DIGITS.fullmatch(text.lstrip("-")) else text
