"""Read activations for the loss terms through hooks on the PEFT-wrapped model's blocks.

The hooks sit on the same decoder modules steering uses (capture/sites.py); peft injects its LoRA layers inside
those blocks and leaves the blocks themselves in place, so the hooks see the adapted activations. A hook keeps
what it reads only while the reader is armed — during the training forward pass. Under gradient checkpointing
the blocks run again during backward (recompute); the reader is disarmed by then, so every term is computed once
per step from the forward pass's activations, and `recomputed` counts the ignored calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from steerable.capture.run import StopForward
from steerable.capture.sites import get_hidden, site_module
from steerable.models.load import ModelHandle


class ActivationReader:
    """`with reader.attached():` hooks on (site, layer) for each layer; `with reader.armed():` around a forward
    pass fills `hidden[layer]` ([B, T, d], in the graph). `stop_after_last` ends a forward pass early (a read-only
    pass needs nothing after the last layer)."""

    def __init__(self, handle: ModelHandle, site: str, layers: Sequence[int], *, stop_after_last: bool = False):
        self.handle = handle
        self.site = site
        self.layers = tuple(layers)
        self.stop_after_last = stop_after_last
        self.hidden: dict[int, torch.Tensor] = {}
        self.fired: dict[int, int] = dict.fromkeys(self.layers, 0)  # armed calls, per layer
        self.recomputed = 0  # calls while disarmed (gradient checkpointing's recompute)
        self._armed = False
        self._handles: list[Any] = []

    def _hook(self, layer: int, pre: bool) -> Any:
        last = self.layers[-1]

        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any = None) -> None:
            if not self._armed:
                self.recomputed += 1
                return
            self.hidden[layer] = get_hidden(args, kwargs, output, pre)
            self.fired[layer] += 1
            if self.stop_after_last and layer == last:
                raise StopForward
        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator[ActivationReader]:
        try:
            for layer in self.layers:
                module, pre = site_module(self.handle.layout, self.site, layer)
                hook = self._hook(layer, pre)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True) if pre
                                     else module.register_forward_hook(hook, with_kwargs=True))
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._armed = False

    @contextlib.contextmanager
    def armed(self) -> Iterator[dict[int, torch.Tensor]]:
        self.hidden = {}
        self._armed = True
        try:
            yield self.hidden
        finally:
            self._armed = False


def hook_counts(model: Any) -> int:
    """How many forward hooks and pre-hooks are registered on `model` and all its submodules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


_OURS = ("ActivationReader.", "Session.")  # this module's reader hooks and steering.hooks' Session hooks


def steering_hooks(model: Any) -> int:
    """How many of `model`'s hooks are training or steering hooks (transformers adds hooks of its own lazily, e.g.
    for output_hidden_states; those are not counted)."""
    n = 0
    for m in model.modules():
        for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()):
            name = getattr(hook, "__qualname__", "") or getattr(getattr(hook, "__func__", None), "__qualname__", "")
            n += name.startswith(_OURS)
    return n


__all__ = ["ActivationReader", "hook_counts", "steering_hooks"]
