"""Batched generation (greedy by default), under one plan for every prompt or a plan per prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from steerable.errors import SteerableError
from steerable.models.load import Messages, ModelHandle
from steerable.models.turns import segment_batch
from steerable.steering.hooks import steer
from steerable.steering.plan import build_plan, build_row_plans


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
    **gen_kwargs: Any,
) -> list[str]:
    """Completions for `prompts` (chat-templated where the model has a template), in input order.

    `plan` steers every prompt; `plans` gives each prompt its own plan or None (unsteered). Rows of
    one batch run together whatever their plans; an unsteered row gets exactly its unsteered tokens.
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
        enc = handle.encode([texts[i] for i in idx])
        width = int(enc["input_ids"].shape[1])
        ctx = steer(handle, shared) if row_plans is None else steer(handle, rows=[row_plans[i] for i in idx])
        with ctx as session:
            if session.needs_turns:
                turn, asst, reply = segment_batch(handle, [prompts[i] for i in idx], system, width)
                session.begin(width, turn, asst, reply)
            else:
                session.begin(width)
            gen = handle.model.generate(**enc, **kwargs)
        new = gen[:, width:]
        for i, ids in zip(idx, new, strict=True):
            out[i] = tok.decode(ids, skip_special_tokens=True)
        bar.update(len(idx))
    bar.close()
    return out
