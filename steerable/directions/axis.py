"""The Assistant Axis (methods.md §3), estimated on a real model from the project's role data.

Recipe (`steerable.recipes.axis.estimate_axis` runs it end to end, generating the answers; this module only
estimates): the model answers neutral questions as its default Assistant and while playing each persona
(greedy); a response's activation is its `response-mean` at every layer; a role vector is the mean over
one persona's responses; axis = mean(Assistant responses) − mean(role vectors), pointing toward the
Assistant. Seed 000's three estimators (pairwise PCA of Assistant − role differences on the same
question, shrinkage LDA, logistic probe) are fitted on the same activations for comparison.

Positive class = Assistant responses, negative = role responses, so a cap floor "p25" is the 25th
percentile of the Assistant's own projections (the Assistant Axis paper's threshold).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from steerable.capture.features import response_means
from steerable.capture.run import CaptureResult
from steerable.capture.stats import LayerStats
from steerable.data.roles import Persona, Question
from steerable.directions.artifact import DirectionSet, layer_ranges
from steerable.directions.calibrate import artifact_meta, directions_from_capture
from steerable.directions.estimators import Estimate, get_estimator
from steerable.errors import SteerableError
from steerable.models.load import Messages, ModelHandle

AXIS_ESTIMATORS = ("assistant-axis", "pca", "lda", "logistic")
FILTERS = ("none", "projection")  # the out-of-character filter of `steerable axis` and of persona vectors
HELDOUT_EVERY = 5  # question k (in order of first appearance) is held out when k % 5 == 4


@dataclass(frozen=True)
class RoleRow:
    """One answer used for the axis: the default Assistant's (no persona) or one persona's."""

    kind: str  # "assistant" | "role"
    question_id: str
    question: str
    persona: str | None = None
    system: str | None = None
    response: str = ""

    def messages(self) -> Messages:
        user = [{"role": "user", "content": self.question}]
        return [{"role": "system", "content": self.system}, *user] if self.system else user

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def role_rows(personas: Sequence[Persona], questions: Sequence[Question], per_persona: int) -> list[RoleRow]:
    """Every question once as the Assistant; persona i answers `per_persona` questions, rotating through the
    list so every question is answered by some persona and every persona answers as many (balanced)."""
    if not personas or not questions or per_persona < 1:
        raise SteerableError("the axis needs at least one persona, one question and per_persona >= 1")
    rows = [RoleRow("assistant", q.id, q.question) for q in questions]
    for i, p in enumerate(personas):
        for j in range(per_persona):
            q = questions[(i * per_persona + j) % len(questions)]
            rows.append(RoleRow("role", q.id, q.question, p.id, p.system))
    return rows


@dataclass
class AxisData:
    """Answers and their response-mean activations [len(layers), n, d]."""

    rows: list[RoleRow]
    layers: list[int]
    feats: torch.Tensor
    site: str = "resid_post"

    @cached_property
    def is_assistant(self) -> torch.Tensor:
        return torch.tensor([r.kind == "assistant" for r in self.rows])

    @cached_property
    def heldout(self) -> torch.Tensor:
        order: dict[str, int] = {}
        for r in self.rows:
            order.setdefault(r.question_id, len(order))
        return torch.tensor([order[r.question_id] % HELDOUT_EVERY == HELDOUT_EVERY - 1 for r in self.rows])

    @cached_property
    def pair_of(self) -> torch.Tensor:
        """For a role row, the Assistant row answering the same question (−1 if none)."""
        asst = {r.question_id: i for i, r in enumerate(self.rows) if r.kind == "assistant"}
        return torch.tensor([asst.get(r.question_id, -1) if r.kind == "role" else -1 for r in self.rows])

    def x(self, layer: int) -> torch.Tensor:
        return self.feats[self.layers.index(layer)]

    def subset(self, keep: torch.Tensor) -> AxisData:
        """The rows where `keep` is true (their features with them)."""
        idx = torch.nonzero(keep).squeeze(1)
        return AxisData([self.rows[int(i)] for i in idx], self.layers, self.feats[:, idx], self.site)

    def stats(self, layer: int, idx: torch.Tensor, heldout: torch.Tensor | None = None) -> LayerStats:
        """LayerStats of rows `idx` (repeats allowed: bootstrap); pair differences for role rows in `idx`."""
        x = self.x(layer)
        st = LayerStats(x.shape[1], second_moments=True, reservoir_cap=len(idx) + 1, heldout_cap=len(idx) + 1,
                        seed=layer)
        held = torch.zeros(len(idx), dtype=torch.bool) if heldout is None else heldout[idx]
        st.add(x[idx], self.is_assistant[idx].long(), held)
        pairs = self.pair_of[idx]
        keep = (pairs >= 0) & ~held
        if bool(keep.any()):
            st.add_pair_diffs(x[pairs[keep]] - x[idx[keep]])
        return st

    def fit(self, estimator: str, layer: int, idx: torch.Tensor | None = None) -> Estimate:
        """One estimator's direction at `layer` from rows `idx` (default: the training rows)."""
        idx = torch.nonzero(~self.heldout).squeeze(1) if idx is None else idx
        if estimator == "assistant-axis":
            return Estimate(assistant_axis(self.x(layer)[idx], [self.rows[int(i)].persona for i in idx]))
        if estimator not in AXIS_ESTIMATORS:
            raise SteerableError(f"unknown axis estimator {estimator!r}: use one of {', '.join(AXIS_ESTIMATORS)}")
        return get_estimator(estimator).fn(self.stats(layer, idx))


def assistant_axis(x: torch.Tensor, personas: Sequence[str | None]) -> torch.Tensor:
    """Unit mean(rows without persona) − mean over personas of each persona's mean row."""
    asst = torch.tensor([p is None for p in personas])
    names = sorted({p for p in personas if p is not None})
    if not bool(asst.any()) or not names:
        raise SteerableError("the Assistant Axis needs Assistant answers and at least one persona's answers")
    x64 = x.double()
    role_vectors = torch.stack([x64[torch.tensor([p == n for p in personas])].mean(0) for n in names])
    v = x64[asst].mean(0) - role_vectors.mean(0)
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise SteerableError("the Assistant Axis is zero: Assistant and role answers have the same mean")
    return (v / norm).float()


def capture_axis_data(handle: ModelHandle, rows: Sequence[RoleRow], layers: Sequence[int] | None = None, *,
                      site: str = "resid_post", batch_size: int = 16, progress: bool = True) -> AxisData:
    layers = list(range(handle.n_layers)) if layers is None else sorted(set(layers))
    feats = response_means(handle, [r.messages() for r in rows], [r.response for r in rows], layers, site=site,
                           batch_size=batch_size, progress=progress)
    return AxisData(list(rows), layers, feats, site)


@dataclass(frozen=True)
class FilterResult:
    """Which rows a judge keeps: `keep[i]`, from each row's judge `scores[i]` (higher = more like the positive
    class) and the `threshold` between the classes."""

    keep: torch.Tensor
    scores: torch.Tensor
    threshold: float
    spread: float

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "spread": self.spread, "kept": int(self.keep.sum()),
                "dropped": int((~self.keep).sum())}


def keep_by_score(scores: torch.Tensor, positive: torch.Tensor, fit_rows: torch.Tensor | None = None, *,
                  filter_positive: bool = True, filter_negative: bool = True, margin: float = 0.0) -> FilterResult:
    """The judge's keep rule on per-row scores (higher = more like the positive class).

    The threshold t is the midpoint of the two classes' median scores over `fit_rows` (default: all rows) —
    the pooled median when the classes are balanced, and not pulled toward the larger class when they are
    not; s is the pooled within-class standard deviation. A positive row is kept when its score is above
    t + margin·s, a negative row when it is below t − margin·s; a side not filtered keeps every row.
    """
    scores = scores.double()
    positive = positive.bool()
    fit = torch.ones_like(positive) if fit_rows is None else fit_rows.bool()
    pos, neg = scores[positive & fit], scores[~positive & fit]
    if len(pos) == 0 or len(neg) == 0:
        raise SteerableError("the filter needs rows of both classes to place its threshold")
    if not (math.isfinite(margin) and margin >= 0):
        raise SteerableError(f"the filter margin must be a finite number >= 0, got {margin}")
    t = float((pos.quantile(0.5) + neg.quantile(0.5)) / 2)
    var = ((pos - pos.mean()).pow(2).sum() + (neg - neg.mean()).pow(2).sum()) / max(len(pos) + len(neg) - 2, 1)
    s = float(var.sqrt())
    keep = torch.where(positive, (scores > t + margin * s) | (not filter_positive),
                       (scores < t - margin * s) | (not filter_negative))
    return FilterResult(keep, scores.float(), t, s)


def first_pass_direction(x: torch.Tensor, positive: torch.Tensor, fit_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Unit mean(positive rows) − mean(negative rows) over `fit_rows`: the projection judge's direction."""
    fit = torch.ones_like(positive.bool()) if fit_rows is None else fit_rows.bool()
    pos, neg = x[positive.bool() & fit].double(), x[~positive.bool() & fit].double()
    if len(pos) == 0 or len(neg) == 0:
        raise SteerableError("the projection filter needs rows of both classes")
    v = pos.mean(0) - neg.mean(0)
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise SteerableError("the projection filter's direction is zero: both classes have the same mean")
    return (v / norm).float()


def projection_filter(x: torch.Tensor, positive: torch.Tensor, fit_rows: torch.Tensor | None = None,
                      **rule: Any) -> FilterResult:
    """The projection judge: each row's projection on the first-pass mean-difference direction (fitted on
    `fit_rows`), kept or dropped by `keep_by_score` (`rule`: filter_positive, filter_negative, margin).

    The direction is fitted on the very answers it judges, so it can only sharpen a difference the answers
    already show: it drops the answers that sit on the wrong side of the classes' midpoint (an answer to a
    trait prompt that reads like the opposite's, a role answer that reads like the Assistant's)."""
    return keep_by_score(x.double() @ first_pass_direction(x, positive, fit_rows).double(), positive, fit_rows,
                         **rule)


def default_filter_layer(n_layers: int) -> int:
    """The layer the projection filter reads unless told: the middle one."""
    return n_layers // 2


def default_cap_layers(n_layers: int) -> list[int]:
    """The Assistant Axis paper caps ~12–20 % of layers in the upper middle: ~15 % starting at 55 % depth."""
    start = round(0.55 * n_layers)
    return list(range(start, min(n_layers, start + max(1, round(0.15 * n_layers)))))


def monitor_layer(ds: DirectionSet) -> int:
    """The middle-half layer (25–75 % depth) whose held-out Cohen's d separates Assistant from roles best."""
    n = int(ds.meta.get("model", {}).get("n_layers", max(ds.layers) + 1))
    middle = [i for i, layer in enumerate(ds.layers) if n / 4 <= layer <= 3 * n / 4] or list(range(len(ds.layers)))
    best = max(middle, key=lambda i: float(torch.nan_to_num(ds.cohens_d[i], nan=-1e9)))
    return ds.layers[best]


def fit_axis(handle: ModelHandle, data: AxisData, estimator: str = "assistant-axis",
             info: dict[str, Any] | None = None) -> DirectionSet:
    """The axis artifact: per-layer directions from the training questions, quality on the held-out ones,
    and the recommended monitor layer and cap layers in meta["axis"]."""
    if estimator not in AXIS_ESTIMATORS:
        raise SteerableError(f"unknown axis estimator {estimator!r}: use one of {', '.join(AXIS_ESTIMATORS)}")
    all_rows = torch.arange(len(data.rows))
    stats = {layer: data.stats(layer, all_rows, data.heldout) for layer in data.layers}
    n_tokens = 0  # response-means: token counts are not kept
    cap = CaptureResult(stats, data.site, "response-mean", len(data.rows), n_tokens)
    personas = sorted({r.persona for r in data.rows if r.persona})
    meta = artifact_meta(handle, {
        "source": "steerable role data (steerable/data/roles)", "n_examples": len(data.rows),
        "n_personas": len(personas), "n_questions": len({r.question_id for r in data.rows}),
        "heldout_rule": f"question index % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1}", **(info or {})})
    ds = directions_from_capture(cap, estimator, meta, fit=lambda layer, _st: data.fit(estimator, layer))
    ds.meta["axis"] = {
        "recipe": "mean(Assistant response-means) - mean(role vectors); positive class = Assistant",
        "estimator": estimator, "monitor_layer": monitor_layer(ds),
        "cap_layers": layer_ranges(default_cap_layers(handle.n_layers)),
    }
    return ds
