"""The cheap half of tuning: a KL budget is checked with forward passes alone, before any generation."""

from __future__ import annotations

from steerable.evaluate.logits import kl_grid
from steerable.models.load import ModelHandle
from steerable.sweeps.grid import Config
from steerable.sweeps.run import SweepSpec


def prefilter_kl(handle: ModelHandle, spec: SweepSpec, max_kl: float) -> tuple[list[Config], list[Config]]:
    """(configurations to generate, configurations over the KL budget). Every configuration's KL (reply start) on the
    benign prompts (else the prompts) costs two forward passes per prompt; the values are kept in
    `spec.known_kl` so the sweep does not pay for them again."""
    steered = [c for c in spec.configs if not c.is_baseline]
    rows = spec.benign or spec.prompts
    kls = kl_grid(handle, [r["prompt"] for r in rows], [c.plan(spec.vector, spec.plan_extra) for c in steered],
                  batch_size=spec.score_batch_size, last_only=True)
    spec.known_kl.update(zip(steered, kls, strict=True))
    keep = [c for c in spec.configs if c.is_baseline or spec.known_kl[c] <= max_kl]
    return keep, [c for c in steered if spec.known_kl[c] > max_kl]
