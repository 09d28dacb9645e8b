"""Property tests of the pure interventions (random shapes and values)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steerable.steering import ops

shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(2, 48))


def _h(shape, seed, scale):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _unit(d, seed):
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    return u / u.norm()


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 10_000), st.floats(1e-3, 1e3))
def test_ablate_is_idempotent_and_orthogonal(shape, seed, scale):
    h, u = _h(shape, seed, scale), _unit(shape[-1], seed)
    once = ops.ablate(h, u)
    torch.testing.assert_close(ops.ablate(once, u), once, rtol=1e-9, atol=1e-9 * scale)
    assert float((once @ u).abs().max()) <= 1e-9 * scale * shape[-1]
    # the orthogonal complement is untouched
    torch.testing.assert_close(once - (once @ u)[..., None] * u, h - (h @ u)[..., None] * u)


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 10_000), st.floats(-50, 50))
def test_add_identity_at_zero_and_linear(shape, seed, alpha):
    h, u = _h(shape, seed, 1.0), _unit(shape[-1], seed)
    assert torch.equal(ops.add(h, 0.0 * u), h)
    out = ops.add(h, alpha * u)
    torch.testing.assert_close((out - h) @ u, torch.full(shape[:-1], alpha, dtype=torch.float64))


def test_ops_broadcast_per_row():
    h = torch.randn(3, 4, 8)
    vecs = torch.zeros(3, 1, 8)
    vecs[1, 0, 0] = 2.0  # only row 1 is steered
    out = ops.add(h, vecs)
    assert torch.equal(out[0], h[0]) and torch.equal(out[2], h[2])
    assert torch.equal(out[1, :, 0], h[1, :, 0] + 2.0)
