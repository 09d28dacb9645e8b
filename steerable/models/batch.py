"""A batch of prompts as the model sees it: left-padded ids, mask, positions, and each prompt's turns.

Everything that runs prompts through the model (generation, logit metrics, condition checks, the server)
builds one of these, so padding, position ids and the prompt boundary are computed in one place. The
steering session is told where the prompts end by `steer(..., batch=...)`; a continuation appended after
the prompts (an A/B answer cue, a completion being scored) is past that boundary, as generated tokens are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from steerable.models.turns import Messages, TurnsRow, align_right, segment, segment_batch

if TYPE_CHECKING:
    from steerable.models.load import ModelHandle

#: per prompt token: exchange index [B, W] and is-assistant [B, W]; the reply's exchange [B]
Turns = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, as `generate()` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def stop_token_ids(handle: ModelHandle) -> set[int]:
    """Token ids that end a reply: the tokenizer's end-of-sequence and the generation config's."""
    tok = handle.tokenizer
    ids = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
    gen = getattr(getattr(handle.model, "generation_config", None), "eos_token_id", None)
    ids |= {int(t) for t in (gen if isinstance(gen, list) else [gen] if gen is not None else [])}
    return ids


def pad_token_id(handle: ModelHandle) -> int:
    tok = handle.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


@dataclass(eq=False)
class PromptBatch:
    """Left-padded prompts [B, W]: positions 0 … W−1 are prompt (padding included), W on is what follows.

    `turns()` is computed only when a plan's gates need it (the `assistant` and `turns>=k` gates).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    _turns: Callable[[], Turns] | None = field(default=None, repr=False)
    _cached: Turns | None = field(default=None, init=False, repr=False)

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def positions(self) -> torch.Tensor:
        return position_ids(self.mask)

    def turns(self) -> Turns | None:
        if self._cached is None and self._turns is not None:
            self._cached = self._turns()
        return self._cached

    def inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of a forward pass over the prompts alone."""
        return {"input_ids": self.ids, "attention_mask": self.mask, "position_ids": self.positions}

    @classmethod
    def encode(cls, handle: ModelHandle, prompts: Sequence[str | Messages], system: str | None = None, *,
               rendered: Sequence[str] | None = None) -> PromptBatch:
        """Render (chat template) and tokenise `prompts`, left-padded to the longest (`rendered`: the texts
        `handle.render` gives for them, when the caller has them already)."""
        texts = list(rendered) if rendered is not None else [handle.render(p, system) for p in prompts]
        enc = handle.encode(texts)
        width = int(enc["input_ids"].shape[1])
        return cls(enc["input_ids"], enc["attention_mask"], lambda: segment_batch(handle, list(prompts), system, width))

    @classmethod
    def from_ids(cls, handle: ModelHandle, rows: Sequence[Sequence[int]],
                 turns: Sequence[TurnsRow | None] | None = None) -> PromptBatch:
        """Left-pad already tokenised prompts; `turns` (per row, or None: every token the user's, exchange 0)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_token_id(handle), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
        make = None if turns is None else (lambda: _stack_turns(turns, width))
        dev = handle.device
        return cls(ids.to(dev), mask.to(dev), make)

    def with_tails(self, tails: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of each prompt followed by its continuation, right-padded to the longest one."""
        s = max((len(t) for t in tails), default=0)
        ext = torch.full((self.size, s), pad, dtype=torch.long, device=self.ids.device)
        ext_mask = torch.zeros_like(ext)
        for r, t in enumerate(tails):
            ext[r, : len(t)] = torch.tensor(list(t), dtype=torch.long)
            ext_mask[r, : len(t)] = 1
        return torch.cat([self.ids, ext], 1), torch.cat([self.mask.long(), ext_mask], 1)

    def select(self, keep: torch.Tensor) -> PromptBatch:
        """The rows `keep` (indices) of this batch, same width."""
        turns = self.turns()
        out = PromptBatch(self.ids[keep], self.mask[keep])
        if turns is not None:
            cpu = keep.cpu()
            out._cached = (turns[0][cpu], turns[1][cpu], turns[2][cpu])
        return out


def _stack_turns(rows: Sequence[TurnsRow | None], width: int) -> Turns:
    turn = torch.zeros(len(rows), width, dtype=torch.long)
    asst = torch.zeros(len(rows), width, dtype=torch.bool)
    reply = torch.zeros(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        if r is not None:
            t, a, rt = r
            turn[i] = torch.tensor(align_right(t, width, 0))
            asst[i] = torch.tensor(align_right(a, width, False))
            reply[i] = rt
    return turn, asst, reply


__all__ = ["PromptBatch", "Turns", "pad_token_id", "position_ids", "segment", "stop_token_ids"]
