"""The bounded queue and the one worker thread that owns the model.

Handlers (on the event loop) `submit` prepared jobs; a full queue answers 429 at once. When the worker is
idle it waits for a job, then for more while they keep arriving (until none has come for `batch_window`,
at most 4 windows after the oldest), so clients that arrive together share one prefill. With continuous
batching (the default) it then admits waiting jobs between decoding steps, up to `max_batch` rows in all
(continuous.py); with dynamic batching it decodes the jobs it took as one batch and takes more only when
that batch has ended (engine.py). Events go back to the event loop in one `call_soon_threadsafe` per
decoding step, not one per token.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time

from steerable.serve.config import Limits
from steerable.serve.continuous import ContinuousBatch
from steerable.serve.engine import Engine
from steerable.serve.errors import ApiError
from steerable.serve.jobs import Event, Failed, Job
from steerable.serve.metrics import Metrics

log = logging.getLogger("steerable.serve")


class Scheduler:
    def __init__(self, engine: Engine, limits: Limits, metrics: Metrics) -> None:
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batch_seconds = 1.0  # running mean of batch durations, for Retry-After

    @property
    def depth(self) -> int:
        return len(self._waiting)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="steerable-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._waiting) >= self.limits.max_queue:
                retry = max(1, min(60, math.ceil(self._batch_seconds)))
                raise ApiError(429, f"the server is busy: {len(self._waiting)} requests are waiting "
                                    f"(limit {self.limits.max_queue}); retry in about {retry} s",
                               code="queue_full", kind="queue_full", headers={"Retry-After": str(retry)})
            self._waiting.append(job)
            self._cv.notify()

    def emit(self, items: list[tuple[Job, Event]]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed while we were decoding (shutdown)
            loop.call_soon_threadsafe(_deliver, items)

    def _take(self, room: int, wait: bool = True) -> list[Job]:
        """Up to `room` waiting jobs. `wait`: block until one comes, then gather a burst (the batch window);
        else take what is waiting now."""
        with self._cv:
            while wait and not self._waiting and not self._stopping:
                self._cv.wait()
            if self._stopping or not self._waiting or room < 1:
                return []
            # a burst of clients is admitted one request at a time: keep the batch open while they keep
            # coming (a quiet period of `batch_window`), but never hold the oldest for more than 4 windows
            window = self.limits.batch_window
            cap = self._waiting[0].created + 4 * window
            while wait and len(self._waiting) < room and not self._stopping:
                left = min(self._waiting[-1].created + window, cap) - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            jobs = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        now = time.monotonic()
        ready = []
        for job in jobs:
            if job.cancelled:
                job.finished = True
            elif now > job.deadline:
                job.finished = True
                self.emit([(job, Failed(ApiError(504, f"request timed out after {job.timeout:g} s in the queue",
                                                 code="timeout", kind="timeout")))])
            else:
                ready.append(job)
        return ready

    def _work(self) -> None:
        if self.limits.batching == "dynamic":
            self._work_dynamic()
        else:
            self._work_continuous()
        with self._cv:
            left = list(self._waiting)
            self._waiting.clear()
        err = ApiError(503, "the server is shutting down", code="shutting_down", kind="shutdown")
        self.emit([(j, Failed(err)) for j in left])


    def _work_dynamic(self) -> None:
        while True:
            jobs = self._take(self.limits.max_batch)
            if self._stopping:
                break
            if not jobs:
                continue
            t = time.monotonic()
            self.engine.run(jobs, self.emit)
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - t)

    def _work_continuous(self) -> None:
        batch = ContinuousBatch(self.engine, self.emit)
        try:
            while True:
                running = len(batch)
                # the running rows finish (a step each) once stopping; nothing new joins them
                jobs: list[Job] = []
                if batch.can_join and not (self._stopping and running):
                    jobs = self._take(self.limits.max_batch - running, wait=running == 0)
                try:
                    if jobs:
                        batch.admit(jobs)
                    if self._stopping and not len(batch):
                        break
                    batch.step()
                except Exception:  # a fault of the batching itself: answer everyone, keep serving
                    log.exception("continuous batching failed; its %d rows get a 500", len(batch) + len(jobs))
                    batch.abort(jobs)
                self._batch_seconds = batch.request_seconds
        finally:
            batch.close()
            self.engine.metrics.idle()


def _deliver(items: list[tuple[Job, Event]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)
