"""Interventions as pure tensor functions (h, params) → h', O(k·d) per token (methods.md §5).

Every intervention has one shape: read a few coordinates of h (`c = h·Rᵀ`, R a k×d matrix of
unit directions, k ≤ 3), turn them into coefficients `f(c)`, write back `h + f(c)·W`. Strength is
folded into W when a plan is compiled, so the per-token work is two thin matmuls and no d×d matrix
ever exists.

Shapes: `h` is [..., d]. R and W are [k, d] (one plan for every row) or [B, k, d] (one per row of a
[B, T, d] batch); per-direction numbers are [k] or [B, 1, k]. `gate` is None (every token) or a
[..., 1] tensor of 0/1 that switches the update off per token. A row whose directions are all zero
is left exactly as it was, which is how rows without a plan share a batch with steered rows.
"""

from __future__ import annotations

import math

import torch

# Below this many activation elements (a decode step) the thin products are done elementwise: a BLAS
# call this small may wake idle OpenMP threads, which costs more than the arithmetic (~0.3 ms vs 5 µs).
_SMALL = 1 << 16


def _coords(h: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """c = h·Rᵀ: [..., d] × [k, d] (or [B, k, d]) → [..., k]."""
    if h.numel() <= _SMALL:
        per_row = read.unsqueeze(1) if read.dim() == 3 else read  # [B, k, d] → [B, 1, k, d]
        return (h.unsqueeze(-2) * per_row).sum(-1)
    return h @ read.mT


def _write(coef: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
    """coef·W: [..., k] × [k, d] (or [B, k, d]) → [..., d]."""
    if coef.shape[-1] * write.shape[-1] * max(1, coef.numel() // coef.shape[-1]) <= _SMALL * 4:
        per_row = write.unsqueeze(1) if write.dim() == 3 else write
        return (coef.unsqueeze(-1) * per_row).sum(-2)
    return coef @ write


def _gated(coef: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return coef if gate is None else coef * gate


# -- add / ablate -------------------------------------------------------------------------------

def add(h: torch.Tensor, vector: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """ActAdd / CAA: h + α·v, with α already folded into `vector` ([d], [1, d] or [B, 1, d])."""
    return h + (vector if gate is None else gate * vector)


def ablate(
    h: torch.Tensor, unit: torch.Tensor, write: torch.Tensor | None = None, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """Directional ablation h − (h·r̂) r̂ (with `write` = α·r̂: remove a fraction α of it)."""
    unit = unit.reshape(-1, unit.shape[-1]) if unit.dim() == 1 else unit
    write = unit if write is None else (write.reshape(-1, write.shape[-1]) if write.dim() == 1 else write)
    return h - _write(_gated(_coords(h, unit), gate), write)


# -- capping ------------------------------------------------------------------------------------

def cap(
    h: torch.Tensor,
    axes: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    write: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep each projection p_j = h·â_j inside [lo_j, hi_j] (floor: hi = +inf; ceiling: lo = −inf).

    h' = h + Σ_j (max(0, lo_j − p_j) − max(0, p_j − hi_j)) â_j. `axes` must be orthonormal (several
    directions are orthonormalised when the plan is compiled); `write` = α·axes scales the correction.
    """
    p = _coords(h, axes)
    coef = (lo - p).clamp_min(0) - (p - hi).clamp_min(0)
    return h + _write(_gated(coef, gate), axes if write is None else write)


# -- rotations in a plane (Angular and Selective Steering) --------------------------------------

def plane_basis(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    return torch.stack([b1, b2])


def rotation_write(b1: torch.Tensor, b2: torch.Tensor, theta: float) -> torch.Tensor:
    """W such that h + (c1, c2)·W rotates the in-plane part of h by θ (radians), leaving the rest."""
    cos, sin = math.cos(theta), math.sin(theta)
    return torch.stack([(cos - 1) * b1 + sin * b2, -sin * b1 + (cos - 1) * b2])


def rotate_plane(
    h: torch.Tensor, basis: torch.Tensor, write: torch.Tensor, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """Selective Steering rotation, precompiled: h + [(cosθ−1)c1 − sinθ c2] b1 + [sinθ c1 + (cosθ−1)c2] b2."""
    return h + _write(_gated(_coords(h, basis), gate), write)


def rotate(h: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate every token's (b1, b2)-plane component by θ radians; exactly norm-preserving."""
    return rotate_plane(h, plane_basis(b1, b2), rotation_write(b1, b2, theta))


def angular_write(b1: torch.Tensor, b2: torch.Tensor, theta: float, strength: float = 1.0) -> torch.Tensor:
    """W for SAS: coefficients (c1, c2, ‖x‖) map to −α·x + α·‖x‖(cos θ b1 + sin θ b2)."""
    target = math.cos(theta) * b1 + math.sin(theta) * b2
    return strength * torch.stack([-b1, -b2, target])


def angular_plane(
    h: torch.Tensor,
    basis: torch.Tensor,
    write: torch.Tensor,
    gate: torch.Tensor | None = None,
    adaptive: bool = False,
) -> torch.Tensor:
    """SAS (AAS when `adaptive`: only tokens with h·b1 > 0), precompiled: h − x + ‖x‖(cosθ b1 + sinθ b2)."""
    c = _coords(h, basis)
    coef = torch.cat([c, c.norm(dim=-1, keepdim=True)], dim=-1)
    if adaptive:
        gate = (c[..., :1] > 0).to(h.dtype) if gate is None else gate * (c[..., :1] > 0).to(h.dtype)
    return h + _write(_gated(coef, gate), write)


def angular(
    h: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, theta: float, adaptive: bool = False
) -> torch.Tensor:
    """Standard (or adaptive) angular steering: set every token's in-plane angle to θ radians."""
    return angular_plane(h, plane_basis(b1, b2), angular_write(b1, b2, theta), adaptive=adaptive)


# -- projection-aware steering (StTP / StMP) ----------------------------------------------------

def project_steer(
    h: torch.Tensor,
    unit: torch.Tensor,
    bias: torch.Tensor,
    threshold: torch.Tensor,
    target: torch.Tensor,
    factor: float | torch.Tensor,
    write: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """With score s = h·ŵ + b: tokens with s < threshold get h + factor·(target − s)·ŵ; others are untouched.

    factor 1 is StTP (move onto the target score), factor 2 is StMP (mirror across the target).
    """
    unit = unit.reshape(1, -1) if unit.dim() == 1 else unit
    s = _coords(h, unit) + bias
    coef = torch.where(s < threshold, factor * (target - s), torch.zeros_like(s))
    return h + _write(_gated(coef, gate), unit if write is None else write)
