"""The training-time steering terms of methods.md §6, as pure tensor functions, and what they are measured against.

Every term is a mean over response tokens (the `mask` of a batch: True at the positions of response tokens) and,
with several layers, a mean over the layers (ours: the section defines one layer's term). `â` is the unit
direction pointing toward the Assistant: the file's direction for an Assistant Axis (its positive class is the
Assistant), its negative for a trait vector (a persona vector or a CAA direction, whose positive class is the
trait). The reference statistics (`p_ref`, `μ_assist`) are the base model's Assistant-class means recorded in the
direction file at calibration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from steerable.directions.artifact import DirectionSet
from steerable.errors import SteerableError

TERMS = ("aux", "actreg", "contrastive")  # the loss terms a method may add; logged as "<term>_loss"


@dataclass(frozen=True)
class Reference:
    """Per layer: `unit[ℓ]` = â (toward the Assistant), `p_ref[ℓ]` = μ_assist·â, `mean[ℓ]` = μ_assist."""

    layers: tuple[int, ...]
    unit: dict[int, torch.Tensor]
    p_ref: dict[int, float]
    mean: dict[int, torch.Tensor]
    assistant_class: str  # "positive" (an axis) or "negative" (a trait vector)

    def to(self, ref: torch.Tensor) -> Reference:
        """The same statistics on `ref`'s device and dtype."""
        d, t = ref.device, ref.dtype
        return Reference(self.layers, {k: v.to(device=d, dtype=t) for k, v in self.unit.items()}, dict(self.p_ref),
                         {k: v.to(device=d, dtype=t) for k, v in self.mean.items()}, self.assistant_class)


def assistant_is_positive(ds: DirectionSet) -> bool:
    """An Assistant Axis points toward the Assistant; every other direction file points toward its trait."""
    return "axis" in ds.meta


def reference(ds: DirectionSet, layers: Sequence[int]) -> Reference:
    """The Assistant-class statistics of `ds` at `layers` (each must be calibrated in the file)."""
    missing = [x for x in layers if x not in ds.layers]
    if missing:
        raise SteerableError(f"layers {missing} are not calibrated in {ds.label} (it has {ds.layers})")
    positive = assistant_is_positive(ds)
    unit, p_ref, mean = {}, {}, {}
    for layer in layers:
        i = ds.row(layer)
        a = ds.directions[i].double()
        a = a if positive else -a
        mu = (ds.mean_pos if positive else ds.mean_neg)[i].double()
        if not bool(torch.isfinite(mu).all()):
            raise SteerableError(f"{ds.label} has no class means at layer {layer} (a combined or imported set): "
                                 "the auxiliary and regularisation terms need them")
        # clones: a set calibrated under inference_mode holds inference tensors, which autograd cannot save
        unit[layer] = a.float().clone()
        p_ref[layer] = float(mu @ a)
        mean[layer] = mu.float().clone()
    return Reference(tuple(layers), unit, p_ref, mean, "positive" if positive else "negative")


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of [B, T] values over the True positions of `mask` (zero when there are none)."""
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def aux_term(h: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor, p_ref: float) -> torch.Tensor:
    """mean_t (h_t·â − p_ref)²: the auxiliary projection loss (before λ) at one layer."""
    return _masked_mean((h @ unit - p_ref) ** 2, mask)


def actreg_term(h: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """mean_t ‖h_t − μ_assist‖²: activation regularisation (before λ) at one layer."""
    return _masked_mean(((h - mean) ** 2).sum(-1), mask)


def contrastive_term(proj: torch.Tensor, base_proj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_t relu(−(h_t − h_t^base)·â)², from the projections h·â and h^base·â (the frozen model's, on the same
    tokens): the contrastive gradient penalty (before λ) at one layer. Only the projections are needed, so the
    frozen activations are kept as one number per token."""
    return _masked_mean(torch.relu(-(proj - base_proj)) ** 2, mask)


def steering_terms(hidden: Mapping[int, torch.Tensor], mask: torch.Tensor, ref: Reference, terms: Sequence[str],
                   base_proj: Mapping[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Each requested term, averaged over `ref.layers`; `hidden[ℓ]` is [B, T, d], `base_proj[ℓ]` [B, T]."""
    out: dict[str, torch.Tensor] = {}
    for term in terms:
        vals = []
        for layer in ref.layers:
            h = hidden[layer]
            if term == "aux":
                vals.append(aux_term(h, mask, ref.unit[layer], ref.p_ref[layer]))
            elif term == "actreg":
                vals.append(actreg_term(h, mask, ref.mean[layer]))
            elif term == "contrastive":
                if base_proj is None:
                    raise SteerableError("the contrastive term needs the frozen model's projections")
                vals.append(contrastive_term(h @ ref.unit[layer], base_proj[layer], mask))
            else:
                raise SteerableError(f"unknown loss term {term!r}: use {', '.join(TERMS)}")
        out[term] = torch.stack(vals).mean()
    return out


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens; labels are −100 elsewhere."""
    shifted = logits[:, :-1].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1),
                                             ignore_index=-100)


__all__ = ["TERMS", "Reference", "actreg_term", "assistant_is_positive", "aux_term", "contrastive_term",
           "reference", "steering_terms", "task_loss"]
