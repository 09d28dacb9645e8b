"""Which layers a plan steers: explicit ranges, or a criterion over the artifact (methods.md §4).

Ranges are checked against the model before they are expanded, so "0-20000000" costs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from steerable.directions.geometry import discriminative_layers, plane, top_layers
from steerable.errors import PlanError
from steerable.steering.values import ascii_int

if TYPE_CHECKING:
    from steerable.steering.spec import Intervention

LAYERS_HELP = '"A-B", "A,B,C", "all", "discriminative", "top:K", "top-d:K", an int or a list of ints'
_TOP = re.compile(r"top(-d)?:([0-9]+)", re.ASCII)
MAX_PARTS = 1024


def _check(layer: int, n_layers: int) -> int:
    if not 0 <= layer < n_layers:
        raise PlanError(f"layer {layer} out of range: the model has layers 0-{n_layers - 1}")
    return layer


def parse_layers(spec: Any, n_layers: int, calibrated: Sequence[int]) -> tuple[int, ...]:
    """Explicit layers: "A-B" (inclusive), "A,B,C", "all" (every calibrated layer), an int, or a list of ints."""
    if spec is None or spec == "all":
        return tuple(calibrated)
    if isinstance(spec, bool):
        raise PlanError(f"layers must be {LAYERS_HELP}, got {spec!r}")
    out: list[int] = []
    if isinstance(spec, int):
        out = [_check(spec, n_layers)]
    elif isinstance(spec, str):
        parts = spec.replace(" ", "").split(",")
        if len(parts) > MAX_PARTS:
            raise PlanError(f"layers has {len(parts)} parts; at most {MAX_PARTS}")
        for part in parts:
            lo, dash, hi = part.partition("-")
            try:
                a = ascii_int("layers", lo, 0, 10**9)
                b = ascii_int("layers", hi, 0, 10**9) if dash else a
            except PlanError:
                raise PlanError(f"cannot parse layers {spec[:60]!r}: use {LAYERS_HELP}") from None
            if b < a:
                raise PlanError(f"layers {part!r}: the range is empty (A-B needs A ≤ B)")
            _check(b, n_layers)  # before expanding the range
            out += range(a, b + 1)
    elif isinstance(spec, list | tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
        if len(spec) > MAX_PARTS:
            raise PlanError(f"layers lists {len(spec)} layers; at most {MAX_PARTS}")
        out = [_check(x, n_layers) for x in spec]
    else:
        raise PlanError(f"layers must be {LAYERS_HELP}, got {str(spec)[:60]!r}")
    if not out:
        raise PlanError("layers is empty")
    return tuple(sorted(set(out)))


def resolve_layers(spec: Any, iv: Intervention, n_layers: int) -> tuple[int, ...]:
    """Layers for one intervention; criteria are evaluated on its (first) direction set."""
    ds = iv.vectors
    if spec == "discriminative":
        b1 = None if iv.direction == "per-layer" else plane(
            ds, None if iv.direction == "global" else iv.source_layer(ds.layers[0]))[0]
        layers = tuple(discriminative_layers(ds, b1))
        if not layers:
            raise PlanError("no discriminative layers: the class means project with the same sign everywhere")
    elif isinstance(spec, str) and _TOP.fullmatch(spec):
        m = _TOP.fullmatch(spec)
        assert m is not None
        k = ascii_int("layers top:K", m.group(2), 1, max(n_layers, 1))
        layers = tuple(top_layers(ds, k, by="cohens_d" if m.group(1) else "auroc", n_layers=n_layers))
    else:
        layers = parse_layers(spec, n_layers, ds.layers)
    if iv.direction == "per-layer":
        missing = [x for x in layers if x not in ds.layers]
        if missing:
            raise PlanError(
                f"layer {missing[0]} has no calibrated direction in {iv.vector_name} (use direction \"global\" or a "
                "layer index to steer uncalibrated layers)")
    return layers
