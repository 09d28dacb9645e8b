"""Layer selection (discriminative, plane, top-k) and CAST condition choice on hand-built direction sets."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from steerable.cli.commands import cmd_inspect, inspect_table
from steerable.directions.artifact import DirectionSet, save_directions
from steerable.directions.cast_calibration import CastChoice, choose_cast, heldout_rates
from steerable.directions.geometry import discriminative_layers, global_direction, plane, top_layers
from steerable.errors import SteerableError


def make_ds(directions: torch.Tensor, layers: list[int] | None = None, **kw) -> DirectionSet:
    n, d = directions.shape
    nan = torch.full((n,), math.nan)
    fields = dict(
        layers=layers if layers is not None else list(range(n)),
        directions=torch.nn.functional.normalize(directions.float(), dim=1),
        raw_norms=torch.ones(n), scales=torch.ones(n), bias=nan, mean_pos=torch.zeros(n, d),
        mean_neg=torch.zeros(n, d), percentiles=torch.zeros(n, 2, 101), auroc=nan.clone(), cohens_d=nan.clone(),
        meta={"model": {"n_layers": n}},
    )
    fields.update(kw)
    ds = DirectionSet(**fields)
    ds.validate()
    return ds


def uniform(lo: float, hi: float) -> torch.Tensor:
    """Percentiles 0..100 of a uniform distribution on [lo, hi]."""
    return lo + (hi - lo) * torch.arange(101, dtype=torch.float32) / 100


def cast_curves(train: list[tuple[float, float]], heldout: list[tuple[float, float]] | None = None) -> torch.Tensor:
    """[fold, class, 101] from (lo, hi) of positives then negatives; held-out defaults to the train curves."""
    heldout = heldout or train
    return torch.stack([torch.stack([uniform(*c) for c in fold]) for fold in (train, heldout)])


# ── discriminative ─────────────────────────────────────────────────────────────────────────────────

def test_discriminative_picks_opposite_sign_layers():
    d = 4
    e0 = torch.eye(d)[0]
    # (μ_P·b1, μ_N·b1) per layer; only layers 0, 2 and 5 have opposite signs (a zero is not opposite)
    signs = [(0.5, -0.2), (0.5, 0.1), (-0.3, 0.4), (-0.1, -0.6), (0.2, 0.0), (0.05, -0.01)]
    mup = torch.zeros(len(signs), d)
    mun = torch.zeros(len(signs), d)
    mup[:, 0] = torch.tensor([p for p, _ in signs])
    mun[:, 0] = torch.tensor([n for _, n in signs])
    mup[:, 1] = mun[:, 1] = 0.7  # a shared component off b1 must not matter
    ds = make_ds(e0.repeat(len(signs), 1), layers=[3, 4, 5, 6, 7, 8], mean_unit_pos=mup, mean_unit_neg=mun)
    assert discriminative_layers(ds, e0) == [3, 5, 8]
    assert discriminative_layers(ds, 3 * e0) == [3, 5, 8]  # only signs count
    assert discriminative_layers(ds) == [3, 5, 8]  # the global direction is e0 here
    assert discriminative_layers(ds, -e0) == [3, 5, 8]


def test_discriminative_needs_new_artifact():
    ds = make_ds(torch.randn(3, 8))
    with pytest.raises(SteerableError, match="recalibrate with this version"):
        discriminative_layers(ds)
    ds = make_ds(torch.randn(3, 8), mean_unit_pos=torch.zeros(3, 8), mean_unit_neg=torch.zeros(3, 8))
    with pytest.raises(SteerableError, match="b1 has shape"):
        discriminative_layers(ds, torch.ones(5))


# ── plane ──────────────────────────────────────────────────────────────────────────────────────────

def _gs(c: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    r = c - (c @ b1) * b1
    return r / r.norm()


@pytest.mark.parametrize("n", [1, 2, 6])
def test_plane_is_orthonormal(n):
    g = torch.Generator().manual_seed(n)
    ds = make_ds(torch.randn(n, 16, generator=g) + 2 * torch.randn(16, generator=g))
    b1, b2 = plane(ds)
    assert b1.dtype == b2.dtype == torch.float32
    assert float(b1.norm()) == pytest.approx(1, abs=1e-5)
    assert float(b2.norm()) == pytest.approx(1, abs=1e-5)
    assert abs(float(b1 @ b2)) < 1e-6
    torch.testing.assert_close(b1, global_direction(ds)[0])
    again = plane(ds)
    assert torch.equal(again[0], b1)  # deterministic, sign included
    assert torch.equal(again[1], b2)
    if n > 2:  # b2 is PC1 of the centred directions, made orthogonal to b1
        dirs = ds.directions.double()
        pc1 = torch.linalg.svd(dirs - dirs.mean(0), full_matrices=False)[2][0]
        assert abs(float(b2.double() @ _gs(pc1, b1.double()))) == pytest.approx(1, abs=1e-5)


def test_plane_given_layer_and_degenerate_pc():
    e = torch.eye(6)
    # PC1 of these three directions is e0 − e1-ish; with b1 = e0 the orthogonalised PC is still usable
    ds = make_ds(torch.stack([e[0], e[1], e[0] + e[1]]), layers=[2, 5, 9])
    b1, b2 = plane(ds, b1_layer=5)
    torch.testing.assert_close(b1, e[1])
    assert abs(float(b1 @ b2)) < 1e-6
    assert float(b2.norm()) == pytest.approx(1)
    # two directions differing only along b1's own axis: PC1 ∥ b1, so the fallback must kick in
    ds = make_ds(torch.stack([e[0], -e[0]]))
    b1, b2 = plane(ds, b1_layer=0)
    assert abs(float(b1 @ b2)) < 1e-6
    assert float(b2.norm()) == pytest.approx(1)
    with pytest.raises(SteerableError, match="not in this direction set"):
        plane(ds, b1_layer=7)


# ── top-k by quality ───────────────────────────────────────────────────────────────────────────────

def test_top_layers_skips_last_fifth_and_breaks_ties():
    n = 10
    auroc = torch.tensor([0.5, 0.6, 0.8, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 0.99])
    d = torch.tensor([0.1, 0.2, 1.0, 0.5, 2.0, 1.5, 1.8, 1.9, 3.0, 3.0])
    ds = make_ds(torch.randn(n, 8), auroc=auroc, cohens_d=d, meta={"model": {"n_layers": n}})
    # layers 8 and 9 are ≥ 0.8·10: skipped though best
    assert top_layers(ds, 3) == [5, 6, 7]
    assert top_layers(ds, 5) == [2, 4, 5, 6, 7]
    assert top_layers(ds, 4) == [4, 5, 6, 7]  # 2 and 4 tie on AUROC: 4 has the larger Cohen's d
    assert top_layers(ds, 3, skip_last=0) == [7, 8, 9]
    assert top_layers(ds, 2, by="cohens_d") == [4, 7]
    assert top_layers(ds, 3, n_layers=20) == [7, 8, 9]  # ℓ < 16 all kept
    assert top_layers(ds, 100) == list(range(8))


def test_top_layers_rejects_bad_input_and_nan():
    ds = make_ds(torch.randn(4, 8))  # imported-style: no quality statistics
    with pytest.raises(SteerableError, match="finite auroc"):
        top_layers(ds, 2)
    with pytest.raises(SteerableError, match="unknown layer quality 'f1'"):
        top_layers(ds, 2, by="f1")
    with pytest.raises(SteerableError, match="k must be"):
        top_layers(ds, 0)
    ds.auroc = torch.tensor([0.9, math.nan, 0.7, 0.8])
    assert top_layers(ds, 2, skip_last=0) == [0, 3]


# ── CAST condition ─────────────────────────────────────────────────────────────────────────────────

def cond_ds(curves: list[torch.Tensor], counts: dict | None = None) -> DirectionSet:
    n = len(curves)
    return make_ds(torch.randn(n, 8), cast_percentiles=torch.stack(curves),
                   meta={"model": {"n_layers": n}, "counts": counts or {"heldout_pos": 10, "heldout_neg": 10}})


def test_condition_gap_takes_the_midpoint():
    ds = cond_ds([cast_curves([(0.6, 1.0), (0.0, 0.4)])])
    c = choose_cast(ds)
    assert isinstance(c, CastChoice)
    assert c.layer == 0
    assert c.compare == ">"
    # t_rec = positives' p5 = 0.62, t_neg = negatives' p95 = 0.38: midpoint 0.5
    assert c.threshold == pytest.approx(0.5)
    assert (c.recall, c.fpr, c.precision) == (1.0, 0.0, 1.0)
    assert (c.train_recall, c.train_fpr) == (1.0, 0.0)
    flipped = choose_cast(cond_ds([cast_curves([(0.0, 0.4), (0.6, 1.0)])]))
    assert flipped.compare == "<"
    assert flipped.threshold == pytest.approx(0.5)
    assert flipped.recall == 1.0


def test_condition_overlap_takes_the_recall_target_point():
    ds = cond_ds([cast_curves([(0.3, 1.0), (0.0, 0.5)])], counts={"heldout_pos": 10, "heldout_neg": 30})
    c = choose_cast(ds)
    assert c.compare == ">"
    assert c.threshold == pytest.approx(0.335)  # positives' p5
    assert c.train_recall == pytest.approx(0.95)
    assert c.train_fpr == pytest.approx(0.33)
    assert c.recall == pytest.approx(0.95)
    assert c.fpr == pytest.approx(0.33)
    assert c.precision == pytest.approx(9.5 / (9.5 + 0.33 * 30))
    c90 = choose_cast(ds, recall_target=0.9)
    assert c90.threshold == pytest.approx(0.37)
    assert c90.train_recall == pytest.approx(0.9)


def test_condition_estimates_come_from_the_heldout_fold():
    # held-out positives drift toward the negatives: the estimate must show the lost recall
    ds = cond_ds([cast_curves([(0.6, 1.0), (0.0, 0.4)], [(0.4, 0.8), (0.0, 0.4)])])
    c = choose_cast(ds)
    assert c.threshold == pytest.approx(0.5)
    assert c.train_recall == 1.0
    assert c.recall == pytest.approx(0.75)
    assert heldout_rates(ds, 0, c.threshold, c.compare) == pytest.approx((1.0, 0.75, 0.0))
    fixed = choose_cast(ds, threshold=0.7)
    assert fixed.threshold == 0.7
    assert fixed.recall == pytest.approx(0.25)
    assert fixed.train_recall == pytest.approx(0.75)
    assert heldout_rates(ds, 0, 0.2, "<") == pytest.approx((0.0, 0.0, 0.5))


def test_condition_layer_choice():
    overlap = cast_curves([(0.3, 1.0), (0.0, 0.5)])
    small_gap = cast_curves([(0.5, 1.0), (0.0, 0.45)])
    big_gap = cast_curves([(0.7, 1.0), (0.0, 0.3)])
    ds = cond_ds([overlap, small_gap, big_gap, big_gap])
    assert choose_cast(ds).layer == 2  # all gap layers have F1 = 1: largest normalised gap, lowest layer
    ds = cond_ds([big_gap, overlap])
    assert choose_cast(ds, layer=1).layer == 1
    # a gap on train is worth nothing if the held-out positives fall below the threshold
    drifted = cast_curves([(0.7, 1.0), (0.0, 0.3)], [(0.0, 0.6), (0.0, 0.3)])
    assert choose_cast(cond_ds([drifted, small_gap])).layer == 1


def test_condition_errors():
    ds = make_ds(torch.randn(2, 8))
    with pytest.raises(SteerableError, match="recalibrate with this version"):
        choose_cast(ds)
    ds = cond_ds([cast_curves([(0.6, 1.0), (0.0, 0.4)])])
    with pytest.raises(SteerableError, match="recall_target"):
        choose_cast(ds, recall_target=1.0)
    with pytest.raises(SteerableError, match="not in this direction set"):
        choose_cast(ds, layer=3)
    with pytest.raises(SteerableError, match="compare"):
        heldout_rates(ds, 0, 0.5, ">=")


# ── inspect ────────────────────────────────────────────────────────────────────────────────────────

def test_inspect_reports_selection(tmp_path, capsys):
    n, d = 5, 8
    g = torch.Generator().manual_seed(1)
    mup = torch.randn(n, d, generator=g)
    ds = make_ds(torch.randn(n, d, generator=g), auroc=torch.linspace(0.6, 0.9, n), cohens_d=torch.linspace(1, 2, n),
                 mean_unit_pos=mup, mean_unit_neg=-mup,
                 cast_percentiles=torch.stack([cast_curves([(0.6, 1.0), (0.0, 0.4)])] * n),
                 meta={"model": {"n_layers": n}, "counts": {"heldout_pos": 4, "heldout_neg": 4}})
    text = inspect_table(ds)
    assert "discriminative" in text
    assert "top-5 by AUROC" in text
    assert "condition (score cast, layer/threshold auto): layer 0" in text
    assert "condition (score auto, layer/threshold auto): layer 0" in text
    path = save_directions(ds, tmp_path / "v.safetensors")
    assert cmd_inspect(SimpleNamespace(file=path, json=True)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["selection"]["discriminative"] == list(range(n))  # μ_N = −μ_P: opposite signs everywhere
    assert out["selection"]["top_auroc"] == [0, 1, 2, 3]  # layer 4 is in the last 20 %
    assert out["condition"]["layer"] == 0
    assert out["condition"]["compare"] == ">"
    assert set(out["selection"]["conditions"]) == {"cast", "auto"}  # no projection percentiles in this set
    old = make_ds(torch.randn(n, d))  # no optional tensors, no statistics: criteria show as unavailable
    text = inspect_table(old)
    assert "recalibrate" in text
    assert "condition (score" not in text
