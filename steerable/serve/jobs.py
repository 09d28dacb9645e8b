"""A request admitted for generation, and the events the worker sends back to its handler."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from steerable.serve.errors import ApiError
from steerable.serve.monitor import MonitorSpec
from steerable.serve.sampling import Sampling
from steerable.steering.plan import SteeringPlan

Turns = tuple[list[int], list[bool], int]  # per prompt token: exchange, is-assistant; the reply's exchange


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    monitor: dict[str, Any] | None = None


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Delta | Done | Failed


@dataclass(eq=False)
class Job:
    """Everything the worker needs, prepared (tokenised, plan checked) before the job is queued.

    `cancelled` is written by the event loop (client gone, deadline passed) and read by the worker between
    decoding steps; a plain attribute is enough, as a step late is harmless.
    """

    prompt_ids: list[int]
    plan: SteeringPlan | None
    max_tokens: int
    stop: tuple[str, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    monitor: MonitorSpec | None = None
    turns: Turns | None = None
    timeout: float = 300.0
    created: float = field(default_factory=time.monotonic)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: str | None = None
    finished: bool = False
    request_id: str = ""  # the response's id, for the log

    @property
    def deadline(self) -> float:
        return self.created + self.timeout

    def cancel(self, reason: str) -> bool:
        """Mark the job cancelled; False if it had already finished or been cancelled."""
        if self.finished or self.cancelled:
            return False
        self.cancelled = reason
        return True
