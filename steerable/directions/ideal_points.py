"""Bradley–Terry ideal points per user (methods.md §7), fitted for every user at once.

A user u prefers response a to b with P_u(a ≻ b) = σ(‖φ(b) − θ_u‖² − ‖φ(a) − θ_u‖²), φ = Bᵀh the response's
features on the basis. The log-odds is linear in θ: 2θ·(φ(a) − φ(b)) + ‖φ(b)‖² − ‖φ(a)‖², so a user's MAP
fit under the prior θ_u ~ N(θ_pop, τ²I) is a ridge-penalised logistic regression with a per-pair offset,
strictly convex. Every (user, layer) is its own K-dimensional problem; all of them are solved together by
batched Newton steps (one K×K solve per problem per step, a step halved only for the problems where it
did not lower the objective), the pairs laid out densely as [users, pairs per user] so no step loops over
users in Python.

τ is chosen per layer by held-out likelihood (ours): each user's training pairs are split into F folds,
the fit is repeated for each τ of a grid on all folds but one, and the τ with the highest summed log-
likelihood of the left-out pairs wins. The grid is relative to the layer's feature scale (τ·rms‖2Δφ‖ in
GRID), so one grid fits every model and layer. Where each pair is read on one axis only (category-masked
features: `pair_axis`), the problem separates by axis, and τ is chosen per (layer, axis) from the same fits:
users disagree more on some behaviours than on others, and one τ for all would shrink those too hard.
Beyond TAU_USERS users, τ is chosen on a seeded sample of them (the final fit still covers every user), so the
fit's cost stays about one Newton solve per added user.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from steerable.errors import SteerableError

log = logging.getLogger(__name__)

# τ in units of 1/rms‖2(φ(a) − φ(b))‖: a deviation θ − θ_pop of size τ moves a typical pair's log-odds by
# about τ. Wide on purpose: from nearly complete shrinkage to nearly none.
GRID = tuple(float(x) for x in torch.logspace(-2, 2, 9, dtype=torch.float64))
FOLDS = 5
POPULATION_TAU = 100.0  # the population point's prior (toward the mean feature): only keeps it finite
_DENSE_BUDGET = 1 << 22  # elements of one chunk's [users, pairs, L, K] features; larger sets are split by user
TAU_USERS = 300  # users τ is chosen on at most (a seeded sample beyond that): see _tau_users
_MAX_NEWTON = 60
_MAX_HALVINGS = 30
_SELECT_TOL = 1e-6  # choosing τ needs the held-out likelihood, not θ to the last digit


@dataclass
class IdealPointFit:
    """Fitted ideal points: `theta` [U, L, K], the prior mean `theta_pop` [L, K], τ per layer [L] (or per layer
    and axis [L, K]) and how it was chosen (`selection`: the grid, the held-out log-likelihood per grid point
    and layer, folds)."""

    theta: torch.Tensor
    theta_pop: torch.Tensor
    tau: torch.Tensor
    pair_counts: torch.Tensor
    selection: dict[str, Any] = field(default_factory=dict)


def log_odds(theta: torch.Tensor, phi_a: torch.Tensor, phi_b: torch.Tensor) -> torch.Tensor:
    """log P(a ≻ b) − log P(b ≻ a) = ‖φ(b) − θ‖² − ‖φ(a) − θ‖² over the last axis (broadcasting)."""
    theta, phi_a, phi_b = theta.double(), phi_a.double(), phi_b.double()
    return (2 * theta * (phi_a - phi_b)).sum(-1) + (phi_b * phi_b).sum(-1) - (phi_a * phi_a).sum(-1)


def dislike_weights(phi_chosen: torch.Tensor, phi_rejected: torch.Tensor, user_index: torch.Tensor,
                    n_users: int) -> torch.Tensor:
    """[U, L, K] the dislike-weighted weights (methods.md §7): the mean over the user's pairs of
    φ(chosen) − φ(rejected), i.e. how much more of each direction the rejected responses carry, sign flipped
    so the composed vector points away from what the user dislikes. In φ units, so a user's vector is their
    own mean-difference vector projected on the basis; a user without pairs gets the population's."""
    diff = (phi_chosen - phi_rejected).double()
    _check_pairs(phi_chosen, phi_rejected, user_index, n_users)
    total = torch.zeros(n_users, *diff.shape[1:], dtype=torch.float64).index_add_(0, user_index, diff)
    counts = torch.bincount(user_index, minlength=n_users).double()
    out = total / counts.clamp_min(1)[:, None, None]
    if diff.shape[0]:
        out[counts == 0] = diff.mean(0)
    return out.float()


FEATURES = ("category-masked", "prompt-centred", "raw")


def centre_by_prompt(phi: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    """φ [N, ...] of N responses minus the mean φ of the responses to the same prompt (`prompt_index` [N]).

    Why (ours, beyond methods.md §7): a response's activation carries its prompt, which both sides of a pair
    share and which says nothing about what the user prefers. In raw features the offset ‖φ(b)‖² − ‖φ(a)‖² of
    a pair's log-odds is dominated by that prompt content, item by item, and no θ can explain it. Measured from
    the prompt's own centre, a two-response prompt has φ(a) = −φ(b) = Δ/2, so the log-odds is 2θ·(φ(a) − φ(b))
    and the ideal point reads as a direction in the responses' own space."""
    if prompt_index.shape != phi.shape[:1]:
        raise SteerableError(f"one prompt per response: {tuple(prompt_index.shape)} for {phi.shape[0]} responses")
    groups = int(prompt_index.max()) + 1 if len(prompt_index) else 0
    flat = phi.double().reshape(phi.shape[0], -1)
    sums = torch.zeros(groups, flat.shape[1], dtype=torch.float64).index_add_(0, prompt_index, flat)
    counts = torch.bincount(prompt_index, minlength=groups).double().clamp_min(1)
    return (flat - (sums / counts[:, None])[prompt_index]).reshape(phi.shape).to(phi.dtype)


def mask_to_category(phi: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """φ [N, L, K] with each response's features kept on its own category's axis only (`axis` [N], the basis
    row of the response's category; −1 keeps every axis, for a response whose category the basis lacks).

    Why (ours): the model's activations need not keep the behaviours apart. On smollm2-135m the mean
    matching-minus-other directions of two CAA sets (corrigible-neutral-HHH, coordinate-other-ais) have cosine
    0.93, so one θ over a shared space cannot hold a user's opposite tastes on them, and even the population's
    point is fitted with the wrong sign on one of them. Read on its own axis, a category's pairs inform only
    that category's coordinate of θ: the per-category ideal-point model that a per-category basis implies."""
    if axis.shape != phi.shape[:1]:
        raise SteerableError(f"one axis per response: {tuple(axis.shape)} for {phi.shape[0]} responses")
    k = phi.shape[-1]
    if len(axis) and int(axis.max()) >= k:
        raise SteerableError(f"axis {int(axis.max())} is beyond the basis' {k}")
    keep = torch.ones(len(axis), k, dtype=phi.dtype)
    own = axis >= 0
    keep[own] = torch.nn.functional.one_hot(axis[own], k).to(phi.dtype)
    return phi * keep[:, None, :]


def prompt_groups(prompts: Sequence[str]) -> torch.Tensor:
    """[N] the index of each response's prompt (first-appearance order): the groups `centre_by_prompt` uses."""
    where: dict[str, int] = {}
    return torch.tensor([where.setdefault(p, len(where)) for p in prompts], dtype=torch.long)


def _check_pairs(phi_chosen: torch.Tensor, phi_rejected: torch.Tensor, user_index: torch.Tensor,
                 n_users: int) -> None:
    if phi_chosen.dim() != 3 or phi_chosen.shape != phi_rejected.shape:
        raise SteerableError(f"pair features must both be [pairs, L, K]; got {tuple(phi_chosen.shape)} and "
                             f"{tuple(phi_rejected.shape)}")
    if user_index.shape != (phi_chosen.shape[0],) or user_index.dtype != torch.long:
        raise SteerableError("user_index must be a long tensor with one user per pair")
    if len(user_index) and (int(user_index.min()) < 0 or int(user_index.max()) >= n_users):
        raise SteerableError(f"user_index must lie in 0..{n_users - 1}")
    if not (bool(torch.isfinite(phi_chosen).all()) and bool(torch.isfinite(phi_rejected).all())):
        raise SteerableError("pair features contain NaN or Inf")


# -- dense layout ------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """A set of users with their pairs laid out densely, layer-major so every product is a batched matmul
    over (user, layer): x = 2(φa − φb) [u, L, p, K], offset c = ‖φb‖² − ‖φa‖² [u, L, p], `valid` [u, p] and
    each slot's fold [u, p] (−1 for padding), and each slot's axis [u, p] when the pairs have one (−1 for
    padding)."""

    users: torch.Tensor
    x: torch.Tensor
    c: torch.Tensor
    valid: torch.Tensor
    fold: torch.Tensor
    axis: torch.Tensor | None = None


def _chunks(phi_chosen: torch.Tensor, phi_rejected: torch.Tensor, user_index: torch.Tensor, n_users: int,
            folds: int, seed: int, pair_axis: torch.Tensor | None = None) -> list[_Chunk]:
    """Users ordered by pair count and cut into chunks of bounded dense size; each user's pairs get folds
    0..F−1 in a seeded random order (round robin, so every fold of a user is within one pair of the others)."""
    a, b = phi_chosen.double(), phi_rejected.double()
    n_pairs, n_layers, k = a.shape
    counts = torch.bincount(user_index, minlength=n_users)
    gen = torch.Generator().manual_seed(seed)
    shuffle = torch.randperm(n_pairs, generator=gen)  # random slot order within a user
    order = shuffle[torch.argsort(user_index[shuffle], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n_pairs) - starts[user_index[order]]
    pair_slot = torch.empty(n_pairs, dtype=torch.long)
    pair_slot[order] = slot
    x_all = 2 * (a - b)
    c_all = (b * b).sum(-1) - (a * a).sum(-1)
    by_count = torch.argsort(counts, stable=True)
    sorted_counts = counts[by_count].clamp_min(1).numpy()
    out, begin = [], 0
    per_user = n_layers * k
    while begin < n_users:
        # counts ascend, so a chunk's size (users × its largest count) grows with its end: take the longest
        # run from `begin` within the budget (at least one user)
        size = (np.arange(1, n_users - begin + 1) * sorted_counts[begin:]) * per_user
        end = begin + max(1, int(np.searchsorted(size, _DENSE_BUDGET, side="right")))
        users = by_count[begin:end]
        width = max(1, int(counts[users].max()))
        local = torch.full((n_users,), -1, dtype=torch.long)
        local[users] = torch.arange(len(users))
        keep = local[user_index] >= 0
        row, col = local[user_index[keep]], pair_slot[keep]
        x = torch.zeros(len(users), width, n_layers, k, dtype=torch.float64)
        c = torch.zeros(len(users), width, n_layers, dtype=torch.float64)
        valid = torch.zeros(len(users), width, dtype=torch.bool)
        fold = torch.full((len(users), width), -1, dtype=torch.long)
        x[row, col], c[row, col], valid[row, col] = x_all[keep], c_all[keep], True
        fold[row, col] = col % folds
        axis = None
        if pair_axis is not None:
            axis = torch.full((len(users), width), -1, dtype=torch.long)
            axis[row, col] = pair_axis[keep]
        out.append(_Chunk(users, x.transpose(1, 2).contiguous(), c.transpose(1, 2).contiguous(), valid, fold, axis))
        begin = end
    return out


# -- the batched MAP fit -------------------------------------------------------------------------------------


def _scores(ch: _Chunk, theta: torch.Tensor) -> torch.Tensor:
    """[u, L, p] the log-odds s = x·θ + c of every slot."""
    return torch.matmul(ch.x, theta[..., None])[..., 0] + ch.c


def _objective(ch: _Chunk, weight: torch.Tensor, theta: torch.Tensor, mu: torch.Tensor,
               lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[u, L] Σ_p weight·softplus(−s) + ½ Σ_k λ_k (θ − μ)_k² (negative log posterior up to a constant), and
    s; λ [u, L, K]."""
    s = _scores(ch, theta)
    nll = (torch.nn.functional.softplus(-s) * weight[:, None, :]).sum(-1)
    return nll + 0.5 * (lam * (theta - mu) ** 2).sum(-1), s


def _newton(ch: _Chunk, weight: torch.Tensor, mu: torch.Tensor, lam: torch.Tensor, theta: torch.Tensor,
            tol: float = 1e-10) -> torch.Tensor:
    """MAP θ [u, L, K] for every (user, layer) of the chunk at once; `weight` [u, p] selects the pairs that
    count (0 for padding and left-out folds), λ = 1/τ² per layer [L] or per layer and axis [L, K]."""
    n_users, n_layers, _, k = ch.x.shape
    lam_b = _per_axis(lam, n_layers, k)[None].expand(n_users, n_layers, k)
    prior_hess = torch.diag_embed(lam_b)
    wgt = weight[:, None, :]
    obj, s = _objective(ch, weight, theta, mu, lam_b)
    for _ in range(_MAX_NEWTON):
        p = torch.sigmoid(s)
        r = (p - 1) * wgt
        grad = torch.matmul(r[..., None, :], ch.x)[..., 0, :] + lam_b * (theta - mu)
        w = p * (1 - p) * wgt
        hess = torch.matmul(ch.x.transpose(-1, -2), ch.x * w[..., None]) + prior_hess
        step = torch.linalg.solve(hess, grad[..., None])[..., 0]
        t = torch.ones(n_users, n_layers, dtype=torch.float64)
        for _ in range(_MAX_HALVINGS):
            new = theta - t[..., None] * step
            new_obj, new_s = _objective(ch, weight, new, mu, lam_b)
            worse = new_obj > obj + 1e-12 * obj.abs()
            if not bool(worse.any()):
                break
            t = torch.where(worse, t / 2, t)
        else:  # problems whose step never helped are at their optimum (to rounding): keep them
            new = torch.where(worse[..., None], theta, new)
            new_obj = torch.where(worse, obj, new_obj)
            new_s = torch.where(worse[..., None], s, new_s)
        moved = (t[..., None] * step).abs().amax()
        theta, obj, s = new, new_obj, new_s
        if float(moved) < tol * (1 + float(theta.abs().amax())):
            break
    return theta


def _per_axis(value: torch.Tensor, n_layers: int, k: int) -> torch.Tensor:
    """[L, K] from a number, one per layer [L], or one per layer and axis [L, K]."""
    value = torch.as_tensor(value, dtype=torch.float64)
    if value.dim() == 1:
        value = value[:, None]
    return value.expand(n_layers, k)


def _heldout(ch: _Chunk, theta: torch.Tensor, fold: int, axis_of: torch.Tensor | None = None) -> torch.Tensor:
    """[L] log-likelihood of the chunk's pairs in `fold` under θ; with `axis_of` [u, p] (each slot's axis),
    [L, K]: each pair's log-likelihood counted on its own axis."""
    held = (ch.fold == fold).double()[:, None, :]
    ll = -torch.nn.functional.softplus(-_scores(ch, theta)) * held  # [u, L, p]
    if axis_of is None:
        return ll.sum((0, 2))
    onehot = torch.nn.functional.one_hot(axis_of.clamp_min(0), ch.x.shape[-1]).double()
    return torch.einsum("ulp,upk->lk", ll, onehot * (axis_of >= 0).double()[..., None])


def feature_scale(phi_chosen: torch.Tensor, phi_rejected: torch.Tensor) -> torch.Tensor:
    """[L] rms over pairs of ‖2(φa − φb)‖: the unit τ is measured in (GRID)."""
    x = 2 * (phi_chosen - phi_rejected).double()
    scale = x.pow(2).sum(-1).mean(0).sqrt() if len(x) else torch.ones(x.shape[1], dtype=torch.float64)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fit_map(phi_chosen: torch.Tensor, phi_rejected: torch.Tensor, user_index: torch.Tensor, n_users: int, *,
            prior_mean: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """[U, L, K] MAP ideal points under θ_u ~ N(prior_mean, diag τ²) (τ a number, one per layer [L], or one per
    layer and axis [L, K]), all users fitted together; a user without pairs gets `prior_mean`."""
    _check_pairs(phi_chosen, phi_rejected, user_index, n_users)
    n_layers, k = phi_chosen.shape[1:]
    mu = prior_mean.double().expand(n_layers, k)
    zero = torch.zeros(n_layers, k, dtype=torch.float64)
    lam = 1.0 / _per_axis(torch.as_tensor(tau), n_layers, k) ** 2
    theta = torch.zeros(n_users, n_layers, k, dtype=torch.float64)
    # the log-odds is unchanged when φ and θ move together: work around the prior mean (small numbers)
    for ch in _chunks(phi_chosen.double() - mu, phi_rejected.double() - mu, user_index, n_users, 1, 0):
        theta[ch.users] = _newton(ch, ch.valid.double(), zero, lam, zero.expand(len(ch.users), n_layers, k).clone())
    return theta + mu


def population_point(phi_chosen: torch.Tensor, phi_rejected: torch.Tensor,
                     prior_mean: torch.Tensor | None = None) -> torch.Tensor:
    """[L, K] the ideal point of all pairs pooled (one "user"), under a weak prior toward the mean feature of
    the pairs' responses: where the population's preferences sit."""
    if prior_mean is None:
        prior_mean = ((phi_chosen.double() + phi_rejected.double()) / 2).mean(0)
    tau = POPULATION_TAU / feature_scale(phi_chosen, phi_rejected)
    pooled = torch.zeros(len(phi_chosen), dtype=torch.long)
    return fit_map(phi_chosen, phi_rejected, pooled, 1, prior_mean=prior_mean, tau=tau)[0]


def choose_tau(phi_chosen: torch.Tensor, phi_rejected: torch.Tensor, user_index: torch.Tensor, n_users: int, *,
               prior_mean: torch.Tensor, grid: Sequence[float] = GRID, folds: int = FOLDS,
               seed: int = 0, pair_axis: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """τ per layer [L] with the highest F-fold held-out log-likelihood over every user's pairs, and the
    record of the choice (grid in τ units and in relative units, held-out log-likelihood per pair).

    With `pair_axis` [P] (the one axis each pair's features lie on: category-masked features), τ per layer
    and axis [L, K], each axis's τ the best for its own pairs' held-out likelihood. Exact, not a heuristic:
    a pair on one axis moves only that coordinate of θ, so the fits separate by axis and one grid sweep
    gives every axis's curve."""
    _check_pairs(phi_chosen, phi_rejected, user_index, n_users)
    if folds < 2:
        raise SteerableError("choosing τ by held-out likelihood needs at least 2 folds")
    k_axes = phi_chosen.shape[2]
    if pair_axis is not None:
        if pair_axis.shape != user_index.shape or pair_axis.dtype != torch.long:
            raise SteerableError("pair_axis must be a long tensor with one axis per pair")
        if len(pair_axis) and (int(pair_axis.min()) < 0 or int(pair_axis.max()) >= k_axes):
            raise SteerableError(f"pair_axis must lie in 0..{k_axes - 1}: τ per axis needs every pair on one axis")
        off_axis = torch.ones(len(pair_axis), k_axes, dtype=torch.bool)
        off_axis[torch.arange(len(pair_axis)), pair_axis] = False
        stray = (phi_chosen - phi_rejected).abs().amax(1) * off_axis
        if bool((stray > 0).any()):
            raise SteerableError("pair_axis: some pairs' features are not on their axis alone (τ per axis is for "
                                 "category-masked features)")
    n_layers, k = phi_chosen.shape[1:]
    scale = feature_scale(phi_chosen, phi_rejected)
    rel = sorted(float(g) for g in grid)
    if not rel or rel[0] <= 0:
        raise SteerableError("the τ grid must hold positive numbers")
    mu = prior_mean.double().expand(n_layers, k)
    zero = torch.zeros(n_layers, k, dtype=torch.float64)
    ll = torch.zeros(len(rel), n_layers, *((k,) if pair_axis is not None else ()), dtype=torch.float64)
    chunks = _chunks(phi_chosen.double() - mu, phi_rejected.double() - mu, user_index, n_users, folds, seed,
                     pair_axis)
    for ch in chunks:
        for f in range(folds):
            weight = (ch.valid & (ch.fold != f)).double()
            theta = zero.expand(len(ch.users), n_layers, k).clone()
            for g, r in enumerate(rel):  # smallest τ first, each warm-started from the last
                lam = (scale / r) ** 2
                theta = _newton(ch, weight, zero, lam, theta, tol=_SELECT_TOL)
                ll[g] += _heldout(ch, theta, f, ch.axis)
    best = ll.argmax(0)  # [L] or [L, K]
    n = max(1, len(user_index))
    rel_of = torch.tensor(rel, dtype=torch.float64)[best]
    tau = rel_of / (scale if pair_axis is None else scale[:, None])
    edge = (best == 0) | (best == len(rel) - 1)
    if bool(edge.any()):
        log.info("τ at the edge of its grid for layers %s", sorted({int(i) for i in torch.nonzero(edge)[:, 0]}))
    per = "per layer and axis" if pair_axis is not None else "per layer"
    record = {"how": f"{folds}-fold held-out log-likelihood over each user's training pairs, {per}, on a grid "
                     "of τ·rms‖2Δφ‖", "folds": folds, "seed": seed, "grid_relative": rel,
              "relative": rel_of.tolist(), "at_grid_edge": edge.tolist(),
              "feature_scale": [float(s) for s in scale],
              "heldout_loglik_per_pair": [[float(v) / n for v in row] for row in
                                          (ll if pair_axis is None else ll.sum(-1)).T]}
    if pair_axis is not None:
        record["per_axis"] = True
        record["heldout_loglik_per_pair_axis"] = [[[float(v) / n for v in col] for col in row]
                                                  for row in ll.permute(1, 2, 0)]
    return tau, record


def _tau_users(counts: torch.Tensor, seed: int) -> torch.Tensor:
    """[U] bool: the users τ is chosen on: every user with ≥ 2 pairs, or a seeded sample of TAU_USERS of them.
    τ is one number per layer, and its held-out likelihood curve is pinned down by a few hundred users; choosing it
    on all of them would make the fit's cost grow with the grid × folds for every user added."""
    able = torch.nonzero(counts >= 2)[:, 0]
    keep = torch.zeros(len(counts), dtype=torch.bool)
    if len(able) > TAU_USERS:
        able = able[torch.randperm(len(able), generator=torch.Generator().manual_seed(seed))[:TAU_USERS]]
    keep[able] = True
    return keep


def fit_ideal_points(phi_chosen: torch.Tensor, phi_rejected: torch.Tensor, user_index: torch.Tensor,
                     n_users: int, *, tau: float | torch.Tensor | None = None, grid: Sequence[float] = GRID,
                     folds: int = FOLDS, seed: int = 0, theta_pop: torch.Tensor | None = None,
                     pair_axis: torch.Tensor | None = None) -> IdealPointFit:
    """Per-user MAP ideal points for pair features φ(chosen), φ(rejected) [P, L, K] of users `user_index` [P].

    θ_pop is the pooled fit (`population_point`) unless given; τ is chosen per layer by held-out likelihood
    (`choose_tau`; per layer and axis with `pair_axis`) unless given (a number, [L] or [L, K]). Users without
    pairs keep θ_pop (they still get a row)."""
    _check_pairs(phi_chosen, phi_rejected, user_index, n_users)
    n_layers, k = phi_chosen.shape[1:]
    counts = torch.bincount(user_index, minlength=n_users)
    if theta_pop is None:
        theta_pop = population_point(phi_chosen, phi_rejected)
    theta_pop = theta_pop.double()
    if tau is None:
        if int((counts >= 2).sum()) == 0:
            raise SteerableError("choosing τ needs users with at least 2 pairs; give tau")
        keep = _tau_users(counts, seed)
        sub = keep[user_index]
        local = torch.cumsum(keep.long(), 0) - 1
        tau_l, selection = choose_tau(phi_chosen[sub], phi_rejected[sub], local[user_index[sub]], int(keep.sum()),
                                      prior_mean=theta_pop, grid=grid, folds=folds, seed=seed,
                                      pair_axis=None if pair_axis is None else pair_axis[sub])
        selection["users"] = int(keep.sum())
    else:
        tau_t = torch.as_tensor(tau, dtype=torch.float64)
        if tau_t.dim() > 2 or (tau_t.dim() >= 1 and tau_t.shape[0] != n_layers) or \
                (tau_t.dim() == 2 and tau_t.shape[1] != k):
            raise SteerableError(f"tau must be a number, one per layer ({n_layers}) or one per layer and axis "
                                 f"({n_layers}×{k}); got shape {tuple(tau_t.shape)}")
        tau_l = (tau_t.expand(n_layers) if tau_t.dim() == 0 else tau_t).clone()
        if not bool(torch.isfinite(tau_l).all()) or bool((tau_l <= 0).any()):
            raise SteerableError(f"tau must be positive and finite, got {tau}")
        selection = {"how": "given"}
    theta = fit_map(phi_chosen, phi_rejected, user_index, n_users, prior_mean=theta_pop, tau=tau_l)
    if not bool(torch.isfinite(theta).all()):
        raise SteerableError("the ideal-point fit did not converge to finite values")
    selection["tau"] = tau_l.tolist()
    if math.isfinite(float(theta.abs().max())):
        log.info("ideal points of %d users fitted (τ per layer %s)", n_users,
                 ", ".join(f"{float(t):.3g}" for t in tau_l.reshape(n_layers, -1).mean(1)))
    return IdealPointFit(theta.float(), theta_pop.float(), tau_l.float(), counts, selection)
