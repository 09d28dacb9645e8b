"""Projection-aware steering (methods.md §5, ours: reconstruction): StTP moves, StMP mirrors, only tokens whose
probe score s = h·ŵ + b falls below a threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from steerable.errors import PlanError
from steerable.steering import ops
from steerable.steering.spec import Intervention, Params, threshold_key
from steerable.steering.values import Percentile, Thresholds, parse_threshold

DEFAULT_THRESHOLD = Percentile("pos", 5.0)
_SCORE = "a number (score units) or \"pNN\"/\"nNN\" (a calibration percentile)"


def _single(name: str, value: object) -> Thresholds | None:
    t = parse_threshold(name, value)
    if isinstance(t, tuple):
        raise PlanError(f"{name} takes one value ({_SCORE}), not a list")
    return t


@dataclass(frozen=True, eq=False)
class StTP(Intervention):
    """Tokens whose probe score s = h·ŵ + b is below `threshold` move onto `target`."""

    method: ClassVar[str] = "sttp"
    summary: ClassVar[str] = "move tokens with score < threshold onto target (projection-aware)"
    factor: ClassVar[float] = 1.0

    threshold: Thresholds | None = threshold_key(  # noqa: RUF009 - returns a dataclasses.field
        f"tokens scoring below it are steered: {_SCORE} (default p5)",
                                                 _single)
    target: Thresholds | None = threshold_key(  # noqa: RUF009 - returns a dataclasses.field
        f"the score they are moved onto / mirrored across: {_SCORE} "
                                              "(default p50 for sttp, the threshold for stmp)", _single)

    def score_thresholds(self, layer: int) -> tuple[float, float, float]:
        """(bias, threshold, target) of the probe score s = h·ŵ + bias, in score units.

        Defaults: threshold = 5th percentile of the positive (aligned) class's scores, target = its median
        for StTP and the threshold itself for StMP (mirror across it).
        """
        ds = self.vectors
        b = float(ds.bias[ds.row(self.source_layer(layer))])
        bias = 0.0 if math.isnan(b) else b

        def score(t: Thresholds | None, default: Thresholds) -> float:
            t = default if t is None else t
            assert not isinstance(t, tuple)
            return t if isinstance(t, float) else self.percentile_value(ds, layer, t, "threshold") + bias

        return bias, score(self.threshold, DEFAULT_THRESHOLD), score(self.target, self.default_target())

    def default_target(self) -> Thresholds:
        return Percentile("pos", 50.0)

    def prepare(self, layer: int) -> Params:
        u = self.unit_direction(layer)
        bias, threshold, target = self.score_thresholds(layer)

        def num(x: float) -> torch.Tensor:
            return torch.tensor([x], dtype=torch.float32)
        return {"unit": u[None], "write": self.strength * u[None], "bias": num(bias),
                "threshold": num(threshold), "target": num(target)}

    @classmethod
    def apply(cls, h: torch.Tensor, gate: torch.Tensor | None, p: Params) -> torch.Tensor:
        return ops.project_steer(h, p["unit"], p["bias"], p["threshold"], p["target"], cls.factor, p["write"], gate)


@dataclass(frozen=True, eq=False)
class StMP(StTP):
    """Tokens whose score is below `threshold` are mirrored across `target` (default: the threshold)."""

    method: ClassVar[str] = "stmp"
    summary: ClassVar[str] = "mirror tokens with score < threshold across target (projection-aware)"
    factor: ClassVar[float] = 2.0

    def default_target(self) -> Thresholds:
        return self.threshold if self.threshold is not None else DEFAULT_THRESHOLD
