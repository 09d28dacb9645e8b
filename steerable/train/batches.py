"""SFT examples → token ids with the loss on response tokens only, right-padded batches, and the seeded order.

A prompt is rendered as generation renders it (the chat template with its generation prompt) and tokenised apart
from the response, so the boundary is exact: labels are −100 on prompt tokens and padding, the response's ids
elsewhere. The response ends with the tokenizer's end-of-sequence token, so the model learns where to stop.
Padding is on the right: with causal attention a real token never sees a pad, so a token's activations do not
depend on what it was batched with.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steerable.data.sft import SFTExample
from steerable.errors import DataError
from steerable.models.load import ModelHandle

IGNORE = -100


@dataclass(frozen=True)
class Tokenised:
    ids: list[int]
    n_prompt: int  # ids[:n_prompt] are the prompt's; the rest are the response's


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE off the response
    response: torch.Tensor  # [B, T] bool: positions of response tokens (the steering terms' tokens)
    rows: list[int]  # example indices

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def tokenise(handle: ModelHandle, examples: Sequence[SFTExample], max_length: int) -> list[Tokenised]:
    """Each example's ids, cut to `max_length` tokens from the right; an example left without a response token
    is a DataError naming it."""
    tok = handle.tokenizer
    eos = tok.eos_token or ""
    out = []
    for ex in examples:
        prompt = tok(handle.render(ex.prompt), add_special_tokens=not handle.has_chat_template)["input_ids"]
        response = tok(ex.response + eos, add_special_tokens=False)["input_ids"]
        ids = (list(prompt) + list(response))[:max_length]
        if len(ids) <= len(prompt):
            raise DataError(f"{ex.where}: the prompt alone is {len(prompt)} tokens, so no response token fits in "
                            f"--max-length {max_length}")
        out.append(Tokenised(ids, len(prompt)))
    return out


def collate(items: Sequence[Tokenised], rows: Sequence[int], pad_id: int, device: torch.device) -> Batch:
    width = max(len(t.ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t.ids)
        ids[i, :n] = torch.tensor(t.ids)
        mask[i, :n] = 1
        labels[i, t.n_prompt:n] = ids[i, t.n_prompt:n]
    return Batch(ids.to(device), mask.to(device), labels.to(device), (labels != IGNORE).to(device), list(rows))


def schedule(n_examples: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The example indices of every step: seeded shuffles of the whole set, one after another (epochs)."""
    if n_examples == 0:
        raise DataError("the SFT set has no examples")
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n_examples))
        rng.shuffle(epoch)
        order += epoch
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


__all__ = ["IGNORE", "Batch", "Tokenised", "collate", "schedule", "tokenise"]
