"""The cheap half of tuning: a KL budget is checked with forward passes alone, before any generation."""

from __future__ import annotations

from steerable.evaluate.logits import kl_grid
from steerable.models.load import ModelHandle
from steerable.sweeps.grid import Config
from steerable.sweeps.run import SweepSpec


def prefilter_kl(handle: ModelHandle, spec: SweepSpec,
                 max_kl: float) -> tuple[list[Config], list[Config], dict[Config, float]]:
    """(configurations to generate, configurations over the KL budget, the KL of every steered configuration).

    Every configuration's KL (reply start) on the benign prompts (else the prompts) costs two forward passes
    per prompt. `spec` is left as it is: hand the KLs to the sweep in `SweepSpec.known_kl` so it does not pay
    for them again, and sweep only the configurations kept (the baseline is always kept)."""
    steered = [c for c in spec.configs if not c.is_baseline]
    rows = spec.benign or spec.prompts
    values = kl_grid(handle, [r["prompt"] for r in rows], [c.plan(spec.vector, spec.plan_extra) for c in steered],
                     batch_size=spec.score_batch_size, last_only=True)
    kls = dict(zip(steered, values, strict=True))
    keep = [c for c in spec.configs if c.is_baseline or kls[c] <= max_kl]
    return keep, [c for c in steered if kls[c] > max_kl], kls
