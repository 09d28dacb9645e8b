"""`fit_users`: preference rows → a profile library (methods.md §7; `steerable users fit` is this plus writing).

1. Capture: every distinct (prompt, response) text is read once, however many users share it (batched), at
   `response-mean` (capture/features.py) or `answer-token` (the A/B letter, capture/positions.py).
2. Population vector: mean(h(chosen)) − mean(h(rejected)) over the seen users' pairs (a source's unseen
   users are held out of everything shared: population, basis, φ̄, θ_pop and the choice of τ).
3. Basis of K directions per layer, orthonormalised by SVD: one per category (each category's mean
   difference, made orthonormal by the closest orthonormal set, U·Vᵀ of their SVD, so axis k stays
   category k's) or the top K right singular vectors of the pair differences; K and how it was chosen go in
   the metadata.
4. Features φ = Bᵀh, the population ideal point θ_pop (pooled fit), each user's MAP ideal point with τ
   chosen by held-out likelihood (directions/ideal_points.py), the dislike weights → `ProfileLibrary`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from steerable.capture.features import response_means
from steerable.capture.positions import select
from steerable.capture.run import StopForward, reading_hooks
from steerable.capture.sites import LAYER_CONVENTION, check_site, site_module
from steerable.data.preferences import PreferenceRow, answer_letter
from steerable.directions.calibrate import model_meta
from steerable.directions.ideal_points import (
    FEATURES,
    FOLDS,
    GRID,
    centre_by_prompt,
    dislike_weights,
    fit_ideal_points,
    mask_to_category,
    population_point,
    prompt_groups,
)
from steerable.directions.profiles import ProfileLibrary
from steerable.errors import DataError, SteerableError
from steerable.models.batch import position_ids
from steerable.models.load import ModelHandle

log = logging.getLogger(__name__)

FIT_POSITIONS = ("response-mean", "answer-token")
BASIS_KINDS = ("auto", "category")  # or a number K: the top K singular vectors of the pair differences
MAX_AUTO_K = 16
AUTO_ENERGY = 0.5  # with no categories, K = the fewest singular vectors holding half the pair differences' energy
SVD_ROWS = 20_000  # pair differences the SVD basis is computed from at most (a seeded sample beyond that)
LAYER_RULE = "blocks ⌊0.4·n⌋ … ⌊0.6·n⌋ of an n-block model (the middle of the network)"


def default_layers(n_layers: int) -> list[int]:
    """The middle of the network, LAYER_RULE: smollm2-135m (30 blocks) 12–18, qwen2.5-0.5b (24) 9–14; seed 002
    steered 16–22 of Llama-3.1-8B's 32 (0.5–0.69 of the depth), this range starts a little earlier."""
    lo = int(0.4 * n_layers)
    hi = min(max(lo, int(0.6 * n_layers)), n_layers - 1)
    return list(range(lo, hi + 1))


@dataclass
class UsersFit:
    """The library, and what a measurement needs beside it: the distinct texts, their features φ [N, L, K],
    each row's chosen/rejected text index and user (row of the library), and the seconds each stage took."""

    library: ProfileLibrary
    texts: list[tuple[str, str]]
    phi: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    user_index: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


@torch.inference_mode()
def answer_token_features(handle: ModelHandle, prompts: Sequence[str], responses: Sequence[str],
                          layers: Sequence[int], *, site: str = "resid_post", batch_size: int = 16,
                          progress: bool = True) -> torch.Tensor:
    """[len(layers), n, d] each text's activation at its answer letter (position `answer-token`: the token
    before the closing one of "(A)"), prompt rendered with the chat template. A response that spells its
    choice out after the letter ("(A) I would…") is read at its letter, as if it ended there."""
    check_site(site)
    layers = list(layers)
    for layer in layers:
        site_module(handle.layout, site, layer)
    letters = [answer_letter(r) for r in responses]
    bad = next((i for i, x in enumerate(letters) if x is None), None)
    if bad is not None:
        raise DataError(f"position answer-token needs responses that open with an answer letter such as \"(A)\"; "
                        f"text {bad + 1} is {responses[bad][:30]!r}")
    responses = [str(x) for x in letters]
    out = torch.empty(len(layers), len(prompts), handle.hidden_size)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    sink: dict[int, torch.Tensor] = {}
    bar = tqdm(total=len(prompts), desc=f"capture {site}", unit="text", disable=not progress, leave=False)
    with reading_hooks(handle, layers, site, sink):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = handle.encode([handle.render(prompts[i]) + responses[i] for i in idx])
            with contextlib.suppress(StopForward):
                handle.model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False)
            mask = enc["attention_mask"].cpu()
            lens = torch.ones(len(idx), dtype=torch.long)
            for j, layer in enumerate(layers):
                feats, _ = select(sink.pop(layer).float().cpu(), mask, lens, "answer-token")
                out[j, idx] = feats
            bar.update(len(idx))
    bar.close()
    return out


def capture_texts(handle: ModelHandle, texts: Sequence[tuple[str, str]], layers: Sequence[int], *,
                  site: str = "resid_post", position: str = "response-mean", batch_size: int = 16,
                  progress: bool = True) -> torch.Tensor:
    """[L, N, d] activations of distinct (prompt, response) texts at `position`."""
    prompts, responses = [t[0] for t in texts], [t[1] for t in texts]
    if position == "response-mean":
        return response_means(handle, prompts, responses, layers, site=site, batch_size=batch_size,
                              progress=progress)
    if position == "answer-token":
        return answer_token_features(handle, prompts, responses, layers, site=site, batch_size=batch_size,
                                     progress=progress)
    raise SteerableError(f"position {position!r}: users fit reads {' or '.join(FIT_POSITIONS)}")


def _lowdin(directions: torch.Tensor) -> torch.Tensor:
    """[K, d] rows → the orthonormal rows closest to them (U·Vᵀ of their SVD): axis k stays row k's."""
    u, s, vh = torch.linalg.svd(directions, full_matrices=False)
    if float(s[-1]) <= 1e-6 * float(s[0]):
        raise SteerableError("the per-category directions are linearly dependent: use --basis K (an SVD basis)")
    return u @ vh


def build_basis(diff: torch.Tensor, categories: Sequence[str | None], kind: str | int = "auto",
                seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """basis [L, K, d] from pair differences h(chosen) − h(rejected) [L, P, d] and each pair's category.

    kind "category": one direction per category (its mean difference, unit length), orthonormalised by
    U·Vᵀ; "auto": that when every pair has a category and there are at least two, else an SVD basis with
    K = the fewest singular vectors holding AUTO_ENERGY of the energy (at most MAX_AUTO_K); a number K: the
    top K right singular vectors (each signed so the mean difference projects positively)."""
    n_layers, n_pairs, d = diff.shape
    labelled = sorted({c for c in categories if c is not None})
    if kind == "auto":
        kind = "category" if len(labelled) >= 2 and all(c is not None for c in categories) else "svd-auto"
    if kind == "category":
        if any(c is None for c in categories) or len(labelled) < 1:
            raise DataError("--basis category needs a \"category\" on every preference row")
        cat = torch.tensor([labelled.index(c) for c in categories])  # type: ignore[arg-type]
        sums = torch.zeros(n_layers, len(labelled), d, dtype=torch.float64).index_add_(1, cat, diff.double())
        means = sums / torch.bincount(cat, minlength=len(labelled)).double()[None, :, None]
        norms = means.norm(dim=-1, keepdim=True)
        if bool((norms == 0).any()):
            raise SteerableError("a category's chosen and rejected responses have the same mean activation")
        basis = torch.stack([_lowdin(m) for m in (means / norms)])
        overlap = (basis * (means / norms)).sum(-1)  # cosine of each axis with its category's own direction
        info = {"kind": "category", "k": len(labelled), "labels": labelled,
                "how": "one direction per category (mean difference of chosen − rejected), orthonormalised by "
                       "U·Vᵀ of their SVD (the closest orthonormal set)",
                "axis_cosine_with_category": [[round(float(x), 4) for x in row] for row in overlap]}
        return basis.float(), info
    sample = diff
    if n_pairs > SVD_ROWS:
        gen = torch.Generator().manual_seed(seed)
        sample = diff[:, torch.randperm(n_pairs, generator=gen)[:SVD_ROWS]]
    bases, energies = [], []
    for x in sample.double():
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        bases.append(vh)
        energies.append(s**2 / (s**2).sum().clamp_min(1e-300))
    rank = min(len(e) for e in energies)
    if kind == "svd-auto":
        # the fewest singular vectors holding AUTO_ENERGY of the energy, at the layer needing the most
        need = [int((torch.cumsum(e, 0) < AUTO_ENERGY).sum()) + 1 for e in energies]
        k = max(1, min(MAX_AUTO_K, rank, max(need)))
        how = f"top K singular vectors of the pair differences; K = fewest holding {AUTO_ENERGY:.0%} of their energy " \
              f"at every layer (at most {MAX_AUTO_K})"
    else:
        if isinstance(kind, str):
            raise SteerableError(f"unknown basis {kind!r}: use auto, category or a number K")
        k = int(kind)
        if not 1 <= k <= rank:
            raise SteerableError(f"--basis {k}: the pair differences have rank at most {rank} here")
        how = "top K singular vectors of the pair differences; K given"
    mean = diff.double().mean(1)
    basis = torch.stack([vh[:k] for vh in bases])
    sign = torch.where((basis * mean[:, None, :]).sum(-1) < 0, -1.0, 1.0).to(basis.dtype)
    basis = basis * sign[..., None]
    info = {"kind": "svd", "k": k, "labels": [f"sv{i + 1}" for i in range(k)], "how": how,
            "energy": [[round(float(x), 4) for x in e[:k]] for e in energies]}
    return basis.float(), info


def _texts(rows: Sequence[PreferenceRow]) -> tuple[list[tuple[str, str]], torch.Tensor, torch.Tensor]:
    index: dict[tuple[str, str], int] = {}
    chosen, rejected = [], []
    for r in rows:
        chosen.append(index.setdefault((r.prompt, r.chosen), len(index)))
        rejected.append(index.setdefault((r.prompt, r.rejected), len(index)))
    return list(index), torch.tensor(chosen), torch.tensor(rejected)


def _text_axes(rows: Sequence[PreferenceRow], n_texts: int, chosen: torch.Tensor, rejected: torch.Tensor,
               labels: Sequence[str]) -> torch.Tensor:
    """[N] each distinct text's basis axis (its rows' category), −1 where the category is not an axis or a text
    sits in rows of two categories."""
    axis = torch.full((n_texts,), -2, dtype=torch.long)
    for r, a, b in zip(rows, chosen.tolist(), rejected.tolist(), strict=True):
        k = labels.index(r.category) if r.category in labels else -1
        for t in (a, b):
            axis[t] = k if int(axis[t]) in (-2, k) else -1
    return axis.clamp_min(-1)


def fit_users(
    handle: ModelHandle,
    rows: Sequence[PreferenceRow],
    *,
    layers: Sequence[int] | None = None,
    site: str = "resid_post",
    position: str = "response-mean",
    basis: str | int = "auto",
    users: Sequence[str] | None = None,
    tau: float | None = None,
    grid: Sequence[float] = GRID,
    folds: int = FOLDS,
    seed: int = 0,
    batch_size: int = 16,
    data: dict[str, Any] | None = None,
    progress: bool = True,
    features: torch.Tensor | None = None,
    feature_kind: str = "auto",
    tau_per_axis: bool = False,
) -> UsersFit:
    """A profile library fitted on `rows` (the training pairs). `users` lists the library's users (default:
    those in `rows`; a listed user without rows gets the population's ideal point). `features` [L, N, d]
    replaces the capture (activations of the rows' distinct texts in first-appearance order). `feature_kind`
    "prompt-centred" measures every response's φ from the mean φ of its prompt's responses
    (directions/ideal_points.py centre_by_prompt says why); "category-masked" also keeps each response's φ on
    its own category's axis only (mask_to_category says why; needs a per-category basis); "raw" is methods.md
    §7's φ = Bᵀh as it stands; "auto" (default) is category-masked on a per-category basis, else prompt-centred.
    `tau_per_axis`: with category-masked features and every pair on an axis, τ is chosen per layer and axis
    (ideal_points.choose_tau). Off by default: on users-caa it raises held-out likelihood but recovers the
    planted ideal points worse (docs/personalisation.md)."""
    if not rows:
        raise DataError("users fit: no preference rows")
    if position not in FIT_POSITIONS:
        raise SteerableError(f"position {position!r}: users fit reads {' or '.join(FIT_POSITIONS)}")
    check_site(site)
    if feature_kind not in (*FEATURES, "auto"):
        raise SteerableError(f"features {feature_kind!r}: use auto, {', '.join(FEATURES)}")
    if tau_per_axis and tau is not None:  # checked before the capture, as every argument is
        raise SteerableError("tau per axis chooses τ; it cannot be combined with a given τ")
    if tau_per_axis and feature_kind not in ("auto", "category-masked"):
        raise SteerableError(f"tau per axis needs category-masked features, not {feature_kind}")
    layer_list = default_layers(handle.n_layers) if layers is None else sorted(set(int(x) for x in layers))
    if not layer_list or not all(0 <= x < handle.n_layers for x in layer_list):
        raise SteerableError(f"layers must lie in 0-{handle.n_layers - 1}")
    if position == "answer-token":
        bad = next((i for i, r in enumerate(rows) if not r.answer_token), None)
        if bad is not None:
            raise DataError(f"position answer-token needs A/B answer letters; row {bad + 1} (user "
                            f"{rows[bad].user!r}) has {rows[bad].chosen[:30]!r}")
    timings: dict[str, float] = {}
    texts, ci, ri = _texts(rows)
    t0 = time.perf_counter()
    if features is None:
        h = capture_texts(handle, texts, layer_list, site=site, position=position, batch_size=batch_size,
                          progress=progress)
    else:
        h = features
        if tuple(h.shape) != (len(layer_list), len(texts), handle.hidden_size):
            raise SteerableError(f"features have shape {tuple(h.shape)}, expected "
                                 f"{(len(layer_list), len(texts), handle.hidden_size)}")
    timings["capture_s"] = time.perf_counter() - t0

    names = list(dict.fromkeys(users if users is not None else [r.user for r in rows]))
    missing = sorted({r.user for r in rows} - set(names))
    if missing:
        names += missing
    where = {u: i for i, u in enumerate(names)}
    user_index = torch.tensor([where[r.user] for r in rows])
    seen_of: dict[str, bool | None] = {}
    for r in rows:
        if seen_of.get(r.user) is None:
            seen_of[r.user] = r.seen
    seen_rows = torch.tensor([r.seen is not False for r in rows])
    if not bool(seen_rows.any()):
        seen_rows = torch.ones(len(rows), dtype=torch.bool)  # no seen user at all: everyone builds the basis

    t0 = time.perf_counter()
    diff = h[:, ci] - h[:, ri]  # [L, P, d]
    shared = diff[:, seen_rows]
    population = shared.double().mean(1).float()
    categories = [r.category for r, s in zip(rows, seen_rows.tolist(), strict=True) if s]
    basis_t, basis_info = build_basis(shared, categories, basis, seed)
    phi = torch.einsum("lnd,lkd->nlk", h.double(), basis_t.double())  # [N, L, K]
    if feature_kind == "auto":
        feature_kind = "category-masked" if basis_info["kind"] == "category" else "prompt-centred"
    if feature_kind == "category-masked" and basis_info["kind"] != "category":
        raise SteerableError("features category-masked need a per-category basis (--basis category)")
    if feature_kind != "raw":
        phi = centre_by_prompt(phi, prompt_groups([t[0] for t in texts]))
    pair_axis = None
    if feature_kind == "category-masked":
        text_axis = _text_axes(rows, len(texts), ci, ri, basis_info["labels"])
        phi = mask_to_category(phi, text_axis)
        on_axis = (text_axis[ci] == text_axis[ri]) & (text_axis[ci] >= 0)
        if tau_per_axis and not bool(on_axis.all()):  # such a pair is read on every axis: no separation
            raise DataError(f"tau per axis: {int((~on_axis).sum())} pairs have no category of the basis "
                            f"({', '.join(basis_info['labels'])})")
        pair_axis = text_axis[ci] if tau_per_axis else None
    elif tau_per_axis:
        raise SteerableError(f"tau per axis needs category-masked features, not {feature_kind}")
    phi_c, phi_r = phi[ci], phi[ri]
    phi_mean = ((phi_c[seen_rows] + phi_r[seen_rows]) / 2).mean(0)
    timings["basis_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    theta_pop = population_point(phi_c[seen_rows], phi_r[seen_rows], prior_mean=phi_mean)
    if tau is None:
        # τ is chosen on the seen users' pairs alone (held-out users take no part in anything shared)
        seen_users = sorted({int(u) for u in user_index[seen_rows]})
        local = torch.full((len(names),), -1, dtype=torch.long)
        local[seen_users] = torch.arange(len(seen_users))
        sel = fit_ideal_points(phi_c[seen_rows], phi_r[seen_rows], local[user_index[seen_rows]], len(seen_users),
                               grid=grid, folds=folds, seed=seed, theta_pop=theta_pop,
                               pair_axis=None if pair_axis is None else pair_axis[seen_rows])
        tau_l, selection = sel.tau, sel.selection
    else:
        tau_l, selection = torch.full((len(layer_list),), float(tau)), {"how": "given"}
    fit = fit_ideal_points(phi_c, phi_r, user_index, len(names), tau=tau_l.double(), theta_pop=theta_pop)
    dislike = dislike_weights(phi_c, phi_r, user_index, len(names))
    counts = torch.bincount(user_index, minlength=len(names))
    dislike[counts == 0] = (phi_c[seen_rows] - phi_r[seen_rows]).double().mean(0).float()
    timings["ideal_points_s"] = time.perf_counter() - t0

    prior = ("θ_u ~ N(θ_pop, diag τ²), τ per layer and axis" if tau_l.dim() == 2 else "θ_u ~ N(θ_pop, τ²I) per layer")
    selection = {**selection, "tau": tau_l.tolist(),
                 "prior": f"{prior}; θ_pop = the pooled BT fit of the seen users' pairs"}
    meta: dict[str, Any] = {
        "model": model_meta(handle), "site": site, "position": position, "features": feature_kind,
        "layer_convention": LAYER_CONVENTION,
        "layer_rule": "given" if layers is not None else LAYER_RULE, "basis": basis_info, "prior": selection,
        "composition": {"personalised": "w = θ_u − φ̄", "dislike_weighted": "w = mean over the user's pairs of "
                        "φ(chosen) − φ(rejected)", "population": "mean(h(chosen)) − mean(h(rejected))"},
        "data": {**(data or {}), "n_rows": len(rows), "n_users": len(names), "n_texts": len(texts),
                 "shared_rows": int(seen_rows.sum()),
                 "shared_from": "seen users' pairs" if not bool(seen_rows.all()) else "every pair"},
    }
    seen = [seen_of.get(u) for u in names]
    library = ProfileLibrary(
        layers=layer_list, population=population, basis=basis_t, phi_mean=phi_mean.float(),
        theta_pop=fit.theta_pop, theta=fit.theta, dislike=dislike, users=names, pair_counts=counts.tolist(),
        seen=None if all(s is None for s in seen) else seen, meta=meta)
    log.info("profile library: %d users, K=%d (%s), layers %s", len(names), library.k, basis_info["kind"],
             layer_list)
    return UsersFit(library, texts, phi.float(), ci, ri, user_index, timings)
