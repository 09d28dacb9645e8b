"""Calibration on Ray actors: the examples' batches are sharded over actors that each hold the model once, and
their streaming statistics merge exactly into the single-process capture.

The driver batches the examples exactly as `calibrate` does (`batch_examples`), hands out chunks of those
batches, and each actor accumulates what it captured (`capture_batches`: held-out fold and reservoir keys
come from each example's index in the whole set, never from the shard). At the end every actor returns its
statistics once and the driver merges them (`merge_captures`: counts and sums add, reservoirs are bottom-k
samples by key) and estimates the directions from the merged statistics — the same artifact as one process
(to float64 rounding of the sums), not an average of per-actor directions. An actor that dies loses what it
held: its chunks run again on the others and a replacement.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from steerable.capture.positions import check_position
from steerable.capture.run import Batch, CaptureResult, batch_examples, capture_batches
from steerable.capture.sites import check_site
from steerable.data.loaders import Example
from steerable.directions.artifact import DirectionSet
from steerable.directions.calibrate import (
    artifact_meta,
    calibration_data,
    directions_from_capture,
    merge_captures,
    model_meta,
)
from steerable.directions.estimators import get_estimator
from steerable.errors import SteerableError
from steerable.models.load import load_model
from steerable.scale.ray_env import ActorPool, WorkerOptions, connect, remote_cause
from steerable.steering.layer_spec import parse_layers

log = logging.getLogger(__name__)

CHUNKS_PER_WORKER = 4  # chunks of batches per actor: small enough to balance, few enough to stay cheap
FINISH = "finish"


class CalibrateWorker:
    """One Ray actor: the model, loaded once, and the statistics of the chunks it has captured so far."""

    def __init__(self, model: str, threads: int, device: str | None) -> None:
        torch.set_num_threads(threads)
        self.handle = load_model(model, device=device)
        self.held: list[CaptureResult] = []

    def describe(self) -> dict[str, Any]:
        return model_meta(self.handle)

    def capture(self, batches: list[Batch], layers: list[int], site: str, position: str, second_moments: bool) -> int:
        part = capture_batches(self.handle, batches, layers, site=site, position=position,
                               second_moments=second_moments, progress=False)
        self.held = [merge_captures([*self.held, part])]
        return part.n_examples

    def finish(self) -> CaptureResult | None:
        """What this actor holds (and it holds nothing after)."""
        out, self.held = (self.held[0] if self.held else None), []
        return out


def calibrate_ray(
    model: str,
    examples: Sequence[Example],
    *,
    estimator: str = "mean-diff",
    layers: Sequence[int] | str | None = None,
    site: str = "resid_post",
    position: str = "last",
    batch_size: int = 16,
    data: dict[str, Any] | None = None,
    address: str = "auto",
    options: WorkerOptions | None = None,
    progress: bool = True,
    on_dispatch: Callable[[int, Any], None] | None = None,
) -> DirectionSet:
    """`calibrate` on Ray actors that hold `model` (a built-in name or a directory every node can read).
    `layers` may be layer text ("4-20") read against the model's depth. `on_dispatch(chunk, actor)` is told
    each time a chunk of batches is handed to an actor."""
    est = get_estimator(estimator)
    check_site(site)
    check_position(position)
    if not examples:
        raise SteerableError("no calibration examples")
    options = options or WorkerOptions()
    ray = connect(address, num_cpus=options.workers * options.threads)
    pool = ActorPool(ray, CalibrateWorker, (model, options.threads, options.device), options)
    try:
        info = pool.call_any(lambda a: a.describe.remote())
        n = int(info["n_layers"])
        chosen = list(range(n)) if layers is None else list(
            parse_layers(layers, n, range(n)) if isinstance(layers, str) else layers)
        batches = batch_examples(examples, batch_size)
        n_chunks = min(len(batches), options.workers * CHUNKS_PER_WORKER)
        chunks = [batches[i::n_chunks] for i in range(n_chunks)]  # batches come sorted by length: interleave
        cap = _capture(ray, pool, chunks, (chosen, site, position, est.second_moments), progress, on_dispatch,
                       len(examples))
    except ray.exceptions.RayTaskError as e:
        raise remote_cause(ray, e) from None
    finally:
        pool.shutdown()
    return directions_from_capture(cap, estimator, artifact_meta(info, calibration_data(examples, data)))


def _capture(ray: Any, pool: ActorPool, chunks: list[list[Batch]], how: tuple[Any, ...], progress: bool,
             on_dispatch: Callable[[int, Any], None] | None, total: int) -> CaptureResult:
    queue: deque[int] = deque(range(len(chunks)))
    held: dict[Any, list[int]] = {}  # actor → the chunks whose statistics it holds
    parts: list[CaptureResult] = []
    bar = tqdm(total=total, desc="capture (ray)", unit="ex", disable=not progress, leave=False)
    while True:
        while queue and pool.idle:
            c = queue.popleft()
            actor, _ = pool.submit(_capture_call(chunks[c], how), c)
            if on_dispatch is not None:
                on_dispatch(c, actor)
        if not queue and not pool.busy:
            holders = [a for a in pool.idle if held.get(a)]
            if not holders:
                break
            for a in holders:
                pool.submit(lambda actor: actor.finish.remote(), FINISH, actor=a)
        tag, actor, ref = pool.next_done()
        try:
            value = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            pool.lost(actor, e)
            lost = held.pop(actor, [])
            log.warning("a Ray worker died holding %d chunks; they run again", len(lost) + (tag != FINISH))
            queue.extend([*lost, *([] if tag == FINISH else [tag])])
            bar.update(-sum(len(b.examples) for c in lost for b in chunks[c]))
            continue
        if tag == FINISH:
            held.pop(actor, None)
            if value is not None:
                parts.append(value)
        else:
            held.setdefault(actor, []).append(tag)
            bar.update(value)
    bar.close()
    return merge_captures(parts)



def _capture_call(chunk: list[Batch], how: tuple[Any, ...]) -> Callable[[Any], Any]:
    return lambda actor: actor.capture.remote(chunk, *how)
