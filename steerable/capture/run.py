"""Batched, padding-aware capture that stops the forward pass after the last site it reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from steerable.capture.positions import check_position, select
from steerable.capture.sites import SITES, check_site, get_hidden, site_module
from steerable.capture.stats import LayerStats
from steerable.data.loaders import Example
from steerable.models.batch import position_ids
from steerable.models.load import ModelHandle

HELDOUT_EVERY = 5  # pair/example k is held out when k % 5 == 4: a fixed 20 % for quality statistics


class StopForward(Exception):
    """Raised by the last capture hook: nothing after it (later blocks, LM head) is needed."""


@dataclass
class CaptureResult:
    stats: dict[int, LayerStats]
    site: str
    position: str
    n_examples: int
    n_tokens: int


@dataclass
class Batch:
    examples: list[Example]
    ids: list[int]  # index of each example in the input list


def batch_examples(examples: Sequence[Example], batch_size: int) -> list[Batch]:
    """Group pairs together and batch units of similar length, to keep pairs in one batch and padding low."""
    units: dict[object, list[int]] = {}
    for i, ex in enumerate(examples):
        units.setdefault(("pair", ex.pair) if ex.pair is not None else ("one", i), []).append(i)
    def size(u: list[int]) -> int:
        return sum(len(examples[i].prompt) + len(examples[i].response or "") for i in u)
    ordered = sorted(units.values(), key=size)
    out: list[Batch] = []
    cur: list[int] = []
    for unit in ordered:
        if cur and len(cur) + len(unit) > batch_size:
            out.append(Batch([examples[i] for i in cur], cur))
            cur = []
        cur += unit
    if cur:
        out.append(Batch([examples[i] for i in cur], cur))
    return out


def encode_examples(handle: ModelHandle, examples: Sequence[Example]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Token ids (left-padded) of prompt+response, and each row's number of response tokens."""
    prefixes = [handle.render(ex.prompt) for ex in examples]
    fulls = [p + (ex.response or "") for p, ex in zip(prefixes, examples, strict=True)]
    enc = handle.encode(fulls)
    lengths = enc["attention_mask"].sum(1)
    prefix_lengths = handle.encode(prefixes)["attention_mask"].sum(1)
    return enc, (lengths - prefix_lengths).cpu()


@contextlib.contextmanager
def reading_hooks(
    handle: ModelHandle, layers: Sequence[int], site: str, sink: dict[int, torch.Tensor]
) -> Iterator[None]:
    last = max(layers)
    handles = []
    for layer in layers:
        module, pre = site_module(handle.layout, site, layer)

        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any = None, *,
                 _layer: int = layer, _pre: bool = pre) -> None:
            sink[_layer] = get_hidden(args, kwargs, output, _pre)
            if _layer == last:
                raise StopForward
        if pre:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_stats(
    handle: ModelHandle,
    examples: Sequence[Example],
    layers: Sequence[int] | None = None,
    *,
    site: str = "resid_post",
    position: str = "last",
    batch_size: int = 16,
    second_moments: bool = False,
    reservoir_cap: int = 2048,
    progress: bool = True,
) -> CaptureResult:
    """Stream activations of `examples` at (site, layers, position) into per-class LayerStats."""
    return capture_batches(handle, batch_examples(examples, batch_size), layers, site=site, position=position,
                           second_moments=second_moments, reservoir_cap=reservoir_cap, progress=progress)


@torch.inference_mode()
def capture_batches(
    handle: ModelHandle,
    batches: Sequence[Batch],
    layers: Sequence[int] | None = None,
    *,
    site: str = "resid_post",
    position: str = "last",
    second_moments: bool = False,
    reservoir_cap: int = 2048,
    progress: bool = True,
) -> CaptureResult:
    """`capture_stats` of the given batches of a set (all of `batch_examples(set)`, or a shard of them).

    Held-out fold and reservoir keys come from each example's pair or index in the whole set, so the
    `LayerStats.merge` of shards' results equals the result of all batches.
    """
    check_site(site)
    check_position(position)
    layers = list(range(handle.n_layers)) if layers is None else sorted(set(layers))
    for layer in layers:
        site_module(handle.layout, site, layer)  # validates the range before any work
    stats = {
        layer: LayerStats(handle.hidden_size, second_moments, reservoir_cap, seed=layer) for layer in layers
    }
    n_examples = sum(len(b.examples) for b in batches)
    n_tokens = 0
    sink: dict[int, torch.Tensor] = {}
    bar = tqdm(total=n_examples, desc=f"capture {site}", unit="ex", disable=not progress, leave=False)
    with reading_hooks(handle, layers, site, sink):
        for batch in batches:
            enc, response_len = encode_examples(handle, batch.examples)
            n_tokens += int(enc["attention_mask"].sum())
            with contextlib.suppress(StopForward):
                handle.model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False)
            labels = torch.tensor([ex.label for ex in batch.examples])
            keys = [ex.pair if ex.pair is not None else i for ex, i in zip(batch.examples, batch.ids, strict=True)]
            heldout = torch.tensor([k % HELDOUT_EVERY == HELDOUT_EVERY - 1 for k in keys])
            mask = enc["attention_mask"].cpu()
            for layer in layers:
                h = sink.pop(layer).float().cpu()
                feats, rows = select(h, mask, response_len, position)
                stats[layer].add(feats, labels[rows], heldout[rows], _row_keys(batch, mask, rows, position))
                # pairwise PCA compares whole sequences: with position "all", their mean tokens
                per_seq = feats if position != "all" else (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                _add_pair_diffs(stats[layer], per_seq, batch.examples, heldout)
            bar.update(len(batch.examples))
    bar.close()
    return CaptureResult(stats, site, position, n_examples, n_tokens)


ROW_KEY_STRIDE = 1 << 20  # a row's key: its example's index in the set × stride + its token (position "all")


def _row_keys(batch: Batch, mask: torch.Tensor, rows: torch.Tensor, position: str) -> torch.Tensor:
    """Each feature row's key in the whole set, whatever shard or batch it was read in."""
    token = (mask.cumsum(1) - 1)[mask.bool()] if position == "all" else torch.zeros(len(rows), dtype=torch.long)
    return torch.tensor(batch.ids, dtype=torch.long)[rows] * ROW_KEY_STRIDE + token


def _add_pair_diffs(stats: LayerStats, feats: torch.Tensor, examples: list[Example], heldout: torch.Tensor) -> None:
    """Per-pair (positive − negative) differences of per-sequence features, training pairs only."""
    by_pair: dict[int, dict[int, int]] = {}
    for row, ex in enumerate(examples):
        if ex.pair is not None and not bool(heldout[row]):
            by_pair.setdefault(ex.pair, {})[ex.label] = row
    pos_rows = [r[1] for r in by_pair.values() if 1 in r and 0 in r]
    neg_rows = [r[0] for r in by_pair.values() if 1 in r and 0 in r]
    if pos_rows:
        stats.add_pair_diffs(feats[pos_rows] - feats[neg_rows])


__all__ = ["SITES", "CaptureResult", "batch_examples", "capture_batches", "capture_stats", "encode_examples"]
