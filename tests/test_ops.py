"""Property tests of the pure interventions (random shapes and values)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steerable.steering import ops

shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(2, 48))
# a shape and a number of capped axes k <= min(3, d): every drawn example is a valid cap
shapes_and_k = shapes.flatmap(lambda s: st.tuples(st.just(s), st.integers(1, min(3, s[-1]))))


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
    assert torch.equal(out[0], h[0])
    assert torch.equal(out[2], h[2])
    assert torch.equal(out[1, :, 0], h[1, :, 0] + 2.0)


def _plane(d, seed):
    g = torch.Generator().manual_seed(seed + 7)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    return q[:, 0], q[:, 1]


angles = st.floats(-2 * math.pi, 2 * math.pi)


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 10_000), st.floats(1e-3, 1e3), angles)
def test_rotate_preserves_norm_identity_at_zero_and_inverts(shape, seed, scale, theta):
    h = _h(shape, seed, scale)
    b1, b2 = _plane(shape[-1], seed)
    out = ops.rotate(h, b1, b2, theta)
    torch.testing.assert_close(out.norm(dim=-1), h.norm(dim=-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(ops.rotate(h, b1, b2, 0.0), h, rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(ops.rotate(out, b1, b2, -theta), h, rtol=1e-9, atol=1e-9 * scale)
    # the in-plane angle moved by exactly theta
    before = torch.atan2(h @ b2, h @ b1)
    after = torch.atan2(out @ b2, out @ b1)
    turn = torch.remainder(after - before - theta + math.pi, 2 * math.pi) - math.pi
    inplane = torch.hypot(h @ b1, h @ b2)
    moved = turn[inplane > 1e-6 * scale].abs().flatten()
    assert float(torch.cat([moved, torch.zeros(1, dtype=turn.dtype)]).max()) < 1e-6


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 48), st.integers(0, 10_000), st.floats(1e-3, 1e3), st.booleans())
def test_angular_at_own_angle_is_identity(d, seed, scale, adaptive):
    h = _h((d,), seed, scale)
    b1, b2 = _plane(d, seed)
    own = math.atan2(float(h @ b2), float(h @ b1))
    torch.testing.assert_close(ops.angular(h, b1, b2, own, adaptive=adaptive), h, rtol=1e-9, atol=1e-9 * scale)


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 10_000), angles)
def test_angular_sets_the_angle_and_keeps_in_plane_norm(shape, seed, theta):
    h = _h(shape, seed, 1.0)
    b1, b2 = _plane(shape[-1], seed)
    out = ops.angular(h, b1, b2, theta)
    torch.testing.assert_close(torch.hypot(out @ b1, out @ b2), torch.hypot(h @ b1, h @ b2))
    torch.testing.assert_close(out.norm(dim=-1), h.norm(dim=-1))
    nz = torch.hypot(h @ b1, h @ b2) > 1e-6
    got = torch.atan2(out @ b2, out @ b1)[nz]
    err = torch.remainder(got - theta + math.pi, 2 * math.pi) - math.pi
    assert float(torch.cat([err.abs(), torch.zeros(1, dtype=err.dtype)]).max()) < 1e-6
    # AAS leaves tokens with h·b1 ≤ 0 alone
    aas = ops.angular(h, b1, b2, theta, adaptive=True)
    off = (h @ b1) <= 0
    assert torch.equal(aas[off], h[off])


@settings(max_examples=60, deadline=None)
@given(shapes_and_k, st.integers(0, 10_000), st.floats(0.1, 100), st.floats(-5, 5), st.floats(0, 5))
def test_cap_lands_in_band_and_leaves_inside_tokens(shape_k, seed, scale, lo, width):
    shape, k = shape_k
    d = shape[-1]
    assert 1 <= k <= d
    h = _h(shape, seed, scale)
    g = torch.Generator().manual_seed(seed + 3)
    axes = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0].T
    lo_t = torch.full((k,), lo, dtype=torch.float64)
    hi_t = lo_t + width
    out = ops.cap(h, axes, lo_t, hi_t)
    p = out @ axes.T
    tol = 1e-9 * scale * d
    assert bool((p >= lo_t - tol).all())
    assert bool((p <= hi_t + tol).all())
    inside = ((h @ axes.T >= lo_t) & (h @ axes.T <= hi_t)).all(-1)
    assert torch.equal(out[inside], h[inside])
    # floor only / ceiling only
    inf = torch.full((k,), math.inf, dtype=torch.float64)
    assert bool(((ops.cap(h, axes, lo_t, inf) @ axes.T) >= lo_t - tol).all())
    assert bool(((ops.cap(h, axes, -inf, hi_t) @ axes.T) <= hi_t + tol).all())


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 10_000), st.floats(-3, 3), st.floats(0, 3), st.floats(-2, 2), st.sampled_from([1.0, 2.0]))
def test_projection_steer_touches_only_tokens_below_threshold(shape, seed, tau, lift, bias, factor):
    h = _h(shape, seed, 1.0)
    u = _unit(shape[-1], seed)

    def t(x: float) -> torch.Tensor:
        return torch.tensor([x], dtype=torch.float64)

    target = tau + lift
    out = ops.project_steer(h, u, t(bias), t(tau), t(target), factor)
    s = h @ u + bias
    above = s >= tau
    assert torch.equal(out[above], h[above])
    s_out = (out @ u + bias)[~above]
    expect = target if factor == 1.0 else 2 * target - s[~above]
    torch.testing.assert_close(s_out, torch.as_tensor(expect, dtype=torch.float64).expand_as(s_out))
    # StMP across the threshold lands at or above it
    if factor == 2.0:
        mirrored = ops.project_steer(h, u, t(bias), t(tau), t(tau), 2.0)
        assert bool(((mirrored @ u + bias) >= tau - 1e-9).all())


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 10_000), angles)
def test_every_op_is_identity_at_zero_strength_and_with_zero_params(shape, seed, theta):
    h = _h(shape, seed, 1.0)
    d = shape[-1]
    b1, b2 = _plane(d, seed)
    u = b1[None]
    z = torch.zeros(1, d, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    assert torch.equal(ops.ablate(h, u, 0 * u), h)
    assert torch.equal(ops.cap(h, u, one, one + 1, 0 * u), h)
    assert torch.equal(ops.angular_plane(h, ops.plane_basis(b1, b2), ops.angular_write(b1, b2, theta, 0.0)), h)
    assert torch.equal(ops.rotate(h, b1, b2, 0.0 * theta), h)
    assert torch.equal(ops.project_steer(h, u, one, one * 9, one * 9, 1.0, 0 * u), h)
    # zero directions (how rows without a plan share a batch) leave h exactly unchanged
    zb = torch.zeros(2, d, dtype=torch.float64)
    assert torch.equal(ops.ablate(h, z), h)
    assert torch.equal(ops.cap(h, z, 0 * one, 0 * one), h)
    assert torch.equal(ops.rotate_plane(h, zb, zb), h)
    assert torch.equal(ops.angular_plane(h, zb, torch.zeros(3, d, dtype=torch.float64)), h)
    assert torch.equal(ops.project_steer(h, z, 0 * one, 0 * one, 0 * one, 2.0), h)


def test_gate_switches_tokens_off():
    h = torch.randn(2, 3, 8)
    b1, b2 = torch.eye(8)[0], torch.eye(8)[1]
    gate = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])[..., None]
    out = ops.rotate_plane(h, ops.plane_basis(b1, b2), ops.rotation_write(b1, b2, 1.0), gate)
    off = gate[..., 0] == 0
    assert torch.equal(out[off], h[off])
    assert not torch.equal(out[~off], h[~off])


def test_large_and_small_paths_agree():
    # decode-sized inputs use elementwise products, prefill-sized ones BLAS: same numbers either way
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 300, 128, generator=g, dtype=torch.float64)
    b1, b2 = _plane(128, 3)
    big = ops.rotate(h, b1, b2, 0.7)
    small = torch.stack([ops.rotate(h[:, i : i + 1], b1, b2, 0.7) for i in range(300)], dim=1)[:, :, 0]
    torch.testing.assert_close(big, small)
    rows = torch.stack([ops.plane_basis(b1, b2), ops.plane_basis(b2, b1)])  # per-row bases [2, 2, d]
    writes = torch.stack([ops.rotation_write(b1, b2, 0.7), ops.rotation_write(b2, b1, 0.7)])
    per_row = ops.rotate_plane(h, rows, writes)
    torch.testing.assert_close(per_row[0], big[0])
    torch.testing.assert_close(per_row[:, :1], ops.rotate_plane(h[:, :1], rows, writes))
