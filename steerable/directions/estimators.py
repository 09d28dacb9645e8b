"""Direction estimators (methods.md §3). Each maps one layer's statistics to a unit direction.

Every direction is oriented so that the positive class projects higher than the negative one.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from steerable.capture.stats import LayerStats
from steerable.errors import SteerableError

log = logging.getLogger(__name__)


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


def logistic(stats: LayerStats, l2: float = 1.0, max_iter: int = 1000) -> Estimate:
    """L2-regularised logistic regression (scikit-learn, lbfgs) on the centred raw features, intercept kept.

    The fit minimises  mean_i ℓ(y_i, w·z_i + b) + (l2/2)‖w‖²  over z = (h − h̄)/s, where h̄ is the mean of the
    training sample and s² = tr Σ / d its average per-coordinate variance. s is one scalar, so the geometry is
    the raw one: no coordinate is amplified (standardising each coordinate, as this probe used to, made a
    near-constant coordinate that happens to separate the sample as cheap as the signal). On raw features this
    is scikit-learn's C = d / (l2 · N · tr Σ), N the number of training rows.

    The rule for the strength (ours) is scale- and size-free: `l2` is a penalty per training row in units of
    the average variance. For small weights the optimum is w ∝ (Σ_z + 4·l2·I)⁻¹(μ_P − μ_N) (balanced classes),
    a ridge discriminant on the total covariance with a ridge of 4·l2 times the average variance: with the
    default l2 = 1 the probe leaves the mean difference only along directions whose variance is well above
    average. In the synthetic lab (docs/persona.md) it recovers the planted axis as well as the mean
    difference at low noise and slightly better at high noise; a weaker penalty leans on sampling noise
    (l2 = 0.01: cosine 0.98 at σ = 0.1, n = 1000, against 0.9998).

    The direction is oriented so that the positive class projects higher; `bias` is the intercept in
    projection units on raw features: score = direction·h + bias (= (w_raw·h + b_raw)/‖w_raw‖).
    """
    # imported here: scikit-learn takes seconds to import, and only this estimator needs it
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    xp, xn = stats.pos.sample.rows, stats.neg.sample.rows
    if len(xp) == 0 or len(xn) == 0:
        raise SteerableError("logistic needs samples of both classes")
    if not (math.isfinite(l2) and l2 > 0):
        raise SteerableError(f"logistic: l2 must be a positive finite number, got {l2!r}")
    x = torch.cat([xp, xn]).double().cpu().numpy()
    y = np.concatenate([np.ones(len(xp)), np.zeros(len(xn))])
    mu = x.mean(0)
    xc = x - mu
    scale = math.sqrt(float(np.mean(np.sum(xc * xc, axis=1))) / x.shape[1])
    if not (math.isfinite(scale) and scale > 0):
        raise SteerableError("logistic: the training sample has no variance (are both classes different?)")
    model = LogisticRegression(C=1.0 / (l2 * len(x)), l1_ratio=0.0, solver="lbfgs", tol=1e-6, max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(xc / scale, y)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning(
            "logistic probe did not converge in %d iterations (l2=%g, %d rows, d=%d)", max_iter, l2, len(x), x.shape[1]
        )
    w_raw = torch.from_numpy(np.asarray(model.coef_[0], dtype=np.float64) / scale)
    norm = float(w_raw.norm())
    if not (math.isfinite(norm) and norm > 0):
        raise SteerableError("logistic: the fitted weights are zero or not finite (are both classes different?)")
    # logit = w·(h − h̄)/s + b = w_raw·h + b_raw
    b_raw = float(model.intercept_[0]) - float(w_raw @ torch.from_numpy(mu))
    bias = b_raw / norm
    direction = _unit(w_raw)
    if float((stats.pos.mean - stats.neg.mean) @ w_raw) < 0:  # the same boundary, scored toward the positive class
        direction, bias = -direction, -bias
    return Estimate(direction, bias)


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
