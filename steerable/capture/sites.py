"""Hook sites (methods.md §1): which module to hook for a (site, layer) and how to read/write it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from steerable.errors import SteerableError
from steerable.models.layout import Layout

# In forward order within one decoder block. attn_out / mlp_out are what attention and the MLP add
# to the residual stream (before Gemma3's post-norms); steering them all ablates a direction exactly.
SITES = ("resid_pre", "attn_in", "attn_out", "mlp_in", "mlp_out", "resid_post")
_WRITERS = {"attn_out": ("self_attn", "attn", "attention"), "mlp_out": ("mlp", "feed_forward")}
DEFAULT_SITE = "resid_post"
LAYER_CONVENTION = "0-based decoder block index; resid_post = output of block, resid_pre = its input"


def check_site(site: str) -> str:
    if site not in SITES:
        raise SteerableError(f"unknown hook site {site!r}: use one of {', '.join(SITES)}")
    return site


def site_module(layout: Layout, site: str, layer: int) -> tuple[nn.Module, bool]:
    """(module, is_pre_hook): resid_pre reads the block's input; the others read a module's output."""
    check_site(site)
    if not 0 <= layer < layout.n_layers:
        raise SteerableError(f"layer {layer} out of range: the model has layers 0-{layout.n_layers - 1}")
    if site == "resid_pre":
        return layout.layers[layer], True
    if site == "resid_post":
        return layout.layers[layer], False
    if site in _WRITERS:
        for name in _WRITERS[site]:
            module = getattr(layout.layers[layer], name, None)
            if isinstance(module, nn.Module):
                return module, False
        raise SteerableError(f"site {site} is not available: no {' / '.join(_WRITERS[site])} module in {layout.family}")
    norms = layout.attn_in if site == "attn_in" else layout.mlp_in
    if norms is None:
        raise SteerableError(f"site {site} is not available: no such norm module found in {layout.family}")
    return norms[layer], False


def get_hidden(args: tuple, kwargs: dict, output: Any, pre: bool) -> torch.Tensor:
    if pre:
        return args[0] if args else kwargs["hidden_states"]
    return output[0] if isinstance(output, tuple) else output


def replace_hidden(args: tuple, kwargs: dict, output: Any, pre: bool, h: torch.Tensor) -> Any:
    """What a hook returns so that `h` replaces the hidden state it read."""
    if pre:
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}
    if isinstance(output, tuple):
        return (h, *output[1:])
    return h
