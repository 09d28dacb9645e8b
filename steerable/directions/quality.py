"""How good a direction is at a layer: held-out AUROC and Cohen's d, and projection percentiles."""

from __future__ import annotations

import math

import torch

PERCENTILES = torch.arange(101, dtype=torch.float32)  # 0, 1, …, 100


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score_pos > score_neg) + ½ P(tie): the Mann–Whitney form of the area under the ROC curve."""
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    scores = torch.cat([pos, neg]).double()
    ranks = _average_ranks(scores)
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    i = 0
    n = len(x)
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def cohens_d(pos: torch.Tensor, neg: torch.Tensor) -> float:
    if len(pos) < 2 or len(neg) < 2:
        return math.nan
    pooled = ((len(pos) - 1) * pos.var() + (len(neg) - 1) * neg.var()) / (len(pos) + len(neg) - 2)
    return float((pos.mean() - neg.mean()) / pooled.clamp_min(1e-12).sqrt())


def percentiles(x: torch.Tensor) -> torch.Tensor:
    if len(x) == 0:
        return torch.full((len(PERCENTILES),), math.nan)
    return torch.quantile(x.double(), PERCENTILES.double() / 100).float()


def cast_score(h: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """CAST condition similarity cos(h, tanh(P_c h)) with P_c = ĉĉᵀ, per row of h [..., d].

    tanh is odd, so for small projections this is ≈ |cos(h, ĉ)|: it measures how strongly h lies
    along the condition direction, not on which side.
    """
    projected = torch.tanh((h @ unit)[..., None] * unit)
    return torch.nn.functional.cosine_similarity(h, projected, dim=-1, eps=1e-12)
