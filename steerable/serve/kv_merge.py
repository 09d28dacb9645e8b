"""KV-cache surgery for continuous batching: join two batches' caches, drop leading all-padding columns.

A transformers `DynamicCache` holds per layer key and value tensors [B, heads, S, head_dim]. Rows are
left-padded, so two batches of cache lengths Sa and Sb join by left-padding the shorter one with zeros up
to max(Sa, Sb) and concatenating along the batch; their attention masks are padded with zeros in the same
columns, so no row ever attends to a padded column and, with explicit position ids, each row computes what
it would alone. Only plain `DynamicLayer`s (full attention) can be joined: a sliding-window layer keeps
the last W columns of every row, which padding would shift.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def joinable(cache: DynamicCache) -> bool:
    """True if every layer is a plain, filled `DynamicLayer`."""
    layers = list(getattr(cache, "layers", None) or [])
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _layers(cache: DynamicCache) -> list[Any]:
    return list(cache.layers)


def pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`t` left-padded with zeros along `dim` up to `width`."""
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    pads = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [extra, 0]
    return F.pad(t, pads)


def join(a: DynamicCache, b: DynamicCache) -> None:
    """Append `b`'s rows to `a` (in place), left-padding whichever is shorter."""
    if not (joinable(a) and joinable(b)) or len(a.layers) != len(b.layers):
        raise ValueError("only full-attention dynamic caches of the same model can be joined")
    width = max(a.get_seq_length(), b.get_seq_length())
    for la, lb in zip(_layers(a), _layers(b), strict=True):
        la.keys = torch.cat([pad_left(la.keys, width, -2), pad_left(lb.keys, width, -2)], dim=0)
        la.values = torch.cat([pad_left(la.values, width, -2), pad_left(lb.values, width, -2)], dim=0)


def drop_left(cache: DynamicCache, n: int) -> None:
    """Remove the first `n` sequence columns of every layer (columns every row has masked)."""
    if n <= 0:
        return
    for layer in _layers(cache):
        layer.keys = layer.keys[..., n:, :]
        layer.values = layer.values[..., n:, :]
