"""Rows decoded together over a KV cache, each under its own plan, tokens handed out per step.

`Engine.run` is dynamic batching: one batch of jobs, left-padded to its longest prompt and steered with
`steer(handle, rows=[...])`; a row's plan never changes another row's tokens, and an unsteered row gets
zero parameters. When rows finish (EOS, a stop string, max_tokens, a cancelled or timed-out request), they
leave the batch at once: the KV cache, mask and per-row state are cut down to the rows still running and
the steering session is rebuilt for them (CAST decisions carried over). No row joins a running batch
there; continuous batching (continuous.py) reuses the rows, `advance`, `finish` and `alone` defined here.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from steerable.errors import SteerableError
from steerable.evaluate.monitor import AxisMonitor
from steerable.models.batch import PromptBatch, pad_token_id, stop_token_ids
from steerable.models.load import ModelHandle
from steerable.serve.errors import ApiError
from steerable.serve.jobs import Delta, Done, Event, Failed, Job
from steerable.serve.metrics import Metrics
from steerable.serve.sampling import pick
from steerable.serve.text import TextStream
from steerable.steering.hooks import steer

log = logging.getLogger("steerable.serve")
Emit = Callable[[list[tuple[Job, Event]]], None]


@dataclass(eq=False)
class Row:
    index: int  # position in the batch as it started: the monitors' key
    job: Job
    text: TextStream
    generator: torch.Generator | None
    tokens: int = 0
    last: float | None = None  # when the previous token came
    finish: str | None = None  # "stop" / "length" once finished normally
    done: bool = False
    failure: ApiError | None = None
    ttft: list[float] = field(default_factory=list)
    sent: int = 0  # characters of text handed to the client so far
    skip: int = 0  # characters a rerun must not hand out again (the client has them already)
    seed_state: torch.Tensor | None = None  # the generator's starting state, so a rerun draws the same tokens

    @classmethod
    def start(cls, index: int, job: Job, tok: Any, skip: int = 0) -> Row:
        g = job.sampling.generator()
        return cls(index, job, TextStream(tok, job.stop), g, skip=skip,
                   seed_state=g.get_state() if g is not None else None)

    def again(self, tok: Any) -> Row:
        """A fresh row for the same job, drawing the same tokens, that suppresses the text already sent."""
        row = Row(0, self.job, TextStream(tok, self.job.stop), None, skip=max(self.sent, self.skip))
        if self.seed_state is not None:
            row.generator = torch.Generator(device="cpu")
            row.generator.set_state(self.seed_state)
            row.seed_state = self.seed_state
        return row

    def out(self, text: str) -> str:
        """The part of `text` (the next piece of the reply) the client has not received yet."""
        start = self.sent
        self.sent += len(text)
        if self.skip <= start:
            return text
        return text[self.skip - start:] if self.skip < self.sent else ""


class Engine:
    """Owns nothing but the handle; only the scheduler's single worker thread calls `run`."""

    def __init__(self, handle: ModelHandle, metrics: Metrics) -> None:
        self.handle = handle
        self.metrics = metrics
        self.eos = stop_token_ids(handle)
        self.pad = pad_token_id(handle)
        # the prefill needs only the last position's logits (what generate() asks for too, where supported)
        accepts = "logits_to_keep" in inspect.signature(handle.model.forward).parameters
        self.last_only = {"logits_to_keep": 1} if accepts else {}

    @torch.inference_mode()
    def run(self, jobs: Sequence[Job], emit: Emit) -> None:
        """Decode `jobs` as one batch. If the batch raises, every row still open is rerun alone: only the
        rows that fail alone fail (400 if their plan is at fault, 500 otherwise); the others complete with
        the tokens they would have had alone (the text a client already has is not sent twice)."""
        tok = self.handle.tokenizer
        rows = [Row.start(i, j, tok) for i, j in enumerate(jobs)]
        self.metrics.batch_started(len(rows))
        try:
            try:
                self._decode(rows, emit)
            except Exception as e:
                open_rows = [r for r in rows if not r.job.finished]
                log.warning("batch of %d rows failed (%s: %s); rerunning its %d open rows alone", len(rows),
                            type(e).__name__, e, len(open_rows))
                self.metrics.batch_failed()
                for r in open_rows:
                    self.alone(r, emit)
        finally:
            self.metrics.idle()

    @torch.inference_mode()
    def trial(self, job: Job) -> None:
        """Decode `job` alone and let any failure raise (start-up checks of presets and the default plan)."""
        self._decode([Row.start(0, job, self.handle.tokenizer)], lambda _events: None)

    def alone(self, row: Row, emit: Emit) -> None:
        job = row.job
        if job.cancelled:
            job.finished = True
            return
        again = row.again(self.handle.tokenizer)
        try:
            self._decode([again], emit)
        except Exception as e:
            fail_alone(job, e, emit)

    def _decode(self, rows: list[Row], emit: Emit) -> None:
        model = self.handle.model
        batch = PromptBatch.from_ids(self.handle, [r.job.prompt_ids for r in rows],
                                     [r.job.turns for r in rows] if any(r.job.turns for r in rows) else None)
        step_ids, mask, positions = batch.ids, batch.mask, batch.positions
        cache = DynamicCache(config=model.config)
        monitors = {r.job.monitor.key: AxisMonitor(r.job.monitor.vectors.direction(r.job.monitor.layer),
                                                   r.job.monitor.layer, r.job.monitor.site)
                    for r in rows if r.job.monitor is not None}
        decisions: dict = {}
        while rows:
            with contextlib.ExitStack() as stack:
                session = stack.enter_context(steer(self.handle, rows=[r.job.plan for r in rows], batch=batch))
                session.decisions = decisions
                for m in monitors.values():  # after steering's hooks: they read what steering left
                    stack.enter_context(m.watch(self.handle, [r.index for r in rows]))
                while True:
                    out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True, **self.last_only)
                    tokens = pick(out.logits[:, -1, :], [r.job.sampling for r in rows], [r.generator for r in rows])
                    if self.advance(rows, tokens, emit):
                        break
                    step_ids = torch.tensor(tokens, device=mask.device)[:, None]
                    mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                    positions = positions[:, -1:] + 1
                decisions = dict(session.decisions)
            # the monitors' sums are complete only once their hooks have come off
            self.finish([r for r in rows if r.done], monitors, emit)
            keep = [i for i, r in enumerate(rows) if not r.done]
            if not keep:
                break
            idx = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(idx)
            step_ids = torch.tensor([tokens[i] for i in keep], device=mask.device)[:, None]
            mask = torch.cat([mask[idx], mask.new_ones((len(keep), 1))], dim=1)
            positions = positions[idx][:, -1:] + 1
            decisions = {c: d[idx] for c, d in decisions.items()}
            batch = batch.select(idx)
            rows = [rows[i] for i in keep]

    def advance(self, rows: list[Row], tokens: list[int], emit: Emit) -> bool:
        """Take one step's tokens; True if any row finished (the batch then shrinks)."""
        now = time.monotonic()
        events: list[tuple[Job, Event]] = []
        ttft, itl = [], []
        generated = 0
        changed = False
        for r, t in zip(rows, tokens, strict=True):
            job = r.job
            if job.cancelled:
                r.done = changed = True
                continue
            if now > job.deadline:
                r.failure = ApiError(504, f"request timed out after {job.timeout:g} s", code="timeout",
                                     kind="timeout")
                r.done = changed = True
                continue
            generated += 1
            r.tokens += 1
            if r.last is None:
                ttft.append(now - job.created)
            else:
                itl.append(now - r.last)
            r.last = now
            if t in self.eos:
                r.finish = "stop"
            else:
                delta = r.out(r.text.push(t))
                if delta:
                    events.append((job, Delta(delta)))
                if r.text.stopped:
                    r.finish = "stop"
                elif r.tokens >= job.max_tokens:
                    r.finish = "length"
            if r.finish is not None:
                r.done = changed = True
        self.metrics.step(len(rows), generated, ttft, itl)
        if events:
            emit(events)
        return changed

    def finish(self, rows: list[Row], monitors: dict[tuple[str, int, str], AxisMonitor], emit: Emit) -> None:
        events: list[tuple[Job, Event]] = []
        ended: list[Job] = []
        for r in rows:
            job = r.job
            if job.finished:
                continue
            ended.append(job)  # marked finished only once its last event is out (a fault before: rerun)
            if r.failure is not None:
                events.append((job, Failed(r.failure)))
                continue
            if job.cancelled:
                continue  # nobody is listening
            tail = r.out(r.text.finish())
            if tail:
                events.append((job, Delta(tail)))
            report = None
            if job.monitor is not None:
                m = monitors[job.monitor.key]
                report = job.monitor.report(m.projection(r.index), m.tokens(r.index))
            events.append((job, Done(r.finish or "stop", len(job.prompt_ids), r.tokens, report)))
        if events:
            emit(events)
        for job in ended:
            job.finished = True


def fail_alone(job: Job, e: Exception, emit: Emit) -> None:
    """End `job` (once) with the error its own rerun raised, logged as a server fault or as its plan's."""
    if job.finished:
        return
    job.finished = True
    err = failure(e, job.plan is not None)
    if err.status >= 500:
        log.error("request %s failed while generating", job.request_id or "?", exc_info=(type(e), e, e.__traceback__))
    else:
        log.warning("request %s: its plan failed while generating: %s", job.request_id or "?", e)
    emit([(job, Failed(err))])


def failure(e: BaseException, has_plan: bool) -> ApiError:
    """What a row that failed alone is told: a 400 when its own plan is at fault, else a 500 (engine fault)."""
    if isinstance(e, ApiError):
        return e
    if has_plan and isinstance(e, SteerableError):
        return ApiError(400, f"steering: the plan cannot run on this request: {e}"[:1000], param="steering",
                        code="invalid_plan", kind="plan_failed")
    return ApiError(500, "internal error while generating", code="internal_error", kind="internal")
