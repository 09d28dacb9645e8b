"""Layer geometry of a direction set: the global direction b1 and how layers relate (methods.md §4)."""

from __future__ import annotations

import torch

from steerable.directions.artifact import DirectionSet


def cosine_matrix(ds: DirectionSet) -> torch.Tensor:
    """Cosine between every pair of per-layer directions (they are unit vectors)."""
    return ds.directions @ ds.directions.T


def global_direction(ds: DirectionSet) -> tuple[torch.Tensor, int]:
    """b1: the per-layer direction with the highest mean cosine to all the others, and its layer."""
    cos = cosine_matrix(ds)
    n = cos.shape[0]
    mean_other = (cos.sum(1) - cos.diagonal()) / max(n - 1, 1)
    i = int(mean_other.argmax())
    return ds.directions[i], ds.layers[i]
