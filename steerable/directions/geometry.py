"""Layer geometry and selection (methods.md §4): global direction b1, plane, discriminative and top-k layers."""

from __future__ import annotations

import math

import torch

from steerable.directions.artifact import DirectionSet
from steerable.errors import SteerableError


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


def plane(ds: DirectionSet, b1_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal rotation plane (b1, b2) for angular steering (float32 unit vectors, b1·b2 ≈ 0).

    b1 = `b1_layer`'s direction, or the global direction. b2 = the first principal component of the
    centred per-layer directions made orthogonal to b1 (Gram–Schmidt); when that is degenerate (one
    layer, or PC1 parallel to b1) the next PC, and failing all PCs the basis vector least aligned with b1.
    The sign of b2 is fixed (largest-magnitude component positive) because SVD's sign is arbitrary.
    """
    b1 = (ds.direction(b1_layer) if b1_layer is not None else global_direction(ds)[0]).double()
    b1 = b1 / b1.norm()
    dirs = ds.directions.double()
    _, s, vh = torch.linalg.svd(dirs - dirs.mean(0), full_matrices=False)
    fallback = torch.zeros_like(b1)
    fallback[int(b1.abs().argmin())] = 1.0
    candidates = [vh[i] for i in range(len(s)) if float(s[i]) > 1e-6] + [fallback]
    for c in candidates:
        r = c - (c @ b1) * b1
        if float(r.norm()) > 1e-4:  # candidates are unit vectors: this is "not (nearly) parallel to b1"
            b2 = r / r.norm()
            b2 = b2 - (b2 @ b1) * b1  # second pass removes float64 residue
            b2 = b2 / b2.norm()
            if float(b2[int(b2.abs().argmax())]) < 0:
                b2 = -b2
            return b1.float(), b2.float()
    raise AssertionError("unreachable: the basis vector least aligned with a unit b1 is never parallel to it")


def discriminative_layers(ds: DirectionSet, b1: torch.Tensor | None = None) -> list[int]:
    """Selective Steering's layers: μ_P(ℓ)·μ_N(ℓ) < 0, with μ_c(ℓ) = mean over class c of (h/‖h‖)·b1.

    The class means project with opposite signs along b1 (default: the global direction), so a rotation
    in the (b1, b2) plane separates them there; elsewhere it would move both classes alike.
    """
    if ds.mean_unit_pos is None or ds.mean_unit_neg is None:
        raise SteerableError(
            "this direction set has no per-class mean unit activations (mean_unit_pos/neg), which the "
            "discriminative layer criterion needs: recalibrate with this version of steerable"
        )
    b1 = global_direction(ds)[0] if b1 is None else b1
    if tuple(b1.shape) != (ds.hidden_size,):
        raise SteerableError(f"b1 has shape {tuple(b1.shape)}, expected ({ds.hidden_size},)")
    b1 = b1.double()
    mu_p = ds.mean_unit_pos.double() @ b1
    mu_n = ds.mean_unit_neg.double() @ b1
    return [layer for layer, opposite in zip(ds.layers, (mu_p * mu_n < 0).tolist(), strict=True) if opposite]


QUALITY = ("auroc", "cohens_d")


def top_layers(
    ds: DirectionSet, k: int, by: str = "auroc", skip_last: float = 0.2, n_layers: int | None = None
) -> list[int]:
    """The k calibrated layers with the best held-out `by` ("auroc" or "cohens_d"), sorted ascending.

    Ties are broken by the other statistic, then by the lower layer. Layers ℓ ≥ (1 − skip_last)·n_layers
    are skipped (methods.md §4): late blocks can read the behaviour well, yet a change written there has
    few blocks left to act through. n_layers comes from the artifact's model metadata, or is taken as
    max(layers) + 1 when that is unknown. Layers whose statistic is NaN (imported control vectors) are
    never picked.
    """
    if by not in QUALITY:
        raise SteerableError(f"unknown layer quality {by!r}: use one of {', '.join(QUALITY)}")
    if k < 1:
        raise SteerableError(f"k must be at least 1, got {k}")
    if not 0 <= skip_last < 1:
        raise SteerableError(f"skip_last must be in [0, 1), got {skip_last}")
    if n_layers is None:
        n_layers = ds.meta.get("model", {}).get("n_layers") or max(ds.layers) + 1
    primary = getattr(ds, by).tolist()
    secondary = getattr(ds, QUALITY[1 - QUALITY.index(by)]).tolist()
    cutoff = (1 - skip_last) * n_layers
    rows = [i for i, layer in enumerate(ds.layers) if layer < cutoff and not math.isnan(primary[i])]
    if not rows:
        raise SteerableError(
            f"no calibrated layer below {cutoff:g} (skipping the last {skip_last:.0%} of {n_layers}) has a "
            f"finite {by}"
        )

    def key(i: int) -> tuple[float, float, int]:
        tie = secondary[i] if not math.isnan(secondary[i]) else -math.inf
        return (-primary[i], -tie, ds.layers[i])
    return sorted(ds.layers[i] for i in sorted(rows, key=key)[:k])
