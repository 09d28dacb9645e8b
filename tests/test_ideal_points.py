"""Bradley–Terry ideal points (directions/ideal_points.py) on planted data: known ideal points, labels drawn
from the model itself."""

from __future__ import annotations

import pytest
import torch

from steerable.directions.ideal_points import (
    centre_by_prompt,
    choose_tau,
    dislike_weights,
    fit_ideal_points,
    fit_map,
    log_odds,
    mask_to_category,
    population_point,
    prompt_groups,
)
from steerable.errors import SteerableError


def planted(n_users: int, pairs: int | list[int], *, layers: int = 2, k: int = 3, spread: float = 1.0,
            flip: float = 0.0, seed: int = 0, center_scale: float = 20.0):
    """Features around a common centre (large, as real activations are), true points θ_pop + δ_u, and
    labels from P_u(a ≻ b) (each then flipped with probability `flip`: noisier pairs)."""
    gen = torch.Generator().manual_seed(seed)
    center = center_scale * torch.randn(layers, k, generator=gen, dtype=torch.float64)
    pop = center + 0.3 * torch.randn(layers, k, generator=gen, dtype=torch.float64)
    true = pop + spread * torch.randn(n_users, layers, k, generator=gen, dtype=torch.float64)
    counts = [pairs] * n_users if isinstance(pairs, int) else pairs
    user = torch.repeat_interleave(torch.arange(n_users), torch.tensor(counts))
    a = center + torch.randn(len(user), layers, k, generator=gen, dtype=torch.float64)
    b = center + torch.randn(len(user), layers, k, generator=gen, dtype=torch.float64)
    p = torch.sigmoid(log_odds(true[user], a, b))[:, 0]  # one label per pair, drawn at layer 0
    a_wins = torch.rand(len(user), generator=gen, dtype=torch.float64) < p
    a_wins ^= torch.rand(len(user), generator=gen, dtype=torch.float64) < flip
    # the same choice at every layer; layer 1 has its own true point, so label its pairs at layer 1's own
    chosen = torch.where(a_wins[:, None, None], a, b)
    rejected = torch.where(a_wins[:, None, None], b, a)
    return chosen, rejected, user, true, pop


def test_log_odds_is_the_ideal_point_model():
    theta, a, b = torch.randn(4), torch.randn(4), torch.randn(4)
    expect = ((b - theta) ** 2).sum() - ((a - theta) ** 2).sum()
    assert torch.allclose(log_odds(theta, a, b), expect.double())


def test_planted_ideal_points_are_recovered():
    ch, rj, user, true, _ = planted(20, 600, layers=1, k=3)
    fit = fit_ideal_points(ch, rj, user, 20, tau=50.0)
    err = (fit.theta.double() - true).norm(dim=-1) / (true - true.mean(0)).norm(dim=-1).mean()
    assert float(err.mean()) < 0.1
    assert float(err.max()) < 0.3
    # the deviations from the users' mean point point the planted way
    centre = true.mean(0)
    cos = torch.nn.functional.cosine_similarity(fit.theta.double() - centre, true - centre, dim=-1)
    assert float(cos.mean()) > 0.95


def test_tau_chosen_by_heldout_likelihood_recovers_planted_points():
    ch, rj, user, true, _ = planted(60, 40, layers=1, k=3)
    fit = fit_ideal_points(ch, rj, user, 60)
    dev = fit.theta.double() - fit.theta_pop.double()
    cos = torch.nn.functional.cosine_similarity(dev, true - true.mean(0), dim=-1)
    assert float(cos.mean()) > 0.8
    assert fit.selection["folds"] == 5
    assert len(fit.selection["heldout_loglik_per_pair"][0]) == len(
        fit.selection["grid_relative"])


def test_prior_shrinks_a_user_with_few_pairs_toward_the_population():
    counts = [3] * 20 + [200] * 20
    ch, rj, user, true, _ = planted(40, counts, layers=1, k=3)
    fit = fit_ideal_points(ch, rj, user, 40)
    dev = (fit.theta.double() - fit.theta_pop.double()).norm(dim=-1)[:, 0]
    true_dev = (true - fit.theta_pop.double()).norm(dim=-1)[:, 0]
    few, many = slice(0, 20), slice(20, 40)
    assert float((dev[few] / true_dev[few]).mean()) < 0.5  # 3 pairs: close to the population's point
    assert float((dev[many] / true_dev[many]).mean()) > 0.6  # 200 pairs: most of the way to its own
    # a 3-pair user under a weak prior strays further: the chosen τ is what held it back
    loose = fit_map(ch, rj, user, 40, prior_mean=fit.theta_pop, tau=fit.tau * 100)
    assert float((loose.double() - fit.theta_pop.double()).norm(dim=-1)[few].mean()) > float(dev[few].mean())


def test_noisier_pairs_choose_more_shrinkage():
    clean = planted(80, 12, layers=1, k=3, seed=3)
    noisy = planted(80, 12, layers=1, k=3, seed=3, flip=0.4)
    taus = []
    for ch, rj, user, _, _ in (clean, noisy):
        pop = population_point(ch, rj)
        tau, record = choose_tau(ch, rj, user, 80, prior_mean=pop)
        taus.append(float(tau[0]))
        assert record["how"].startswith("5-fold held-out")
    assert taus[1] < taus[0]


def test_vectorised_fit_equals_a_per_user_loop():
    counts = [1, 2, 3, 7, 15, 40, 0, 5]
    ch, rj, user, _, pop = planted(len(counts), counts, layers=2, k=4)
    tau = torch.tensor([0.05, 0.2], dtype=torch.float64)
    batched = fit_map(ch, rj, user, len(counts), prior_mean=pop, tau=tau)
    for u in range(len(counts)):
        mine = user == u
        alone = fit_map(ch[mine], rj[mine], torch.zeros(int(mine.sum()), dtype=torch.long), 1, prior_mean=pop,
                        tau=tau)[0]
        assert torch.allclose(batched[u], alone, atol=1e-6), u
    assert torch.allclose(batched[6], pop)  # no pairs: the prior mean


def test_users_without_pairs_keep_the_population_point():
    ch, rj, user, _, _ = planted(5, 10)
    fit = fit_ideal_points(ch, rj, user, 7)  # users 5 and 6 have no pairs
    assert torch.allclose(fit.theta[5], fit.theta_pop)
    assert torch.allclose(fit.theta[6], fit.theta_pop)
    assert fit.pair_counts.tolist() == [10] * 5 + [0, 0]


def test_chunked_layout_matches_one_chunk(monkeypatch):
    import steerable.directions.ideal_points as ip

    counts = [2, 9, 4, 30, 1, 12]
    ch, rj, user, _, pop = planted(len(counts), counts, layers=2, k=3)
    whole = fit_map(ch, rj, user, len(counts), prior_mean=pop, tau=0.1)
    monkeypatch.setattr(ip, "_DENSE_BUDGET", 60)  # a few users per chunk
    assert len(ip._chunks(ch, rj, user, len(counts), 2, 0)) > 2
    assert torch.allclose(fit_map(ch, rj, user, len(counts), prior_mean=pop, tau=0.1), whole, atol=1e-8)


def test_dislike_weights_are_each_users_mean_difference():
    ch, rj, user, _, _ = planted(3, [4, 1, 6])
    w = dislike_weights(ch, rj, user, 4)
    for u in range(3):
        assert torch.allclose(w[u].double(), (ch[user == u] - rj[user == u]).mean(0), atol=1e-5)
    assert torch.allclose(w[3].double(), (ch - rj).mean(0), atol=1e-5)  # no pairs: the population's


def test_bad_inputs_are_named():
    ch, rj, user, _, pop = planted(3, 4)
    with pytest.raises(SteerableError, match="user_index"):
        fit_map(ch, rj, user[:-1], 3, prior_mean=pop, tau=1.0)
    with pytest.raises(SteerableError, match="lie in"):
        fit_map(ch, rj, user, 2, prior_mean=pop, tau=1.0)
    with pytest.raises(SteerableError, match="tau"):
        fit_ideal_points(ch, rj, user, 3, tau=-1.0)
    with pytest.raises(SteerableError, match="NaN"):
        fit_map(ch * float("nan"), rj, user, 3, prior_mean=pop, tau=1.0)


def test_prompt_centring_leaves_each_prompts_mean_at_zero_and_the_log_odds_linear():
    gen = torch.Generator().manual_seed(3)
    phi = 30 + torch.randn(7, 2, 3, generator=gen, dtype=torch.float64)  # 7 responses, far from the origin
    groups = prompt_groups(["p", "q", "p", "r", "q", "q", "p"])
    assert groups.tolist() == [0, 1, 0, 2, 1, 1, 0]
    out = centre_by_prompt(phi, groups)
    for g in range(3):
        assert torch.allclose(out[groups == g].mean(0), torch.zeros(2, 3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out[3], torch.zeros(2, 3, dtype=torch.float64))  # a prompt with one response: 0
    # differences within a prompt are unchanged, and a two-response prompt's log-odds loses its offset
    assert torch.allclose(out[0] - out[2], phi[0] - phi[2])
    two = centre_by_prompt(phi[:2], torch.tensor([0, 0]))
    theta = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    assert torch.allclose(log_odds(theta, two[0], two[1]), (2 * theta * (phi[0] - phi[1])).sum(-1))
    with pytest.raises(SteerableError, match="one prompt per response"):
        centre_by_prompt(phi, groups[:3])


def test_tau_is_chosen_on_a_bounded_sample_of_users(monkeypatch):
    import steerable.directions.ideal_points as ip

    ch, rj, user, _, pop = planted(40, 8, layers=1, k=2, spread=0.5, seed=4)
    full = fit_ideal_points(ch, rj, user, 40, theta_pop=pop)
    assert full.selection["users"] == 40
    monkeypatch.setattr(ip, "TAU_USERS", 15)
    sampled = fit_ideal_points(ch, rj, user, 40, theta_pop=pop)
    assert sampled.selection["users"] == 15
    assert sampled.theta.shape == full.theta.shape  # every user is still fitted
    # a sample of 15 users picks a τ on the same grid, within one grid step of all 40 users' choice
    ratio = float(sampled.tau[0] / full.tau[0])
    assert 10 ** -0.51 <= ratio <= 10 ** 0.51


def test_category_mask_keeps_each_response_on_its_own_axis():
    phi = torch.arange(24, dtype=torch.float64).reshape(4, 2, 3)
    out = mask_to_category(phi, torch.tensor([0, 2, -1, 1]))
    assert torch.equal(out[0, :, 0], phi[0, :, 0])
    assert bool((out[0, :, 1:] == 0).all())
    assert torch.equal(out[1, :, 2], phi[1, :, 2])
    assert bool((out[1, :, :2] == 0).all())
    assert torch.equal(out[2], phi[2])  # no category axis: every axis kept
    assert torch.equal(out[3, :, 1], phi[3, :, 1])
    with pytest.raises(SteerableError, match="beyond the basis"):
        mask_to_category(phi, torch.tensor([0, 3, 0, 0]))


def masked_planted(n_users: int, pairs: int, spread: tuple[float, ...], seed: int = 0):
    """Category-masked, prompt-centred pairs: pair i lies on axis i % K alone (φ(a) = −φ(b) there), users'
    true points θ_pop + δ_u with a per-axis spread of δ, labels drawn from the model."""
    gen = torch.Generator().manual_seed(seed)
    k = len(spread)
    pop = 0.5 * torch.randn(1, k, generator=gen, dtype=torch.float64)
    true = pop + torch.tensor(spread, dtype=torch.float64) * torch.randn(n_users, 1, k, generator=gen,
                                                                         dtype=torch.float64)
    user = torch.arange(n_users).repeat_interleave(pairs)
    axis = torch.arange(len(user)) % k
    half = torch.nn.functional.one_hot(axis, k).double()[:, None, :] * torch.randn(len(user), 1, 1, generator=gen,
                                                                                   dtype=torch.float64)
    a, b = half, -half
    a_wins = torch.rand(len(user), generator=gen, dtype=torch.float64) < torch.sigmoid(log_odds(true[user], a, b))[:, 0]
    chosen = torch.where(a_wins[:, None, None], a, b)
    rejected = torch.where(a_wins[:, None, None], b, a)
    return chosen, rejected, user, axis, true


def test_tau_per_axis_follows_how_much_users_disagree_on_each_axis():
    ch, rj, user, axis, true = masked_planted(150, 24, spread=(2.0, 0.02, 1.0))
    pop = population_point(ch, rj)
    tau, record = choose_tau(ch, rj, user, 150, prior_mean=pop, pair_axis=axis)
    assert tau.shape == (1, 3)
    assert record["per_axis"]
    assert float(tau[0, 0]) > 3 * float(tau[0, 1])  # users agree on axis 1: shrink it hard
    assert float(tau[0, 2]) > 3 * float(tau[0, 1])
    # the fits separate by axis: the per-axis prior fit equals each axis fitted alone with its own τ
    joint = fit_map(ch, rj, user, 150, prior_mean=pop, tau=tau)
    for j in range(3):
        mine = axis == j
        alone = fit_map(ch[mine][..., j : j + 1], rj[mine][..., j : j + 1], user[mine], 150,
                        prior_mean=pop[:, j : j + 1], tau=tau[:, j])
        assert torch.allclose(joint[..., j : j + 1].double(), alone.double(), atol=1e-6)
    # and the per-axis prior recovers the users' own points better than one τ for every axis
    per_axis = fit_ideal_points(ch, rj, user, 150, pair_axis=axis)
    per_layer = fit_ideal_points(ch, rj, user, 150)
    err = [float((f.theta.double() - true).norm(dim=-1).mean()) for f in (per_axis, per_layer)]
    assert err[0] < err[1]
    assert per_axis.tau.shape == (1, 3)
    assert per_layer.tau.shape == (1,)


def test_tau_per_axis_refuses_pairs_off_their_axis():
    ch, rj, user, axis, _ = masked_planted(20, 6, spread=(1.0, 1.0))
    pop = population_point(ch, rj)
    with pytest.raises(SteerableError, match="not on their axis"):
        choose_tau(ch, rj, user, 20, prior_mean=pop, pair_axis=(axis + 1) % 2)
    with pytest.raises(SteerableError, match="one axis per pair"):
        choose_tau(ch, rj, user, 20, prior_mean=pop, pair_axis=axis[:-1])
    with pytest.raises(SteerableError, match="one per layer and axis"):
        fit_ideal_points(ch, rj, user, 20, tau=torch.ones(1, 3))
