"""Direction estimators (methods.md §3). Each maps one layer's statistics to a unit direction.

Every direction is oriented so that the positive class projects higher than the negative one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from steerable.capture.stats import LayerStats
from steerable.errors import SteerableError


@dataclass(frozen=True)
class Estimate:
    direction: torch.Tensor  # unit, float32 [d]
    bias: float = math.nan  # logistic probe only: score = direction·h + bias (in projection units)


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise SteerableError("estimated direction is zero or not finite (are both classes non-empty and different?)")
    return (v / n).float()


def _oriented(v: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return v if float((stats.pos.mean - stats.neg.mean) @ v.double()) >= 0 else -v


def mean_diff(stats: LayerStats) -> Estimate:
    return Estimate(_unit(stats.pos.mean - stats.neg.mean))


def pca(stats: LayerStats) -> Estimate:
    """First principal component of the centred pair differences, sign-flipped toward the positive class."""
    if stats.n_pairs < 2:
        raise SteerableError("pca needs at least 2 training pairs")
    _, vecs = torch.linalg.eigh(stats.diff_covariance())
    return Estimate(_oriented(_unit(vecs[:, -1]), stats))


def lda(stats: LayerStats, shrinkage: float = 0.1) -> Estimate:
    """(ours) Shrinkage LDA: (Σ_w + λI)⁻¹(μ_P − μ_N), with λ = shrinkage · trace(Σ_w)/d."""
    cov = (stats.pos.covariance() * stats.pos.n + stats.neg.covariance() * stats.neg.n) / max(
        stats.pos.n + stats.neg.n, 1
    )
    lam = shrinkage * float(torch.trace(cov)) / cov.shape[0] + 1e-8
    v = torch.linalg.solve(cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype), stats.pos.mean - stats.neg.mean)
    return Estimate(_oriented(_unit(v), stats))


def logistic(stats: LayerStats, l2: float = 1e-2, steps: int = 200) -> Estimate:
    """L2-regularised logistic regression on standardised features, mapped back (w/σ), intercept kept."""
    xp, xn = stats.pos.sample.rows, stats.neg.sample.rows
    if len(xp) == 0 or len(xn) == 0:
        raise SteerableError("logistic needs samples of both classes")
    x = torch.cat([xp, xn]).double()
    y = torch.cat([torch.ones(len(xp)), torch.zeros(len(xn))]).double()
    mu, sigma = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sigma
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w @ w) / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(loss_fn)
    w_raw = w.detach() / sigma
    b_raw = float(b.detach()) - float(w_raw @ mu)
    norm = float(w_raw.norm())
    return Estimate(_unit(w_raw), b_raw / norm)


@dataclass(frozen=True)
class Estimator:
    name: str
    fn: Callable[[LayerStats], Estimate]
    second_moments: bool


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator("mean-diff", mean_diff, False),
        Estimator("pca", pca, True),
        Estimator("logistic", logistic, False),
        Estimator("lda", lda, True),
    )
}


def get_estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise SteerableError(f"unknown estimator {name!r}: use one of {', '.join(ESTIMATORS)}") from None
