"""Batched generation (greedy by default), optionally under a steering plan."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from steerable.models.load import Messages, ModelHandle
from steerable.steering.hooks import steer


@torch.inference_mode()
def generate(
    handle: ModelHandle,
    prompts: Sequence[str | Messages],
    plan: Any = None,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    system: str | None = None,
    progress: bool = False,
    **gen_kwargs: Any,
) -> list[str]:
    """Completions for `prompts` (chat-templated where the model has a template), in input order."""
    texts = [handle.render(p, system) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    out: list[str] = [""] * len(texts)
    tok = handle.tokenizer
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
              "eos_token_id": tok.eos_token_id, **gen_kwargs}
    if not kwargs["do_sample"]:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    ctx = steer(handle, plan) if plan is not None else contextlib.nullcontext()
    bar = tqdm(total=len(texts), desc="generate", unit="prompt", disable=not progress, leave=False)
    with ctx:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = handle.encode([texts[i] for i in idx])
            gen = handle.model.generate(**enc, **kwargs)
            new = gen[:, enc["input_ids"].shape[1] :]
            for i, ids in zip(idx, new, strict=True):
                out[i] = tok.decode(ids, skip_special_tokens=True)
            bar.update(len(idx))
    bar.close()
    return out
