"""Choosing each row's next token: greedy (temperature 0, the default) or sampled with its own generator,
so a seeded request draws the same tokens whatever else is in its batch."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device="cpu")
        g.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return g


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from a [V] row of logits at `sampling.temperature`, nucleus-filtered to `top_p`."""
    x = logits.double().cpu()  # float64: a temperature as small as 5e-324 is not 0 here
    # shifted so that the largest logit is 0: a tiny temperature then sharpens towards greedy instead of
    # overflowing to inf (and NaN probabilities)
    probs = torch.softmax((x - x.max()) / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_p.cumsum(-1) - sorted_p >= sampling.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def pick(logits: torch.Tensor, samplings: Sequence[Sampling],
         generators: Sequence[torch.Generator | None]) -> list[int]:
    """Next token per row of [B, V] logits."""
    out = logits.argmax(-1).tolist()
    for i, (s, g) in enumerate(zip(samplings, generators, strict=True)):
        if g is not None:
            out[i] = sample(logits[i], s, g)
    return out
