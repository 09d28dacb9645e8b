"""A sweep on Ray actors: each actor holds the model once and runs whole groups (`sweeps.run.run_group`).

The driver reads the results file, hands out the groups (the baseline's first) and alone appends the lines
as groups finish (fsync per line), so the file is the same resumable JSONL as `run_sweep`'s: a driver
killed mid-sweep resumes when the same command runs again. Groups are the ones `run_sweep` would run and
each runs exactly as it would there, so with greedy decoding every line equals the single-process line
(its `seconds_per_config` aside; lines are written in the order groups finish).

The KLs of every group are read against the unsteered first-token table of the baseline's group, as in
one process: that table goes to the other actors as a Ray object they wait for only once their own
generation and scoring are done. An actor that dies takes its group with it: the group runs again on
another actor (a replacement is started), and nothing of it was written. Lines whose capability change
needs the baseline wait for the baseline's line.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from steerable.errors import SteerableError
from steerable.scale.ray_env import ActorPool, WorkerOptions, connect, remote_cause
from steerable.sweeps.grid import Config
from steerable.sweeps.records import SweepRecord, append_record, read_records
from steerable.sweeps.run import (
    Prepared,
    SweepSpec,
    check_plans,
    first_token_logprobs,
    pending_groups,
    prepare,
    run_group,
    with_baseline,
)
from steerable.train.adapter import load_adapted

log = logging.getLogger(__name__)

REFERENCE = -1  # the tag of the reference task (a scoring pass, when the baseline's line already exists)


class ReferenceLost(SteerableError):
    """The task that makes the KL reference failed; the group waiting for it must run again."""


class SweepWorker:
    """One Ray actor: the model, loaded once, with `threads` torch threads."""

    def __init__(self, model: str, threads: int, device: str | None, adapter: str | None = None) -> None:
        torch.set_num_threads(threads)
        self.handle = load_adapted(model, adapter, device=device)
        self.prepared: dict[str, Prepared] = {}  # the last sweep setting's, by its context

    def _prepared(self, spec: SweepSpec) -> Prepared:
        key = json.dumps(spec.context(self.handle), sort_keys=True, default=str)
        if key not in self.prepared:
            self.prepared = {key: prepare(self.handle, spec)}
        return self.prepared[key]

    def plan(self, spec: SweepSpec, done_keys: set[str]) -> tuple[Prepared, list[list[Config]]]:
        """The sweep's setting and its pending groups; every pending plan is checked here first."""
        prepared = self._prepared(spec)
        groups = pending_groups(spec, prepared.keys(spec), done_keys)
        check_plans(self.handle, spec, [c for g in groups for c in g])
        return prepared, groups

    def reference(self, spec: SweepSpec) -> torch.Tensor:
        kl_texts = [r["prompt"] for r in (spec.benign or spec.prompts)]
        return first_token_logprobs(self.handle, kl_texts, spec.score_batch_size)

    def run(self, spec: SweepSpec, group: list[Config], reference: list[Any],
            keep_reference: bool) -> tuple[list[SweepRecord], torch.Tensor | None]:
        """The group's lines (capability change against a baseline in the group only) and, when asked, the
        reference table it read its KLs against. `reference` holds the table's Ray object, or nothing."""
        import ray

        def resolve() -> torch.Tensor:
            try:
                return ray.get(reference[0])
            except ray.exceptions.RayError as e:
                raise ReferenceLost(f"the KL reference was lost: {type(e).__name__}") from None

        result = run_group(self.handle, spec, group, None, prepared=self._prepared(spec),
                           reference=resolve if reference else None)
        return result.records, result.reference if keep_reference else None


def run_sweep_ray(model: str, spec: SweepSpec, out: str | Path, *, address: str = "auto",
                  options: WorkerOptions | None = None, progress: bool = True,
                  on_dispatch: Callable[[int, Any], None] | None = None, adapter: str | None = None
                  ) -> list[SweepRecord]:
    """`run_sweep` on Ray: the same lines in `out`, each group on an actor that holds `model` (a built-in
    name or a directory every node can read, like `spec.vector`; with `adapter`, a `steerable train` directory
    every node can read, loaded on each actor's model). `on_dispatch(group, actor)` is told each
    time a group is handed to an actor. Returns every finished line of this setting, in grid order."""
    options = options or WorkerOptions()
    ray = connect(address, num_cpus=options.workers * options.threads)
    pool = ActorPool(ray, SweepWorker, (model, options.threads, options.device, adapter), options)
    try:
        return _drive(ray, pool, spec, out, progress, on_dispatch)
    except ray.exceptions.RayTaskError as e:
        raise remote_cause(ray, e) from None
    finally:
        pool.shutdown()


def _drive(ray: Any, pool: ActorPool, spec: SweepSpec, out: str | Path, progress: bool,
           on_dispatch: Callable[[int, Any], None] | None) -> list[SweepRecord]:
    on_file = read_records(out)
    prepared, groups = pool.call_any(lambda a: a.plan.remote(spec, {r.key for r in on_file}))
    keys = prepared.keys(spec)
    done = {r.key: r for r in on_file if r.key in keys}
    baseline = next((r for r in done.values() if r.is_baseline), None)
    expect_baseline = any(c.is_baseline for c in keys.values())
    needs_kl = any(not c.is_baseline and c not in spec.known_kl for g in groups for c in g)
    source: int | None = 0 if groups and any(c.is_baseline for c in groups[0]) else REFERENCE if needs_kl else None
    queue: deque[int] = deque(range(len(groups)))
    if source == REFERENCE:
        queue.appendleft(REFERENCE)
    reference: Any = None  # the Ray object of the KL reference, once its task is submitted
    table: Any = None  # the source task's own return of it
    waiting: list[SweepRecord] = []  # lines that need the baseline's line first
    bar = tqdm(total=len(keys), initial=len(done), desc="sweep", unit="config", disable=not progress)

    def write(rec: SweepRecord) -> None:
        if rec.key not in done:  # a group is never written twice
            append_record(out, rec)
            done[rec.key] = rec
            bar.update(1)

    while queue or pool.busy:
        while queue and pool.idle and (reference is not None or source is None or queue[0] == source):
            g = queue.popleft()
            if g == REFERENCE:
                actor, ref = pool.submit(lambda a: a.reference.remote(spec), g)
                table = reference = ref
            else:
                dep = [] if g == source or reference is None else [reference]
                actor, refs = pool.submit(_run_call(spec, groups[g], dep, g == source), g)
                if g == source:
                    table = reference = refs[1]
            if on_dispatch is not None:
                on_dispatch(g, actor)
        g, actor, ref = pool.next_done()
        try:
            records = ray.get(ref)
            if g == source:  # the table now lives with the driver, whatever happens to that actor's node
                reference = ray.put(ray.get(table))
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            if pool.is_dead(e):
                pool.lost(actor, e)
            elif not isinstance(e, ReferenceLost):
                raise
            log.warning("group %s did not finish (%s); it runs again", g, type(e).__name__)
            if g == source:
                reference = None
                queue.appendleft(g)
            else:
                queue.append(g)
            continue
        if g == REFERENCE:
            continue
        for rec in records:
            if baseline is None and rec.is_baseline:
                baseline = rec
        if baseline is None and expect_baseline:  # capability changes are read against it: those lines wait
            waiting += [r for r in records if r.capability is not None]
            ready = [r for r in records if r.capability is None]
        else:
            ready, waiting = [*waiting, *records], []
        for rec in ready:
            write(with_baseline(rec, baseline))
    bar.close()
    if waiting:
        raise SteerableError(f"{len(waiting)} lines wait for a baseline line that never came")
    return [done[k] for k in keys if k in done]


def _run_call(spec: SweepSpec, group: list[Config], reference: list[Any], keep: bool) -> Callable[[Any], Any]:
    return lambda actor: actor.run.options(num_returns=2).remote(spec, group, reference, keep)

