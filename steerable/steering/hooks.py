"""Attach a plan to a model for the duration of a `with` block; the hooks always come off."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from steerable.capture.sites import get_hidden, replace_hidden, site_module
from steerable.steering.methods import METHODS
from steerable.steering.plan import SteeringPlan, build_plan

Op = Callable[[torch.Tensor], torch.Tensor]


def compile_plan(plan: SteeringPlan, handle: Any) -> dict[tuple[str, int], list[Op]]:
    """Per (site, layer), the ops to run in plan order, with their tensors prepared once."""
    ref = next(handle.model.parameters())
    out: dict[tuple[str, int], list[Op]] = {}
    for iv in plan.interventions:
        method = METHODS[iv.method]
        for layer in iv.layers:
            params = {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in method.prepare(iv, layer).items()}
            out.setdefault((iv.site, layer), []).append(_bind(method.apply, params))
    return out


def _bind(apply: Callable[..., torch.Tensor], params: dict[str, torch.Tensor]) -> Op:
    def op(h: torch.Tensor) -> torch.Tensor:
        return apply(h, **params)
    return op


def _hook(ops: list[Op], pre: bool) -> Callable[..., Any]:
    def hook(module, args, kwargs, output=None):
        h = get_hidden(args, kwargs, output, pre)
        for op in ops:
            h = op(h)
        return replace_hidden(args, kwargs, output, pre, h)
    return hook


@contextlib.contextmanager
def steer(handle: Any, plan: Any) -> Iterator[SteeringPlan]:
    """Steer `handle` with `plan` (anything build_plan accepts) inside the block.

    The model's weights are never touched, so it is bit-identical once the block exits,
    also when the block raises.
    """
    checked = build_plan(plan, handle)
    handles = []
    try:
        for (site, layer), ops in compile_plan(checked, handle).items():
            module, pre = site_module(handle.layout, site, layer)
            if pre:
                handles.append(module.register_forward_pre_hook(_hook(ops, True), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_hook(ops, False), with_kwargs=True))
        yield checked
    finally:
        for h in handles:
            h.remove()
