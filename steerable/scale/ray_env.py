"""Ray, imported only when asked for, a driver's connection to a cluster, and a pool of actors that replaces
the ones that die.

Ray is the optional extra `steerable[ray]`; without it every entry point here raises a SteerableError saying
how to install it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from steerable.errors import SteerableError

log = logging.getLogger(__name__)

INSTALL = "pip install 'steerable[ray]'"
LOCAL = "local"  # `--ray local`: start a single-machine cluster in this process


def import_ray(purpose: str = "--ray") -> ModuleType:
    """The `ray` module, or a SteerableError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise SteerableError(f"{purpose} needs Ray, which is not installed ({e.name or e}); "
                             f"install it with: {INSTALL}") from None
    return ray


def connect(address: str = "auto", num_cpus: int | None = None) -> ModuleType:
    """Join a Ray cluster, or start one on this machine; returns the `ray` module.

    `address`: "auto" (the cluster `ray start` left running on this machine, or RAY_ADDRESS), "local" (start
    one in this process with `num_cpus` CPUs and no dashboard; Ray's own processes stop with it), or a
    cluster address ("HOST:PORT", "ray://HOST:PORT"). A process already connected stays on its cluster.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    try:
        if address == LOCAL:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise SteerableError(f"no Ray cluster at {address!r} ({e}); start one with `ray start --head` "
                             "or use --ray local") from None
    return ray


def remote_cause(ray: ModuleType, e: BaseException) -> BaseException:
    """The exception raised inside a task, when it is one of ours (so the CLI reports it in one line)."""
    cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
    return cause if isinstance(cause, SteerableError) else e


@dataclass(frozen=True)
class WorkerOptions:
    """How many actors, and what each reserves."""

    workers: int = 2
    threads: int = 1  # torch threads per actor; also the CPUs Ray reserves for it
    gpus: float = 0.0  # GPUs per actor (the model goes to "cuda" when > 0)
    max_deaths: int | None = None  # actors that may die before the run gives up (default: 2 × workers)

    def check(self) -> None:
        if self.workers < 1 or self.threads < 1 or self.gpus < 0:
            raise SteerableError(f"workers and threads must be ≥ 1, gpus ≥ 0 (got {self})")

    @property
    def device(self) -> str | None:
        return "cuda" if self.gpus > 0 else None


class ActorPool:
    """`options.workers` actors of one class; a dead one is replaced (up to `max_deaths` times) and the
    caller resubmits what it was running. Tasks go to idle actors only: one task per actor at a time."""

    def __init__(self, ray: ModuleType, cls: type, args: tuple[Any, ...], options: WorkerOptions) -> None:
        options.check()
        self.ray = ray
        self._remote = ray.remote(cls).options(num_cpus=options.threads, num_gpus=options.gpus)
        self._args = args
        self.max_deaths = 2 * options.workers if options.max_deaths is None else options.max_deaths
        self.deaths = 0
        self.idle: list[Any] = [self._remote.remote(*args) for _ in range(options.workers)]
        self.busy: dict[Any, tuple[Any, Any]] = {}  # the ref we wait on → (actor, tag)

    def submit(self, call: Callable[[Any], Any], tag: Any, actor: Any = None) -> tuple[Any, Any]:
        """Run `call(actor)` (it returns the task's ref, or a list of refs: the first is waited on) on an idle
        actor (the given one, or the first); returns (actor, what call returned)."""
        actor = self.idle.pop(0 if actor is None else self.idle.index(actor))
        refs = call(actor)
        self.busy[refs[0] if isinstance(refs, list) else refs] = (actor, tag)
        return actor, refs

    def next_done(self) -> tuple[Any, Any, Any]:
        """Wait for one running task: (tag, actor, its ref). The actor is idle again unless `lost` is called."""
        [ref], _ = self.ray.wait(list(self.busy), num_returns=1)
        actor, tag = self.busy.pop(ref)
        self.idle.append(actor)
        return tag, actor, ref

    def lost(self, actor: Any, error: BaseException) -> None:
        """`actor` died (`error`): drop it and start a replacement. A SteerableError when it died starting
        (loading the model, say: a replacement would too) or once too many have died."""
        if getattr(error, "actor_init_failed", False):
            lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
            raise SteerableError(f"a Ray worker failed to start: {lines[-1] if lines else error}")
        self.idle = [a for a in self.idle if a != actor]
        self.deaths += 1
        if self.deaths > self.max_deaths:
            raise SteerableError(f"{self.deaths} Ray workers died (at most {self.max_deaths} allowed); giving up")
        log.warning("a Ray worker died (%d so far); starting a replacement, its work runs again", self.deaths)
        self.idle.append(self._remote.remote(*self._args))

    def call_any(self, call: Callable[[Any], Any]) -> Any:
        """The value of one call on any idle actor, again on another if its actor dies."""
        while True:
            self.submit(call, None)
            _, actor, ref = self.next_done()
            try:
                return self.ray.get(ref)
            except self.ray.exceptions.RayActorError as e:
                self.lost(actor, e)

    def is_dead(self, e: BaseException) -> bool:
        return isinstance(e, self.ray.exceptions.RayActorError)

    def shutdown(self) -> None:
        for actor in [*self.idle, *(a for a, _ in self.busy.values())]:
            self.ray.kill(actor)
        self.idle, self.busy = [], {}
