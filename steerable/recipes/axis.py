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
from typing import Any

from steerable.data import roles
from steerable.data.jsonl import read_jsonl_numbered
from steerable.data.roles import Persona, Question
from steerable.directions.artifact import DirectionSet
from steerable.directions.axis import AXIS_ESTIMATORS, AxisData, RoleRow, capture_axis_data, fit_axis, role_rows
from steerable.directions.axis_report import layer_agreement, stability
from steerable.errors import DataError, SteerableError
from steerable.generation import generate
from steerable.models.load import ModelHandle

log = logging.getLogger(__name__)


def answer(handle: ModelHandle, rows: Sequence[RoleRow], *, max_new_tokens: int = 48, batch_size: int = 16,
           progress: bool = True) -> list[RoleRow]:
    """Greedy answers; rows whose answer is empty are dropped (they have no response-mean)."""
    texts = generate(handle, [r.messages() for r in rows], max_new_tokens=max_new_tokens, batch_size=batch_size,
                     progress=progress)
    kept = [dataclasses.replace(r, response=t) for r, t in zip(rows, texts, strict=True) if t.strip()]
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
) -> AxisResult:
    """Estimate the Assistant Axis on `handle`.

    Without `responses`, `per_persona` questions per persona (default: every training persona and question;
    an int takes the first N) are answered greedily and `on_answers` is called with the answers before
    anything else runs (the CLI saves them there, so a failed fit can be rerun without generating).
    `responses` (answers, or a `.responses.jsonl` path) skips generation. `info` is added to the
    artifact's metadata. `bootstrap` resamples for the stability report (0: none).
    """
    if estimator not in AXIS_ESTIMATORS:
        raise SteerableError(f"unknown axis estimator {estimator!r}: use one of {', '.join(AXIS_ESTIMATORS)}")
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
    ds = fit_axis(handle, data, estimator,
                  {"per_persona": per_persona, "max_new_tokens": max_new_tokens, **(info or {})})
    agreement = layer_agreement(data, progress=progress)
    report: dict[str, Any] = {"model": handle.name, "estimator": estimator, "axis": ds.meta["axis"],
                              "layers": agreement}
    if bootstrap > 0:
        report["stability"] = stability(data, ds.meta["axis"]["monitor_layer"], bootstrap=bootstrap,
                                        progress=progress)
    return AxisResult(ds, rows, report, data)


__all__ = ["AxisResult", "answer", "estimate_axis", "read_responses"]
