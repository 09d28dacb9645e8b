"""Continuous batching: requests join the running batch at its next decoding step and leave as they finish.

Newcomers are prefilled together, apart from the running rows, under their own plans and their own prompt
boundary (a steering session over their `PromptBatch`, which also decides their CAST conditions); their KV
cache is then joined to the running batch's (kv_merge.py: the shorter side left-padded, masks padded with
zeros, positions carried per row). The running batch is decoded under one steering session with a plan
per row, told where each row's own prompt ended (`Session.begin(..., ends=...)`), so the `prompt`,
`generated` and `first:K` gates count each row's tokens from its own boundary, and its CAST decisions are
carried per row. A row's tokens therefore do not depend on when it joined or on what else runs: with
greedy decoding a response equals the same request served alone.

If a newcomers' prefill raises, each of them is prefilled alone (only those that fail alone fail); if a
decoding step raises, every open row is rerun alone from its prompt, as in dynamic batching (engine.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from steerable.evaluate.monitor import AxisMonitor
from steerable.models.batch import PromptBatch
from steerable.serve import kv_merge
from steerable.serve.engine import Emit, Engine, Row, fail_alone, failure
from steerable.serve.jobs import Event, Failed, Job
from steerable.serve.sampling import pick
from steerable.steering.cast import CastCondition
from steerable.steering.hooks import steer

log = logging.getLogger("steerable.serve")


@dataclass(eq=False)
class Rows:
    """Rows being decoded together and their aligned state; `mask` includes the column of `step_ids`."""

    rows: list[Row]
    cache: DynamicCache
    mask: torch.Tensor  # [B, S+1]: S cached columns and the one being fed
    positions: torch.Tensor  # [B, 1]: position id of the token being fed
    step_ids: torch.Tensor  # [B, 1]: the token being fed (each row's last generated token)
    ends: list[int]  # per row: the cache column where its prompt ended (its first generated token's column)
    decisions: dict[CastCondition, torch.Tensor]  # per condition: [B, 1, 1] 0/1

    def select(self, keep: list[int]) -> None:
        """Keep rows `keep` (indices), then drop the cache columns no remaining row attends to."""
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.positions, self.step_ids = self.mask[idx], self.positions[idx], self.step_ids[idx]
        self.decisions = {c: d[idx] for c, d in self.decisions.items()}
        self.rows = [self.rows[i] for i in keep]
        self.ends = [self.ends[i] for i in keep]
        first = int(self.mask.long().argmax(dim=1).min())  # the first column any row attends to
        if first > 0:
            kv_merge.drop_left(self.cache, first)
            self.mask = self.mask[:, first:]
            self.ends = [e - first for e in self.ends]

    def join(self, other: Rows) -> None:
        """Append `other`'s rows: the shorter side is left-padded (cache, mask and prompt ends)."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        mine, theirs = width - self.mask.shape[1], width - other.mask.shape[1]
        kv_merge.join(self.cache, other.cache)
        self.mask = torch.cat([kv_merge.pad_left(self.mask, width, 1), kv_merge.pad_left(other.mask, width, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.step_ids = torch.cat([self.step_ids, other.step_ids])
        self.ends = [e + mine for e in self.ends] + [e + theirs for e in other.ends]
        n, m = len(self.rows), len(other.rows)
        ref = next(iter(self.decisions.values()), next(iter(other.decisions.values()), None))
        for c in {*self.decisions, *other.decisions}:
            a = self.decisions.get(c)
            b = other.decisions.get(c)
            # a row whose plan lacks condition c is never gated by it (its slots hold zeros): any value will do
            a = a if a is not None else ref.new_zeros(n, 1, 1)  # type: ignore[union-attr]
            b = b if b is not None else ref.new_zeros(m, 1, 1)  # type: ignore[union-attr]
            self.decisions[c] = torch.cat([a, b])
        self.rows += other.rows


class ContinuousBatch:
    """The running batch of the scheduler's worker thread: `admit` newcomers, `step` once, repeat."""

    def __init__(self, engine: Engine, emit: Emit) -> None:
        self.engine = engine
        self.emit = emit
        self.state: Rows | None = None
        self.monitors: dict[tuple[str, int, str], AxisMonitor] = {}
        self.request_seconds = 1.0  # running mean of admission-to-end times, for Retry-After
        self._session: contextlib.ExitStack | None = None  # the running rows' steering session and monitors
        self._counter = 0

    def __len__(self) -> int:
        return len(self.state.rows) if self.state is not None else 0

    @property
    def can_join(self) -> bool:
        """Whether newcomers may join now (a sliding-window cache cannot be joined: they wait for the end)."""
        return self.state is None or kv_merge.joinable(self.state.cache)

    def close(self) -> None:
        """Take the running rows' hooks off (monitors' sums are complete once they are)."""
        if self._session is not None:
            session, self._session = self._session, None
            session.close()

    def abort(self, jobs: Sequence[Job] = ()) -> None:
        """After a fault of the batching itself (not of a row's plan or a forward pass, which `admit` and
        `step` handle): every running row and each of `jobs` not yet finished gets a 500; the batch is empty."""
        self.close()
        rows = self.state.rows if self.state is not None else []
        self.state = None
        err = failure(RuntimeError("continuous batching failed"), False)
        events: list[tuple[Job, Event]] = []
        for job in [r.job for r in rows] + list(jobs):
            if not job.finished:
                job.finished = True
                events.append((job, Failed(err)))
        if events:
            self.emit(events)
        self._gauge()

    # -- admission -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, jobs: Sequence[Job]) -> None:
        """Prefill `jobs` under their own plans and join them to the running rows."""
        tok = self.engine.handle.tokenizer
        rows = [Row.start(self._index(), j, tok) for j in jobs]
        self.engine.metrics.batch_started(len(rows))
        self.close()  # the newcomers' prefill runs under their own session only
        try:
            parts = [self._prefill(rows)]
        except Exception as e:
            if len(rows) == 1:
                self._fail(rows[0], e)
                parts = []
            else:
                log.warning("prefill of %d joining rows failed (%s: %s); prefilling each alone", len(rows),
                            type(e).__name__, e)
                self.engine.metrics.batch_failed()
                parts = [self._prefill_alone(r) for r in rows if not r.job.finished]
        for part in parts:
            if part is None:
                continue
            if self.state is None:
                self.state = part
            else:
                self.state.join(part)
        self._gauge()

    def _prefill_alone(self, row: Row) -> Rows | None:
        again = row.again(self.engine.handle.tokenizer)
        again.index = self._index()
        try:
            return self._prefill([again])
        except Exception as e:
            self._fail(again, e)
            return None

    def _fail(self, row: Row, e: Exception) -> None:
        fail_alone(row.job, e, self.emit)

    def _prefill(self, rows: list[Row]) -> Rows | None:
        """Run the prompts of `rows` (their first generated token); None if they all finished at once."""
        engine, handle = self.engine, self.engine.handle
        batch = PromptBatch.from_ids(handle, [r.job.prompt_ids for r in rows],
                                     [r.job.turns for r in rows] if any(r.job.turns for r in rows) else None)
        cache = DynamicCache(config=handle.model.config)
        self._add_monitors(rows)
        with contextlib.ExitStack() as stack:
            session = stack.enter_context(steer(handle, rows=[r.job.plan for r in rows], batch=batch))
            for m in self.monitors.values():  # after steering's hooks: they read what steering left
                stack.enter_context(m.watch(handle, [r.index for r in rows]))
            out = handle.model(**batch.inputs(), past_key_values=cache, use_cache=True, **engine.last_only)
            tokens = pick(out.logits[:, -1, :], [r.job.sampling for r in rows], [r.generator for r in rows])
            decisions = dict(session.decisions)
        part = Rows(rows, cache, torch.cat([batch.mask, batch.mask.new_ones((len(rows), 1))], dim=1),
                    batch.positions[:, -1:] + 1, torch.tensor(tokens, device=batch.mask.device)[:, None],
                    [batch.width] * len(rows), decisions)
        changed = engine.advance(rows, tokens, self.emit)
        return self._settle(part) if changed else part

    # -- decoding ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One decoding step of every running row; finished rows leave at once."""
        state = self.state
        if state is None:
            return
        engine, handle = self.engine, self.engine.handle
        try:
            if self._session is None:
                self._open(state)
            out = handle.model(input_ids=state.step_ids, attention_mask=state.mask, position_ids=state.positions,
                               past_key_values=state.cache, use_cache=True, **engine.last_only)
            rows = state.rows
            tokens = pick(out.logits[:, -1, :], [r.job.sampling for r in rows], [r.generator for r in rows])
            changed = engine.advance(rows, tokens, self.emit)
        except Exception as e:
            self.close()
            self.state = None
            open_rows = [r for r in state.rows if not r.job.finished]
            log.warning("a decoding step of %d rows failed (%s: %s); rerunning its %d open rows alone",
                        len(state.rows), type(e).__name__, e, len(open_rows))
            engine.metrics.batch_failed()
            for r in open_rows:
                engine.alone(r, self.emit)
            self._gauge()
            return
        state.step_ids = torch.tensor(tokens, device=state.mask.device)[:, None]
        state.mask = torch.cat([state.mask, state.mask.new_ones((len(rows), 1))], dim=1)
        state.positions = state.positions + 1
        if changed:
            self.close()
            self.state = self._settle(state)
            self._gauge()

    def _open(self, state: Rows) -> None:
        handle = self.engine.handle
        n, dev = len(state.rows), state.mask.device
        stack = contextlib.ExitStack()
        try:
            session = stack.enter_context(steer(handle, rows=[r.job.plan for r in state.rows]))
            reply = [r.job.turns[2] if r.job.turns is not None else 0 for r in state.rows]
            # every position fed from now on is a generated one: no prompt columns, each row's own boundary
            session.begin(0, torch.zeros(n, 0, dtype=torch.long, device=dev),
                          torch.zeros(n, 0, dtype=torch.bool, device=dev), torch.tensor(reply, device=dev),
                          ends=torch.tensor(state.ends, device=dev))
            session.decisions = state.decisions
            for m in self.monitors.values():
                stack.enter_context(m.watch(handle, [r.index for r in state.rows]))
        except BaseException:
            stack.close()
            raise
        self._session = stack

    def _settle(self, state: Rows) -> Rows | None:
        """Answer the finished rows and keep the others (the monitors' hooks must be off)."""
        done = [r for r in state.rows if r.done]
        self.engine.finish(done, self.monitors, self.emit)
        now = time.monotonic()
        for r in done:
            self.request_seconds = 0.8 * self.request_seconds + 0.2 * (now - r.job.created)
            for m in self.monitors.values():
                m.sums.pop(r.index, None)
                m.counts.pop(r.index, None)
        keep = [i for i, r in enumerate(state.rows) if not r.done]
        if not keep:
            return None
        state.select(keep)
        return state

    def _add_monitors(self, rows: list[Row]) -> None:
        for r in rows:
            spec = r.job.monitor
            if spec is not None and spec.key not in self.monitors:
                self.monitors[spec.key] = AxisMonitor(spec.vectors.direction(spec.layer), spec.layer, spec.site)

    def _gauge(self) -> None:
        """Update the running-rows gauge, and forget the monitors no running row uses."""
        rows = self.state.rows if self.state is not None else []
        used = {r.job.monitor.key for r in rows if r.job.monitor is not None}
        self.monitors = {k: m for k, m in self.monitors.items() if k in used}
        if self.state is None:
            self.engine.metrics.idle()
        else:
            self.engine.metrics.running.set(len(self.state.rows))

    def _index(self) -> int:
        self._counter += 1
        return self._counter
