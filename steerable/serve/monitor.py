"""The optional per-response drift projection (`steering_monitor` in a request): the reply's mean projection
on a library vector at one layer, read while decoding by `AxisMonitor` (no extra pass), with the band the
vector's own positive class spans there (its 5th–95th calibration percentiles; for an Assistant Axis file,
the Assistant's own range) and how far below it the reply fell."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from steerable.capture.sites import SITES
from steerable.directions.artifact import DirectionSet, layer_ranges
from steerable.serve.auth import Grant
from steerable.serve.errors import bad_request
from steerable.serve.library import VectorLibrary, check_name

PARAM = "steering_monitor"


@dataclass(frozen=True)
class MonitorSpec:
    vector: str
    layer: int
    site: str
    vectors: DirectionSet

    @property
    def key(self) -> tuple[str, int, str]:
        return self.vector, self.layer, self.site

    def report(self, projection: float, tokens: int) -> dict[str, Any]:
        try:
            lo = float(self.vectors.percentile(self.layer, "pos", 5))
            hi = float(self.vectors.percentile(self.layer, "pos", 95))
        except (IndexError, KeyError, TypeError, ValueError, RuntimeError):  # no usable percentiles stored
            lo = hi = math.nan
        drift = max(0.0, lo - projection) if math.isfinite(lo) and math.isfinite(projection) else math.nan
        return {"vector": self.vector, "layer": self.layer, "site": self.site, "projection": _finite(projection),
                "tokens": tokens, "band": [_finite(lo), _finite(hi)], "drift": _finite(drift)}


def parse_monitor(value: Any, library: VectorLibrary, grant: Grant) -> MonitorSpec | None:
    """`{"vector": NAME, "layer": L}`; layer defaults to the file's monitor layer (axis files) or its middle."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise bad_request(f"{PARAM} must be an object {{\"vector\": NAME, \"layer\": L}}", PARAM)
    unknown = set(value) - {"vector", "layer"}
    if unknown:
        raise bad_request(f"{PARAM}: unknown key(s) {sorted(unknown)}: allowed keys are ['layer', 'vector']", PARAM)
    name = check_name(value.get("vector"), param=f"{PARAM}.vector")
    grant.check_vector(name, f"{PARAM}.vector")
    ds = library.get(name, f"{PARAM}.vector")
    layer = value.get("layer")
    if layer is None:
        layer = default_layer(ds, name)
    if isinstance(layer, bool) or not isinstance(layer, int) or layer not in ds.layers:
        raise bad_request(f"{PARAM}.layer must be one of the vector's calibrated layers "
                          f"({layer_ranges(ds.layers)}), got {layer!r}", f"{PARAM}.layer")
    site = ds.meta.get("site", "resid_post")
    if site not in SITES:
        raise bad_request(f"{PARAM}: vector {name!r} names an unknown hook site ({str(site)[:40]!r}) in its metadata; "
                          "it cannot be monitored", f"{PARAM}.vector", "monitor_unavailable")
    direction = ds.direction(layer)
    if not bool(torch.isfinite(direction).all()) or float(direction.norm()) == 0:
        raise bad_request(f"{PARAM}: vector {name!r} has no finite non-zero direction at layer {layer}; it cannot "
                          "be monitored", f"{PARAM}.vector", "monitor_unavailable")
    return MonitorSpec(name, layer, str(site), ds)


def default_layer(ds: DirectionSet, name: str) -> int:
    """An axis file's monitor layer (checked: an integer among the calibrated layers), else the middle one."""
    axis = ds.meta.get("axis")
    if axis is None or (isinstance(axis, Mapping) and "monitor_layer" not in axis):
        return ds.layers[len(ds.layers) // 2]
    layer = axis.get("monitor_layer") if isinstance(axis, Mapping) else None
    if isinstance(layer, bool) or not isinstance(layer, int) or layer not in ds.layers:
        raise bad_request(f"{PARAM}: vector {name!r} has malformed axis metadata (monitor_layer "
                          f"{str(layer)[:40]!r} is not one of its calibrated layers {layer_ranges(ds.layers)}); "
                          f"give {PARAM}.layer", f"{PARAM}.layer", "monitor_unavailable")
    return layer


def _finite(x: float) -> float | None:
    """JSON has no NaN or infinity: a number that is not finite is reported as null."""
    return round(x, 6) if math.isfinite(x) else None
