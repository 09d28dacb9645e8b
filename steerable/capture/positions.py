"""Token positions read at calibration (methods.md §2), on left-padded batches."""

from __future__ import annotations

import torch

from steerable.errors import DataError, SteerableError

POSITIONS = ("last", "response-mean", "all", "answer-token")


def check_position(position: str) -> str:
    if position not in POSITIONS:
        raise SteerableError(f"unknown position {position!r}: use one of {', '.join(POSITIONS)}")
    return position


def select(
    h: torch.Tensor, attention_mask: torch.Tensor, response_len: torch.Tensor, position: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n, d] and the batch row of each, for one layer's activations h [B, T, d].

    Left padding puts every sequence's last token at T-1 and its response in the last
    `response_len` positions.
    """
    B, T, _ = h.shape
    rows = torch.arange(B, device=h.device)
    if position == "last":
        return h[:, -1, :], rows
    if position == "answer-token":
        return h[:, -2, :], rows
    if position == "response-mean":
        if bool((response_len <= 0).any()):
            raise DataError("position response-mean needs a response for every example (use pairs data)")
        idx = torch.arange(T, device=h.device)
        w = (idx[None, :] >= (T - response_len)[:, None]).to(h.dtype)
        return (h * w[..., None]).sum(1) / response_len[:, None].to(h.dtype), rows
    if position == "all":
        keep = attention_mask.bool()
        return h[keep], rows[:, None].expand(B, T)[keep]
    raise SteerableError(f"unknown position {position!r}: use one of {', '.join(POSITIONS)}")
