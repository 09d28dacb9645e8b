"""Which layers a plan steers: explicit ranges, or a criterion over the artifact (methods.md §4)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from steerable.directions.layers import discriminative_layers, top_layers
from steerable.errors import SteerableError

if TYPE_CHECKING:
    from steerable.steering.intervention import Intervention

LAYERS_HELP = '"A-B", "A,B,C", "all", "discriminative", "top:K", "top-d:K", an int or a list of ints'
_TOP = re.compile(r"^top(-d)?:(\d+)$")


def parse_layers(spec: Any, n_layers: int, calibrated: Sequence[int]) -> tuple[int, ...]:
    """Explicit layers: "A-B" (inclusive), "A,B,C", "all" (every calibrated layer), an int, or a list of ints."""
    if spec is None or spec == "all":
        return tuple(calibrated)
    if isinstance(spec, bool):
        raise SteerableError(f"layers must be {LAYERS_HELP}, got {spec!r}")
    if isinstance(spec, int):
        out = [spec]
    elif isinstance(spec, str):
        out = []
        for part in spec.replace(" ", "").split(","):
            lo, dash, hi = part.partition("-")
            try:
                out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
            except ValueError:
                raise SteerableError(f"cannot parse layers {spec!r}: use {LAYERS_HELP}") from None
    elif isinstance(spec, list | tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
        out = list(spec)
    else:
        raise SteerableError(f"layers must be {LAYERS_HELP}, got {spec!r}")
    if not out:
        raise SteerableError("layers is empty")
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise SteerableError(f"layer {max(bad)} out of range: the model has layers 0-{n_layers - 1}")
    return tuple(sorted(set(out)))


def resolve_layers(spec: Any, iv: Intervention, n_layers: int) -> tuple[int, ...]:
    """Layers for one intervention; criteria are evaluated on its (first) direction set."""
    ds = iv.vectors
    if spec == "discriminative":
        b1 = iv.plane(ds.layers[0])[0] if iv.direction != "per-layer" else None
        layers = tuple(discriminative_layers(ds, b1))
        if not layers:
            raise SteerableError("no discriminative layers: the class means project with the same sign everywhere")
    elif isinstance(spec, str) and _TOP.match(spec):
        m = _TOP.match(spec)
        assert m is not None
        layers = tuple(top_layers(ds, int(m.group(2)), by="cohens_d" if m.group(1) else "auroc", n_layers=n_layers))
    else:
        layers = parse_layers(spec, n_layers, ds.layers)
    if iv.direction == "per-layer":
        missing = [x for x in layers if x not in ds.layers]
        if missing:
            raise SteerableError(
                f"layer {missing[0]} has no calibrated direction in {iv.vector_name} (use direction \"global\" or a "
                "layer index to steer uncalibrated layers)")
    return layers
