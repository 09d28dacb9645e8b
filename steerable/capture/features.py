"""Per-example response-mean activations, kept whole (small data sets that need grouping or resampling:
the Assistant Axis's role vectors, bootstrap stability). Large contrastive sets stream through
`capture_stats` instead."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from steerable.capture.positions import select
from steerable.capture.run import StopForward, reading_hooks
from steerable.capture.sites import check_site, site_module
from steerable.errors import DataError
from steerable.models.batch import position_ids
from steerable.models.load import Messages, ModelHandle


@torch.inference_mode()
def response_means(
    handle: ModelHandle,
    prompts: Sequence[str | Messages],
    responses: Sequence[str],
    layers: Sequence[int],
    *,
    site: str = "resid_post",
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """[len(layers), n, d] float32: each response's mean activation over its own tokens, its prompt rendered
    with the chat template (a prompt may be a message list with a system prompt)."""
    check_site(site)
    if len(prompts) != len(responses):
        raise DataError(f"{len(prompts)} prompts for {len(responses)} responses")
    empty = [i for i, r in enumerate(responses) if not r.strip()]
    if empty:
        raise DataError(f"responses {empty[:5]} are empty: a response-mean needs at least one token")
    layers = list(layers)
    for layer in layers:
        site_module(handle.layout, site, layer)
    out = torch.empty(len(layers), len(prompts), handle.hidden_size)
    # by whole length (prompt and response), so a batch pads little: sorting by the response alone mixes
    # long and short prompts when every response is short (A/B letters)
    order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])) + len(responses[i]))
    sink: dict[int, torch.Tensor] = {}
    bar = tqdm(total=len(prompts), desc=f"capture {site}", unit="ex", disable=not progress, leave=False)
    with reading_hooks(handle, layers, site, sink):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            prefixes = [handle.render(prompts[i]) for i in idx]
            enc = handle.encode([p + responses[i] for p, i in zip(prefixes, idx, strict=True)])
            # the response's tokens: the full text's tokens beyond its rendered prompt's
            n_resp = (enc["attention_mask"].sum(1) - handle.encode(prefixes)["attention_mask"].sum(1)).cpu()
            if bool((n_resp <= 0).any()):
                raise DataError("a response tokenised to nothing after its prompt")
            with contextlib.suppress(StopForward):
                handle.model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False)
            mask = enc["attention_mask"].cpu()
            for j, layer in enumerate(layers):
                feats, _ = select(sink.pop(layer).float().cpu(), mask, n_resp, "response-mean")
                out[j, idx] = feats
            bar.update(len(idx))
    bar.close()
    return out


@torch.inference_mode()
def prompt_features(
    handle: ModelHandle,
    prompts: Sequence[str | Messages],
    layers: Sequence[int],
    *,
    site: str = "resid_post",
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """[len(layers), n, d] float32: each rendered prompt's activation at its last token (where a CAST
    condition reads it), kept whole for small sets that are validated by leaving groups out."""
    check_site(site)
    layers = list(layers)
    for layer in layers:
        site_module(handle.layout, site, layer)
    out = torch.empty(len(layers), len(prompts), handle.hidden_size)
    order = sorted(range(len(prompts)), key=lambda i: len(handle.render(prompts[i])))
    sink: dict[int, torch.Tensor] = {}
    bar = tqdm(total=len(prompts), desc=f"capture {site}", unit="prompt", disable=not progress, leave=False)
    with reading_hooks(handle, layers, site, sink):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = handle.encode([handle.render(prompts[i]) for i in idx])
            with contextlib.suppress(StopForward):
                handle.model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False)
            for j, layer in enumerate(layers):
                out[j, idx] = sink.pop(layer)[:, -1].float().cpu()  # left padding: the last token is at -1
            bar.update(len(idx))
    bar.close()
    return out
