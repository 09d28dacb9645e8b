"""CAST conditions: decide once per sequence, from its prompt, whether a row's gated plan runs.

The score is CAST's cos(h̄, tanh(P_c h̄)) of the prompt feature at the condition layer (the last prompt
token if the condition artifact was calibrated at position "last", else the mean over prompt tokens).
Each row gets its own decision — the reference implementation looked at row 0 only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from steerable.directions.artifact import DirectionSet
from steerable.directions.cast_calibration import SCORES, CastChoice, available_scores, choose_cast
from steerable.directions.quality import cast_score
from steerable.errors import PlanError
from steerable.steering.gates import TokenView
from steerable.steering.values import number

#: the keys of a conditional plan entry, with their help text (docs/plans.md is checked against these)
CONDITIONAL_KEYS: dict[str, str] = {
    "vector": "the condition's direction file (e.g. harmful vs benign prompts)",
    "method": '"conditional"',
    "layer": 'the condition layer, or "auto" (chosen from the artifact\'s CAST statistics)',
    "threshold": 'the score threshold, or "auto"',
    "recall": "the recall target \"auto\" aims for on held-out prompts (default 0.95)",
    "compare": '">" or "<": the side of the threshold on which the condition holds (default: the positive class\'s)',
    "score": '"cast" (CAST\'s cos(h, tanh(P_c h)), the default), "projection" (signed h·ĉ) or "auto" (chosen with '
             'layer and threshold by held-out F1 with the recall target)',
    "then": "the plan applied to the rows whose prompt meets the condition",
}


@dataclass(frozen=True, eq=False)
class CastCondition:
    """A checked CAST condition: steer a row's gated plan only if its prompt's score passes the threshold."""

    vectors: DirectionSet
    vector_name: str
    layer: int
    threshold: float
    compare: str  # ">" or "<": the condition holds when score compare threshold
    recall_target: float
    choice: CastChoice | None = None
    score: str = "cast"  # "cast" or "projection" (directions/cast_calibration.py SCORES)

    @property
    def site(self) -> str:
        return str(self.vectors.meta.get("site", "resid_post"))

    @property
    def position(self) -> str:
        return "last" if self.vectors.meta.get("position", "last") == "last" else "mean"

    def feature(self, h: torch.Tensor, view: TokenView) -> torch.Tensor:
        """The prompt feature [B, d] from this pass's activations (which must cover the whole prompt)."""
        if self.position == "last":
            return h[:, view.prompt_len - 1 - view.past]
        n = view.n_prompt
        mask = torch.ones(h.shape[0], n, device=h.device, dtype=h.dtype)
        if view.attention_mask is not None:
            mask = view.attention_mask[:, view.past : view.past + n].to(h.dtype)
        return (h[:, :n] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)

    def decide(self, h: torch.Tensor, view: TokenView) -> torch.Tensor:
        """[B, 1, 1] of 0/1 in h's dtype: whether the condition holds for each row."""
        feature = self.feature(h, view).float()
        unit = self.vectors.direction(self.layer).to(h.device).float()
        score = feature @ unit if self.score == "projection" else cast_score(feature, unit)
        hit = score > self.threshold if self.compare == ">" else score < self.threshold
        return hit.to(h.dtype)[:, None, None]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": "conditional", "vector": self.vector_name, "layer": self.layer,
                               "threshold": self.threshold, "compare": self.compare, "recall": self.recall_target}
        if self.score != "cast":
            out["score"] = self.score
        return out

    def report(self) -> dict[str, Any]:
        out = self.to_json()
        if self.choice is not None:
            out.update(heldout_recall=self.choice.recall, heldout_precision=self.choice.precision,
                       heldout_fpr=self.choice.fpr)
        fixed = self.vectors.meta.get("condition")
        if isinstance(fixed, dict) and fixed.get("layer") == self.layer and fixed.get("score") == self.score:
            out.update(leave_one_source_out=fixed.get("loso"), fires_per_source=fixed.get("fires_per_source"))
        return out


def build_condition(entry: Mapping[str, Any], name: str, ds: DirectionSet, handle: Any) -> CastCondition:
    layer, threshold = entry.get("layer", "auto"), entry.get("threshold", "auto")
    recall = number("recall", entry.get("recall"), 0.95)
    if recall is None or not 0 < recall < 1:
        raise PlanError(f"recall must be a number in (0, 1), got {entry.get('recall')!r}")
    if layer != "auto" and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise PlanError(f"condition layer must be an int or \"auto\", got {layer!r}")
    if layer != "auto":
        if not 0 <= layer < handle.n_layers:
            raise PlanError(f"condition layer {layer} out of range: the model has layers 0-{handle.n_layers - 1}")
        ds.row(layer)
    if threshold != "auto":
        if threshold is None:
            raise PlanError('condition threshold must be a number or "auto", got null')
        threshold = number("condition threshold", threshold, None, bound=1e4)
    compare = entry.get("compare")
    if compare not in (None, ">", "<"):
        raise PlanError(f"compare must be \">\" or \"<\", got {str(compare)[:20]!r}")
    score = entry.get("score", "cast")
    if score not in (*SCORES, "auto"):
        raise PlanError(f"condition score must be one of {', '.join((*SCORES, 'auto'))}, got {str(score)[:20]!r}")
    if score == "auto" and threshold != "auto":
        raise PlanError('score "auto" chooses the threshold too: give threshold "auto", or a score for the number')
    fixed = ds.meta.get("condition")
    if isinstance(fixed, dict) and layer == "auto" and threshold == "auto" and entry.get("score") in (None, "auto",
                                                                                                   fixed.get("score")):
        # chosen at calibration by leaving each source out (directions/multi_source.py)
        layer, threshold, score = int(fixed["layer"]), float(fixed["threshold"]), str(fixed["score"])
        compare = compare or str(fixed["compare"])
    choice = None
    if score in available_scores(ds) or (score == "auto" and available_scores(ds)):
        choice = choose_cast(ds, layer=None if layer == "auto" else layer,
                             threshold=None if threshold == "auto" else float(threshold), recall_target=recall,
                             score=score)
    elif layer == "auto" or threshold == "auto":
        raise PlanError(f"{name} has no {'condition' if score == 'auto' else score} score statistics to choose "
                        "layer/threshold \"auto\" from: recalibrate it with this version of steerable or give numbers")
    return CastCondition(
        vectors=ds, vector_name=name, layer=choice.layer if choice else int(layer),
        threshold=choice.threshold if threshold == "auto" and choice else float(threshold),
        compare=compare or (choice.compare if choice else ">"), recall_target=float(recall), choice=choice,
        score=choice.score if choice else score,
    )
