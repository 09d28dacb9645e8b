"""Interventions as pure tensor functions (h, params) → h', O(d) per token (methods.md §5).

`h` is [..., d]; parameters broadcast against it, so one vector [d] serves a whole batch and a
[batch, 1, d] tensor gives every row its own. No d×d matrix is ever built.
"""

from __future__ import annotations

import torch


def add(h: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """ActAdd / CAA: h + α·v, with α already folded into `vector`."""
    return h + vector


def ablate(h: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Directional ablation: h − (h·r̂) r̂, leaving h·r̂ = 0."""
    return h - (h * unit).sum(-1, keepdim=True) * unit
