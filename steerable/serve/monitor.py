"""The optional per-response drift projection (`steering_monitor` in a request): the reply's mean projection
on a library vector at one layer, read while decoding by `AxisMonitor` (no extra pass), with the band the
vector's own positive class spans there (its 5th–95th calibration percentiles; for an Assistant Axis file,
the Assistant's own range) and how far below it the reply fell."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
        lo = self.vectors.percentile(self.layer, "pos", 5)
        hi = self.vectors.percentile(self.layer, "pos", 95)
        finite = math.isfinite(projection)
        return {"vector": self.vector, "layer": self.layer, "site": self.site,
                "projection": round(projection, 6) if finite else None, "tokens": tokens,
                "band": [round(lo, 6), round(hi, 6)],
                "drift": round(max(0.0, lo - projection), 6) if finite else None}


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
        layer = int(ds.meta.get("axis", {}).get("monitor_layer", ds.layers[len(ds.layers) // 2]))
    if isinstance(layer, bool) or not isinstance(layer, int) or layer not in ds.layers:
        raise bad_request(f"{PARAM}.layer must be one of the vector's calibrated layers "
                          f"({layer_ranges(ds.layers)}), got {layer!r}", f"{PARAM}.layer")
    return MonitorSpec(name, layer, str(ds.meta.get("site", "resid_post")), ds)
