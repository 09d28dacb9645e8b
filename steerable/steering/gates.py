"""Token gating: which tokens of a forward pass an intervention touches.

Gate specs: "all", "prompt", "generated", "first:K" (the first K generated tokens), "assistant"
(tokens of assistant turns, including the reply being generated), "turns>=k" (tokens of
exchanges k, k+1, …; an exchange is a user message and the assistant reply to it, the system
prompt belongs to exchange 0). Join several with "+" for their union, e.g. "prompt+first:8"
(seed 002's setting: the effect is set during prefill).

A mask is evaluated once per forward pass and is either ALL (no mask needed), NONE (skip the
op) or a [B, T, 1] tensor of 0/1 in the model's dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from steerable.errors import PlanError
from steerable.steering.values import ascii_int

ALL: None = None
NONE = False
Mask = torch.Tensor | bool | None

_TERM = re.compile(r"(all|prompt|generated|assistant|first:([0-9]+)|turns>=([0-9]+))", re.ASCII)
#: K of "first:K" and k of "turns>=k" at most this (a model's context is far shorter)
MAX_GATE_COUNT = 1 << 20
MAX_GATE_TERMS = 8
GATE_HELP = '"all", "prompt", "generated", "first:K", "assistant", "turns>=k", or several joined by "+"'


@dataclass
class TokenView:
    """What a gate needs to know about the current forward pass.

    Positions past … past+T−1 of a batch whose (left-padded) prompts fill positions 0 … prompt_len−1.
    `turn`/`assistant` describe prompt tokens [B, prompt_len]; `reply_turn` [B] is the exchange
    index of the reply being generated. Without them every prompt token is a user token of turn 0.
    `ends` [B], when given, is where each row's own prompt ends, for batches whose rows started at different
    times (a server's continuous batch): the `prompt`, `generated` and `first:K` gates then count from it.
    """

    batch: int
    past: int
    length: int
    prompt_len: int
    device: torch.device
    dtype: torch.dtype
    turn: torch.Tensor | None = None
    assistant: torch.Tensor | None = None
    reply_turn: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    ends: torch.Tensor | None = None
    cache: dict[Any, Mask] = field(default_factory=dict)

    @property
    def n_prompt(self) -> int:
        """How many of this pass's positions are prompt tokens."""
        return max(0, min(self.past + self.length, self.prompt_len) - self.past)

    def generated_index(self) -> torch.Tensor:
        """Each position's index among the generated tokens (negative: prompt): [T], or [B, T] with `ends`."""
        pos = torch.arange(self.past, self.past + self.length, device=self.device)
        if self.ends is not None:
            return pos[None, :] - self.ends.to(self.device)[:, None]
        return pos - self.prompt_len


@dataclass(frozen=True)
class Gate:
    spec: str = "all"
    terms: tuple[tuple[str, int], ...] = (("all", 0),)

    @property
    def is_all(self) -> bool:
        return any(kind == "all" for kind, _ in self.terms)

    @property
    def needs_turns(self) -> bool:
        return any(kind in ("assistant", "turns") for kind, _ in self.terms)

    def mask(self, view: TokenView) -> Mask:
        if self.is_all:
            return ALL
        if self in view.cache:
            return view.cache[self]
        out: Mask = NONE
        for kind, k in self.terms:
            out = union(out, _term(kind, k, view))
            if out is ALL:
                break
        view.cache[self] = out
        return out


def parse_gate(spec: Any) -> Gate:
    if spec is None:
        return Gate()
    if not isinstance(spec, str):
        raise PlanError(f"gate must be a string ({GATE_HELP}), got {str(spec)[:40]!r}")
    parts = spec.replace(" ", "").split("+")
    if len(parts) > MAX_GATE_TERMS:
        raise PlanError(f"gate joins {len(parts)} terms; at most {MAX_GATE_TERMS}")
    terms = []
    for part in parts:
        m = _TERM.fullmatch(part)
        if not m:
            raise PlanError(f"unknown gate {part[:40]!r}: use {GATE_HELP}")
        if m.group(2) is not None:
            terms.append(("first", ascii_int("gate first:K", m.group(2), 0, MAX_GATE_COUNT)))
        elif m.group(3) is not None:
            terms.append(("turns", ascii_int("gate turns>=k", m.group(3), 0, MAX_GATE_COUNT)))
        else:
            terms.append((part, 0))
    return Gate(spec.replace(" ", ""), tuple(terms))


def union(a: Mask, b: Mask) -> Mask:
    if a is ALL or b is ALL:
        return ALL
    if a is NONE:
        return b
    if b is NONE:
        return a
    return torch.maximum(a, b)  # type: ignore[arg-type]


def intersect(a: Mask, b: Mask) -> Mask:
    if a is NONE or b is NONE:
        return NONE
    if a is ALL:
        return b
    if b is ALL:
        return a
    assert isinstance(a, torch.Tensor)
    assert isinstance(b, torch.Tensor)
    return a * b


def _positions(keep: torch.Tensor, view: TokenView) -> Mask:
    """[T] bool → mask over the sequence dimension, shared by every row ([B, T]: one per row)."""
    if bool(keep.all()):
        return ALL
    if not bool(keep.any()):
        return NONE
    return keep.to(view.dtype)[..., None] if keep.dim() == 2 else keep.to(view.dtype).view(1, -1, 1)


def _term(kind: str, k: int, view: TokenView) -> Mask:
    gen = view.generated_index()
    if kind == "prompt":
        return _positions(gen < 0, view)
    if kind == "generated":
        return _positions(gen >= 0, view)
    if kind == "first":
        return _positions((gen >= 0) & (gen < k), view)
    # assistant / turns: per row; prompt tokens from the view's segmentation, generated ones from the reply
    n_prompt = view.n_prompt
    B, T = view.batch, view.length
    rows = torch.zeros(B, T, dtype=torch.bool, device=view.device)
    if n_prompt:
        lo, hi = view.past, view.past + n_prompt
        if kind == "assistant" and view.assistant is not None:
            rows[:, :n_prompt] = view.assistant[:, lo:hi]
        elif kind == "turns" and view.turn is not None:
            rows[:, :n_prompt] = view.turn[:, lo:hi] >= k
        elif kind == "turns" and k == 0:
            rows[:, :n_prompt] = True
    if n_prompt < T:
        if kind == "assistant":
            rows[:, n_prompt:] = True
        else:
            reply = view.reply_turn if view.reply_turn is not None else torch.zeros(B, dtype=torch.long)
            rows[:, n_prompt:] = (reply.to(view.device) >= k)[:, None]
    if bool(rows.all()):
        return ALL
    if not bool(rows.any()):
        return NONE
    return rows.to(view.dtype)[..., None]
