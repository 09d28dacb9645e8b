"""Each estimator recovers a direction planted in synthetic activations; quality statistics are right."""

from __future__ import annotations

import math

import pytest
import torch

from steerable.capture.stats import ClassStats, LayerStats
from steerable.directions.estimators import ESTIMATORS, get_estimator
from steerable.directions.quality import auroc, cohens_d, percentiles
from steerable.errors import SteerableError


def planted(d: int = 24, n: int = 400, seed: int = 0, second_moments: bool = True):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    base = torch.randn(n, d, generator=g) * 0.5 + 3.0  # shared content of each pair
    # Anisotropic nuisance variance, orthogonal to u, so only a real estimator finds u.
    nuis = torch.randn(d, generator=g)
    nuis -= (nuis @ u) * u
    nuis /= nuis.norm()
    shift = (2.0 + 1.5 * torch.randn(n, 1, generator=g)) * u  # pair differences vary along u
    base = base + torch.randn(n, 1, generator=g) * 2.0 * nuis  # shared by both members of a pair
    pos = base + shift / 2 + 0.1 * torch.randn(n, d, generator=g)
    neg = base - shift / 2 + 0.1 * torch.randn(n, d, generator=g)
    st = LayerStats(d, second_moments=second_moments)
    heldout = torch.arange(n) % 5 == 4
    st.add(pos, torch.ones(n, dtype=torch.long), heldout)
    st.add(neg, torch.zeros(n, dtype=torch.long), heldout)
    st.add_pair_diffs((pos - neg)[~heldout])
    return st, u


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimator_recovers_planted_direction(name):
    st, u = planted()
    est = get_estimator(name).fn(st)
    assert abs(float(est.direction.norm()) - 1) < 1e-5
    cos = float(est.direction @ u)
    assert cos > 0.95, f"{name}: cos={cos:.3f}"  # and oriented toward the positive class


def test_logistic_keeps_intercept_as_boundary():
    st, _u = planted()
    est = get_estimator("logistic").fn(st)
    s_pos = st.pos.sample.rows @ est.direction + est.bias
    s_neg = st.neg.sample.rows @ est.direction + est.bias
    # symmetric classes: the boundary s = 0 sits midway between them, and classifies well
    gap = float(s_pos.mean() - s_neg.mean())
    assert abs(float(s_pos.mean() + s_neg.mean())) < 0.1 * gap
    acc = (float((s_pos > 0).float().mean()) + float((s_neg < 0).float().mean())) / 2
    assert acc > 0.8


def spurious_coordinate(d: int = 16, n: int = 300, seed: int = 0):
    """Classes ±1 along a planted u, overlapping there (within-class spread 0.7), tiny isotropic noise (0.01), and
    a coordinate v ⟂ u of tiny variance that separates the training sample perfectly (±0.003 ± 0.0005): the trap
    of a probe on standardised features, which blows v and the noise coordinates up to unit variance."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u /= u.norm()
    v = torch.randn(d, generator=g, dtype=torch.float64)
    v -= (v @ u) * u
    v /= v.norm()
    centre = 3.0 + torch.randn(d, generator=g, dtype=torch.float64)

    def draw(sign: float) -> torch.Tensor:
        along = sign + 0.7 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        x = centre + along * u + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
        x -= ((x - centre) @ v)[:, None] * v  # v carries only the spurious signal
        return (x + (sign * 0.003 + 0.0005 * torch.randn(n, 1, generator=g, dtype=torch.float64)) * v).float()

    pos, neg = draw(1.0), draw(-1.0)
    st = LayerStats(d, reservoir_cap=n)
    st.add(pos, torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))
    st.add(neg, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))
    return st, u.float(), v.float()


def test_logistic_ignores_a_low_variance_coordinate_that_separates_the_sample():
    st, u, v = spurious_coordinate()
    xp, xn = st.pos.sample.rows, st.neg.sample.rows
    assert float((xp @ v).min()) > float((xn @ v).max())  # v separates the training sample perfectly
    assert float((xp @ u).min()) < float((xn @ u).max())  # u does not
    est = get_estimator("logistic").fn(st)
    assert abs(float(est.direction.norm()) - 1) < 1e-5
    cos = float(est.direction @ u)
    assert cos >= 0.99, f"cos={cos:.4f}"
    # the intercept puts the boundary (score 0) between the class means, near the middle (symmetric classes)
    s_pos = float(st.pos.mean.float() @ est.direction) + est.bias
    s_neg = float(st.neg.mean.float() @ est.direction) + est.bias
    assert s_pos > 0 > s_neg
    assert abs(s_pos + s_neg) < 0.1 * (s_pos - s_neg)


def test_logistic_bias_follows_a_shift_of_the_activations():
    """bias is in projection units on raw features: shifting every activation by c moves it by −ŵ·c."""
    st, _u, _v = spurious_coordinate(seed=1)
    shift = torch.full((st.d,), 5.0)
    moved = LayerStats(st.d, reservoir_cap=len(st.pos.sample.rows))
    n = len(st.pos.sample.rows)
    moved.add(st.pos.sample.rows + shift, torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))
    moved.add(st.neg.sample.rows + shift, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))
    a, b = get_estimator("logistic").fn(st), get_estimator("logistic").fn(moved)
    assert float(a.direction @ b.direction) > 1 - 1e-4
    assert b.bias == pytest.approx(a.bias - float(b.direction @ shift), abs=1e-3)


def test_unknown_estimator_named():
    with pytest.raises(SteerableError, match="unknown estimator 'svm'"):
        get_estimator("svm")


def test_auroc_and_cohens_d_by_hand():
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auroc(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])) == 0.5
    assert auroc(torch.tensor([2.0]), torch.tensor([2.0])) == 0.5
    assert math.isnan(auroc(torch.tensor([]), torch.tensor([1.0])))
    # pooled sd of [0,2] and [4,6] is sqrt(2); means differ by 4
    assert cohens_d(torch.tensor([4.0, 6.0]), torch.tensor([0.0, 2.0])) == pytest.approx(4 / math.sqrt(2))
    p = percentiles(torch.arange(101, dtype=torch.float32))
    assert p[25] == 25
    assert p[50] == 50
    assert p[100] == 100


def test_class_stats_mean_unit_streams():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g) * torch.rand(50, 1, generator=g) * 10
    x[7] = 0  # a zero row contributes nothing instead of NaN
    st = ClassStats(6, second_moments=False, reservoir_cap=4)
    for chunk in x.split(13):
        st.add(chunk)
    expected = torch.nn.functional.normalize(x.double(), dim=1).sum(0) / 50
    torch.testing.assert_close(st.mean_unit, expected)
    assert st.mean_unit.dtype == torch.float64
