"""steer() under autograd: every op is differentiable, and a trainable parameter upstream of a steered layer
receives gradient through the steering (training-time steering builds on this)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from steerable.data.loaders import Example
from steerable.directions.calibrate import calibrate
from steerable.models.batch import PromptBatch
from steerable.steering import ops
from steerable.steering.hooks import steer

D = 6


def _basis(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, 2, generator=g, dtype=torch.float64))
    return q[:, 0].contiguous(), q[:, 1].contiguous()


def _h(seed: int, shape: tuple[int, ...] = (2, 3, D)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)


def test_gradcheck_every_op():
    b1, b2 = _basis(0)
    h = _h(1)
    assert gradcheck(lambda x: ops.add(x, 0.7 * b1), (h,))
    assert gradcheck(lambda x: ops.ablate(x, b1), (h,))
    # cap: thresholds placed so no token sits exactly on a kink of max(0, ·)
    lo, hi = torch.tensor([-0.3], dtype=torch.float64), torch.tensor([0.4], dtype=torch.float64)
    assert gradcheck(lambda x: ops.cap(x, b1[None], lo, hi), (h,))
    assert gradcheck(lambda x: ops.rotate(x, b1, b2, math.radians(70)), (h,))
    assert gradcheck(lambda x: ops.angular(x, b1, b2, math.radians(200)), (h,))
    assert gradcheck(lambda x: ops.angular(x, b1, b2, math.radians(200), adaptive=True), (h,))
    one = torch.tensor([0.1], dtype=torch.float64)
    assert gradcheck(lambda x: ops.project_steer(x, b1, one * 0, one, one * 5, 1.0), (h,))
    assert gradcheck(lambda x: ops.project_steer(x, b1, one * 0, one, one, 2.0), (h,))
    gate = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64).view(1, 3, 1)
    assert gradcheck(lambda x: ops.ablate(x, b1, None, gate), (h,))


def test_gradcheck_large_inputs_take_the_matmul_path():
    b1, b2 = _basis(2)
    h = _h(3, (4, (1 << 16) // (4 * D) + 8, D))  # above ops._SMALL elements: BLAS products
    assert h.numel() > ops._SMALL
    assert gradcheck(lambda x: ops.rotate(x, b1, b2, 1.1), (h,), fast_mode=True)
    assert gradcheck(lambda x: ops.ablate(x, b1), (h,), fast_mode=True)


EX = [Example(f"{w} someone now, {i}", None, j % 2, i * 4 + j // 2)
      for i in range(3) for j, w in enumerate(["hurt", "hug", "rob", "open", "poison", "dig", "burn", "build"])]
PLANS = {
    "add": {"method": "add", "strength": 2.0, "layers": [2]},
    "ablate": {"method": "ablate", "layers": [2]},
    "cap": {"method": "cap", "cap_floor": "p90", "layers": [2]},
    "rotate": {"method": "rotate", "angle": 120, "layers": [2]},
}


@pytest.mark.parametrize("method", list(PLANS))
def test_upstream_parameter_gets_gradient_through_steering(handle, method):
    with torch.inference_mode():  # a set made in a notebook's inference_mode block holds inference tensors
        ds = calibrate(handle, EX, position="last", progress=False)
    batch = PromptBatch.encode(handle, ["Say something nice", "Count to five"])
    emb = handle.model.get_input_embeddings().weight
    emb.requires_grad_(True)
    try:
        def grad(plan: dict | None) -> torch.Tensor:
            emb.grad = None
            with steer(handle, None if plan is None else {"vector": ds, **plan}):
                logits = handle.model(**batch.inputs()).logits
            logits.float().pow(2).mean().backward()
            assert emb.grad is not None
            return emb.grad.clone()

        plain, steered = grad(None), grad(PLANS[method])
        assert bool(torch.isfinite(steered).all())
        assert float(steered.abs().sum()) > 0
        assert not torch.allclose(plain, steered)  # the steering op is on the backward path
    finally:
        emb.requires_grad_(False)
        emb.grad = None


def test_steer_under_no_grad_and_inference_mode(llama):
    ds = calibrate(llama, EX, position="last", progress=False)
    batch = PromptBatch.encode(llama, ["Say something nice"])
    plan = {"vector": ds, **PLANS["rotate"]}
    with torch.no_grad(), steer(llama, plan):
        a = llama.model(**batch.inputs()).logits
    with torch.inference_mode(), steer(llama, plan):
        b = llama.model(**batch.inputs()).logits
    assert torch.equal(a, b)
