"""Batched generation (greedy by default), under one plan for every prompt or a plan per prompt."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from steerable.errors import SteerableError
from steerable.models.batch import PromptBatch
from steerable.models.load import Messages, ModelHandle
from steerable.steering.hooks import steer
from steerable.steering.plan import build_plan, build_row_plans


class Watcher(Protocol):
    """Something that reads activations while `generate` decodes, e.g. evaluate.monitor.AxisMonitor."""

    def watch(self, handle: ModelHandle, rows: list[int]) -> AbstractContextManager[None]: ...


class _FirstStep(LogitsProcessor):
    """Keeps the log-probabilities of the first decoding step; changes nothing."""

    def __init__(self) -> None:
        self.logprobs: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        if self.logprobs is None:
            self.logprobs = scores.float().log_softmax(-1)
        return scores


@torch.inference_mode()
def generate(
    handle: ModelHandle,
    prompts: Sequence[str | Messages],
    plan: Any = None,
    *,
    plans: Sequence[Any] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    system: str | None = None,
    progress: bool = False,
    on_first_step: Callable[[list[int], torch.Tensor], None] | None = None,
    monitor: Watcher | None = None,
    **gen_kwargs: Any,
) -> list[str]:
    """Completions for `prompts` (chat-templated where the model has a template), in input order.

    `plan` steers every prompt; `plans` gives each prompt its own plan or None (unsteered). Rows of
    one batch run together whatever their plans; an unsteered row gets exactly its unsteered tokens.
    `on_first_step(rows, logprobs)` receives, per batch, the input indices and the [B, V] float32
    log-probabilities of the first generated token as decoding scores them — a free look at each
    prompt's next-token distribution (sweeps take their KL from it). `monitor` (an `AxisMonitor`) records
    each reply's mean projection on an axis as it is generated, keyed by input index.
    """
    if plans is not None and plan is not None:
        raise SteerableError("give `plan` (one for all prompts) or `plans` (one per prompt), not both")
    if plans is not None and len(plans) != len(prompts):
        raise SteerableError(f"{len(plans)} plans for {len(prompts)} prompts")
    shared = build_plan(plan, handle) if plans is None else None
    row_plans = build_row_plans(handle, plans) if plans is not None else None
    texts = [handle.render(p, system) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    out: list[str] = [""] * len(texts)
    tok = handle.tokenizer
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
              "eos_token_id": tok.eos_token_id, **gen_kwargs}
    if not kwargs["do_sample"]:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    bar = tqdm(total=len(texts), desc="generate", unit="prompt", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = PromptBatch.encode(handle, [prompts[i] for i in idx], system, rendered=[texts[i] for i in idx])
        ctx = (steer(handle, shared, batch=batch) if row_plans is None
               else steer(handle, rows=[row_plans[i] for i in idx], batch=batch))
        with ctx:
            first = _FirstStep()
            extra = {"logits_processor": LogitsProcessorList([first])} if on_first_step else {}
            # attached after the steering hooks, so the monitor reads the activations steering left
            with monitor.watch(handle, list(idx)) if monitor is not None else contextlib.nullcontext():
                gen = handle.model.generate(input_ids=batch.ids, attention_mask=batch.mask, **kwargs, **extra)
        if on_first_step is not None and first.logprobs is not None:
            on_first_step(list(idx), first.logprobs)
        new = gen[:, batch.width:]
        for i, ids in zip(idx, new, strict=True):
            out[i] = tok.decode(ids, skip_special_tokens=True)
        bar.update(len(idx))
    bar.close()
    return out
