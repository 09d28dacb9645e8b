"""Properties of the synthetic lab (steerable.sim): axis recovery and the capping trade-off of seed 000."""

from __future__ import annotations

import json
import logging
import statistics

import pytest
import torch

from steerable.sim import (
    DEFAULT_TAUS,
    ESTIMATOR_NAMES,
    SimSpec,
    alignment_experiment,
    assistant_axis,
    cap_band,
    cap_floor,
    capping_experiment,
    estimate_all,
    main,
    make_world,
    sample_world,
    summary_text,
)


def _median(res: dict, name: str, sigma: float, n: int) -> float:
    return statistics.median(r["cosine"] for r in res["rows"]
                             if r["estimator"] == name and r["sigma"] == sigma and r["n"] == n)


@pytest.fixture(scope="module")
def default_grid() -> dict:
    return alignment_experiment([0.1, 1.0], [50, 1000], repeats=4, seed=1)


@pytest.fixture(scope="module")
def no_spread_grid() -> dict:
    """Persona strength fixed (κ = 0): the setting where LDA's within-class covariance is well conditioned."""
    return alignment_experiment([0.1, 1.0], [1000], repeats=3, seed=2, base=SimSpec(intensity_spread=0.0))


@pytest.mark.parametrize("name", ESTIMATOR_NAMES)
def test_alignment_rises_with_n(default_grid, name):
    assert _median(default_grid, name, 0.1, 1000) > _median(default_grid, name, 0.1, 50)


@pytest.mark.parametrize("name", ["assistant-axis", "mean-diff", "pca", "logistic"])
def test_estimators_recover_axis_at_low_noise(default_grid, name):
    assert _median(default_grid, name, 0.1, 1000) > 0.95


def test_lda_recovers_axis_when_persona_strength_is_fixed(no_spread_grid):
    assert _median(no_spread_grid, "lda", 0.1, 1000) > 0.95


@pytest.mark.parametrize("name", ["assistant-axis", "mean-diff", "pca", "logistic"])
def test_higher_noise_lowers_alignment(default_grid, name):
    assert _median(default_grid, name, 1.0, 1000) < _median(default_grid, name, 0.1, 1000)


def test_higher_noise_lowers_lda_alignment_when_strength_is_fixed(no_spread_grid):
    assert _median(no_spread_grid, "lda", 1.0, 1000) < _median(no_spread_grid, "lda", 0.1, 1000)


def test_strength_spread_costs_lda_at_low_noise(default_grid):
    # The sim's finding: variance along the axis within a class ill-conditions Σ_w (LDA); mean-diff is unaffected.
    md = _median(default_grid, "mean-diff", 0.1, 1000)
    assert md - _median(default_grid, "lda", 0.1, 1000) > 0.1


def test_logistic_recovers_axis_as_well_as_mean_diff_at_low_noise(default_grid):
    # Nearly separable classes (σ = 0.1): a probe fitted on per-coordinate standardised features leaned on
    # low-variance noise coordinates (0.76 here); the L2 fit on raw features must not.
    cos = [r["cosine"] for r in default_grid["rows"]
           if r["estimator"] == "logistic" and r["sigma"] == 0.1 and r["n"] == 1000]
    assert len(cos) == 4
    assert min(cos) >= 0.99
    assert _median(default_grid, "mean-diff", 0.1, 1000) - _median(default_grid, "logistic", 0.1, 1000) < 0.002


def test_logistic_keeps_up_with_mean_diff_at_high_noise(default_grid):
    assert _median(default_grid, "logistic", 1.0, 1000) > _median(default_grid, "mean-diff", 1.0, 1000) - 0.01


def test_assistant_axis_equals_mean_diff_when_roles_balanced():
    est = estimate_all(sample_world(SimSpec(n=400, sigma=0.5, seed=3)))
    assert float(est["assistant-axis"] @ est["mean-diff"]) > 1 - 1e-6


def test_assistant_axis_beats_mean_diff_when_roles_skewed():
    # unequal role counts bias the pooled mean by Σ p_r o_r; averaging role vectors first removes it
    sample = sample_world(SimSpec(n=1000, sigma=0.1, seed=4, role_skew=1.0))
    counts = torch.bincount(sample.role_ids)
    assert counts.max() > 3 * counts.min()
    aa = float(assistant_axis(sample) @ sample.axis)
    md = float(estimate_all(sample)["mean-diff"] @ sample.axis)
    assert aa > 0.99
    assert aa - md > 0.005


def test_world_geometry():
    spec = SimSpec(seed=5)
    w = make_world(spec, torch.Generator().manual_seed(5))
    assert abs(float(w.axis.norm()) - 1) < 1e-12
    assert torch.allclose(w.nuisance @ w.nuisance.T, torch.eye(spec.n_nuisance, dtype=torch.float64), atol=1e-12)
    assert float((w.nuisance @ w.axis).abs().max()) < 1e-12
    assert float((w.offsets @ w.axis).abs().max()) < 1e-12
    assert float(w.offsets.sum(0).abs().max()) < 1e-12
    s = sample_world(spec)
    assert s.assistant.shape == s.roles.shape == (spec.n, spec.d)
    assert len(s.role_ids) == spec.n
    assert torch.bincount(s.role_ids).tolist() == [spec.n // spec.n_roles] * spec.n_roles


def _projections(seed: int = 6) -> tuple[torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    axis = torch.randn(32, generator=g)
    axis /= axis.norm()
    return 3 * torch.randn(500, 32, generator=g), axis, 0.7


@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
def test_band_cap_clamps_and_leaves_inside_rows_bit_identical(tau):
    h, axis, centre = _projections()
    out = cap_band(h, axis, centre, tau)
    p, p_out = h @ axis - centre, out @ axis - centre
    assert float(p_out.abs().max()) <= tau + 1e-5
    inside = p.abs() <= tau
    assert 0 < int(inside.sum()) < len(h)
    assert torch.equal(out[inside], h[inside])
    delta = (out - h)[~inside]  # moved rows move along the axis only
    assert torch.allclose(delta - (delta @ axis)[:, None] * axis, torch.zeros_like(delta), atol=1e-5)


def test_floor_cap_only_raises():
    h, axis, centre = _projections()
    out = cap_floor(h, axis, centre, 0.5)
    p = h @ axis - centre
    assert float((out @ axis - centre).min()) >= -0.5 - 1e-5
    assert torch.equal(out[p >= -0.5], h[p >= -0.5])


@pytest.fixture(scope="module")
def capping() -> dict:
    return capping_experiment()


def test_f1_optimum_is_inside_the_tau_grid(capping):
    for mode, best in capping["best"].items():
        assert DEFAULT_TAUS[0] < best["tau"] < DEFAULT_TAUS[-1], mode
        assert best["H"] > 0.9
        assert best["C"] > 0.9
    assert min(r["F1"] for r in capping["rows"]) < 0.5  # the sweep spans a real trade-off


def test_floor_preserves_at_least_as_much_as_band(capping):
    band = {r["tau"]: r for r in capping["rows"] if r["mode"] == "band"}
    for r in capping["rows"]:
        if r["mode"] == "floor":
            assert r["C"] >= band[r["tau"]]["C"]


def test_deterministic_given_seed(capping):
    a, b = sample_world(SimSpec(seed=7)), sample_world(SimSpec(seed=7))
    assert torch.equal(a.assistant, b.assistant)
    assert torch.equal(a.roles, b.roles)
    assert not torch.equal(a.assistant, sample_world(SimSpec(seed=8)).assistant)
    assert capping_experiment() == capping
    small = {"sigmas": [0.5], "ns": [60], "repeats": 2, "seed": 9}
    assert alignment_experiment(**small) == alignment_experiment(**small)


def test_main_quick_writes_outputs(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="steerable.sim"):
        result = main(["--out", str(tmp_path), "--quick"])
    data = json.loads((tmp_path / "sim.json").read_text())
    assert {"spec", "alignment", "capping", "f1_optimum"} <= data.keys()
    assert data["f1_optimum"] == data["capping"]["best"]["band"]
    for png in ("sim_alignment.png", "sim_capping.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim.json", "sim_alignment.png", "sim_capping.png"]
    assert "best τ" in summary_text(result)
    assert summary_text(result) in caplog.text
