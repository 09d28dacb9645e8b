"""The Assistant Axis recipe (methods.md §3) as one library call: pick personas and questions from the role
data, let the model answer them greedily (or reuse earlier answers), capture the answers' response-means,
fit the axis and report how much to trust it. `steerable axis` is this function plus file writing.

The recipe lives here, not in directions/, because it generates text (stage 5) before it estimates (stage 3).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from steerable.data import roles
from steerable.data.jsonl import read_jsonl_numbered
from steerable.data.roles import Persona, Question
from steerable.directions.artifact import DirectionSet
from steerable.directions.axis import (
    AXIS_ESTIMATORS,
    FILTERS,
    AxisData,
    RoleRow,
    capture_axis_data,
    default_filter_layer,
    fit_axis,
    projection_filter,
    role_rows,
)
from steerable.directions.axis_report import layer_agreement, stability
from steerable.errors import DataError, SteerableError
from steerable.generation import generate
from steerable.models.load import Messages, ModelHandle

log = logging.getLogger(__name__)


class AnswerRow(Protocol):
    """A row to answer: a dataclass with the chat to answer and a `response` field (role rows, persona rows)."""

    @property
    def response(self) -> str: ...

    def messages(self) -> Messages: ...


R = TypeVar("R", bound=AnswerRow)


def answer(handle: ModelHandle, rows: Sequence[R], *, max_new_tokens: int = 48, batch_size: int = 16,
           progress: bool = True) -> list[R]:
    """Greedy answers; rows whose answer is empty are dropped (they have no response-mean)."""
    texts = generate(handle, [r.messages() for r in rows], max_new_tokens=max_new_tokens, batch_size=batch_size,
                     progress=progress)
    kept = [dataclasses.replace(cast(Any, r), response=t) for r, t in zip(rows, texts, strict=True) if t.strip()]
    if len(kept) < len(rows):
        log.info("dropped %d of %d empty answers", len(rows) - len(kept), len(rows))
    return kept


def read_responses(path: str | Path) -> list[RoleRow]:
    """The answers of an earlier run (its `.responses.jsonl`: one `RoleRow.to_json()` per line); read like every
    JSONL input (a FIFO, bad bytes or bad JSON are DataErrors naming the line)."""
    out = []
    for line, row in read_jsonl_numbered(path, "responses file"):
        try:
            out.append(RoleRow(**row))
        except TypeError as e:
            raise DataError(f"{path}:{line}: not a row written by `steerable axis` ({e})") from None
    return out


@dataclass
class AxisResult:
    """What `estimate_axis` found: the axis artifact, the answers it was fitted on, and the report
    (`steerable axis` writes it as `.report.json`: model, estimator, meta["axis"], per-layer estimator
    cosines and, with bootstrap > 0, stability at the monitor layer)."""

    directions: DirectionSet
    rows: list[RoleRow]
    report: dict[str, Any]
    data: AxisData

    @property
    def monitor_layer(self) -> int:
        return int(self.directions.meta["axis"]["monitor_layer"])


def _pick(items: Sequence[Any] | int | None, default: Callable[[], list[Any]]) -> list[Any]:
    """None: every training item; an int N: the first N training items; a sequence: exactly those."""
    if items is None or isinstance(items, int):
        return default()[:items]
    return list(items)


def estimate_axis(
    handle: ModelHandle,
    *,
    estimator: str = "assistant-axis",
    personas: Sequence[Persona] | int | None = None,
    questions: Sequence[Question] | int | None = None,
    per_persona: int = 4,
    responses: Sequence[RoleRow] | str | Path | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    bootstrap: int = 20,
    info: Mapping[str, Any] | None = None,
    on_answers: Callable[[list[RoleRow]], None] | None = None,
    progress: bool = True,
    filter: str = "none",
    filter_layer: int | None = None,
    filter_margin: float = 0.0,
) -> AxisResult:
    """Estimate the Assistant Axis on `handle`.

    Without `responses`, `per_persona` questions per persona (default: every training persona and question;
    an int takes the first N) are answered greedily and `on_answers` is called with the answers before
    anything else runs (the CLI saves them there, so a failed fit can be rerun without generating).
    `responses` (answers, or a `.responses.jsonl` path) skips generation. `info` is added to the
    artifact's metadata. `bootstrap` resamples for the stability report (0: none).

    `filter="projection"` drops role answers that stay in the Assistant's character before fitting (the
    Assistant Axis paper keeps only answers a judge scores as playing the role): each answer's response-mean
    at `filter_layer` (default: the middle layer) is projected on the first-pass mean difference
    Assistant − role of the training questions, and a role answer is kept only if it lies below the midpoint
    of the two classes' medians (by `filter_margin` pooled standard deviations); every Assistant answer is
    kept. Held-out questions' answers are filtered by the same rule. `"none"` (the default) keeps every answer.
    """
    if estimator not in AXIS_ESTIMATORS:
        raise SteerableError(f"unknown axis estimator {estimator!r}: use one of {', '.join(AXIS_ESTIMATORS)}")
    if filter not in FILTERS:
        raise SteerableError(f"unknown axis filter {filter!r}: use one of {', '.join(FILTERS)}")
    if filter_layer is not None and not 0 <= filter_layer < handle.n_layers:
        raise SteerableError(f"filter layer {filter_layer} is outside the model's layers 0-{handle.n_layers - 1}")
    if responses is not None:
        rows = read_responses(responses) if isinstance(responses, (str, Path)) else list(responses)
        log.info("reusing %d answers", len(rows))
    else:
        chosen = role_rows(_pick(personas, lambda: roles.personas("train")),
                           _pick(questions, lambda: roles.questions("train")), per_persona)
        log.info("answering %d role rows (max %d new tokens)", len(chosen), max_new_tokens)
        rows = answer(handle, chosen, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        if on_answers is not None:
            on_answers(rows)
    data = capture_axis_data(handle, rows, batch_size=batch_size, progress=progress)
    filtered: dict[str, Any] = {"method": "none"}
    if filter == "projection":
        layer = default_filter_layer(handle.n_layers) if filter_layer is None else filter_layer
        res = projection_filter(data.x(layer), data.is_assistant, ~data.heldout, filter_positive=False,
                                margin=filter_margin)
        dropped = [r for r, k in zip(data.rows, res.keep.tolist(), strict=True) if not k]
        filtered = {"method": "projection", "layer": layer, "margin": filter_margin, **res.to_json(),
                    "dropped_rows": [f"{r.persona}/{r.question_id}" for r in dropped]}
        log.info("out-of-character filter (layer %d): dropped %d of %d role answers", layer, len(dropped),
                 int((~data.is_assistant).sum()))
        data = data.subset(res.keep)
        if not bool((~data.is_assistant).any()):
            raise SteerableError("the out-of-character filter dropped every role answer")
    ds = fit_axis(handle, data, estimator,
                  {"per_persona": per_persona, "max_new_tokens": max_new_tokens, **(info or {})})
    if filter != "none":
        ds.meta["axis"]["filter"] = {k: v for k, v in filtered.items() if k != "dropped_rows"}
    agreement = layer_agreement(data, progress=progress)
    report: dict[str, Any] = {"model": handle.name, "estimator": estimator, "axis": ds.meta["axis"],
                              "layers": agreement}
    if filter != "none":
        report["filter"] = filtered
    if bootstrap > 0:
        report["stability"] = stability(data, ds.meta["axis"]["monitor_layer"], bootstrap=bootstrap,
                                        progress=progress)
    return AxisResult(ds, rows, report, data)


__all__ = ["AxisResult", "answer", "estimate_axis", "read_responses"]
