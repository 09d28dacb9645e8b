"""How well `steerable users fit` recovers the synthetic users-caa ideal points on a real model.

users-caa (data/users_caa.py) labels every pair with P(matching ≻ other) = σ(4·t_uk), t_u the user's true
point over the 7 CAA behaviours. The fitted library lives in another space (φ = Bᵀh of the model's
activations), so the recovered point is read back in the true point's own units, through the fitted model's
own predictions: for behaviour k,

    t̂_uk = mean over held-out CAA items of behaviour k (the test pool, never fitted on) of
           log-odds_u(matching answer ≻ other) / 4,

log-odds_u = ‖φ(other) − θ_u‖² − ‖φ(matching) − θ_u‖² under the user's fitted θ_u (per layer, then averaged
over the library's layers). This needs no scale fitted to the truth and works for any basis. Reported per
user, grouped by training pairs per user (3, 5, 10, 20, 30) and by seen / unseen user:

- `cosine`: cos(t̂_u, t_u) — the headline (target ≥ 0.8 at 20+ pairs);
- `cosine_population`: cos(t̂_pop, t_u) with the population's θ_pop in place of θ_u — what no
  personalisation already gets (the majority profile is shared by most users);
- `cosine_deviation`: cos(t̂_u − t̂_pop, t_u − t̄) — the personal part alone (t̄ = the users' mean point);
- `attenuation_ceiling`: cos(r ⊙ t_u, t_u), r = t̂_pop / t̄ per axis: the cosine a perfectly fitted θ would
  read back at, given how unevenly the features attenuate each axis;
- `cosine_axis_scaled`: cos(a ⊙ w_u + b, t_u), with w_u = θ_u − φ̄ on the category basis and a per-axis
  scale a, b fitted by least squares on the seen users, scored on the unseen users (the brief's second way).

Also times the ideal-point fit alone on 1 000 users (the users-caa features, users replicated 5×).

    nice -n 5 python experiments/users_recovery.py            # smollm2-135m, both positions
    → experiments/results/users_recovery_smollm2.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from steerable.data.preferences import BEHAVIOURS, load_preferences, true_ideal_points
from steerable.data.users_caa import LABEL_SCALE, item_pools, user_profiles
from steerable.directions.ideal_points import (
    centre_by_prompt,
    fit_ideal_points,
    log_odds,
    mask_to_category,
    prompt_groups,
)
from steerable.fsutil import write_text_atomic
from steerable.models.load import load_model
from steerable.recipes.users_fit import capture_texts, default_layers, fit_users

OUT = Path(__file__).parent / "results" / "users_recovery_smollm2.json"


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4),
            "min": round(min(values), 4)}


def implied_points(theta: torch.Tensor, item_phi: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[U, L, 7] t̂ per layer: the fitted model's mean log-odds for the matching answer of each behaviour's
    held-out items, over LABEL_SCALE. theta [U, L, K]; item_phi[b] = (φ(matching), φ(other)) [n, L, K]."""
    out = []
    for b in BEHAVIOURS:
        pos, neg = item_phi[b]
        lo = log_odds(theta[:, None], pos[None], neg[None])  # [U, n, L]
        out.append(lo.mean(1) / LABEL_SCALE)
    return torch.stack(out, -1)


def grouped(values: torch.Tensor, counts: list[int], seen: list[bool]) -> dict[str, Any]:
    v = values.tolist()
    by_pairs = {str(c): summary([x for x, n in zip(v, counts, strict=True) if n == c]) for c in sorted(set(counts))}
    return {"all": summary(v), "pairs_20_plus": summary([x for x, n in zip(v, counts, strict=True) if n >= 20]),
            "by_pairs_per_user": by_pairs,
            "seen": summary([x for x, s in zip(v, seen, strict=True) if s]),
            "unseen": summary([x for x, s in zip(v, seen, strict=True) if not s]),
            "unseen_pairs_20_plus": summary([x for x, n, s in zip(v, counts, seen, strict=True) if n >= 20 and not s])}


def run_position(handle: Any, position: str, batch_size: int, kinds: Sequence[str] = ("prompt-centred",),
                 tau_modes: Sequence[str] = ("per-layer",)) -> dict[str, tuple[dict[str, Any], Any]]:
    """One capture of the training texts and the held-out items, then one fit per feature kind (and, for
    category-masked features, per τ mode: one τ "per-layer", the fit's default, or "per-axis", keyed
    "category-masked, τ per axis")."""
    rows = load_preferences("users-caa", split="train")
    users = list(dict.fromkeys(r.user for r in load_preferences("users-caa", split="all")))
    layers = default_layers(handle.n_layers)
    t0 = time.perf_counter()
    pools = item_pools()
    texts = [(p.prompt, t) for b in BEHAVIOURS for p in pools[b]["test"] for t in (p.positive, p.negative)]
    # the captures are kept (runs/ is ours, plain tensors), so a rerun of the fits costs seconds
    cache = Path("runs") / "users_recovery" / f"{handle.name}-{position}.pt"
    if cache.exists():
        train_h, test_h = torch.load(cache)
    else:
        train_h = capture_texts(handle, list(dict.fromkeys(t for r in rows for t in ((r.prompt, r.chosen),
                                                                                       (r.prompt, r.rejected)))),
                                layers, position=position, batch_size=batch_size)
        test_h = capture_texts(handle, texts, layers, position=position, batch_size=batch_size)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save((train_h, test_h), cache)
    capture_s = time.perf_counter() - t0
    out = {}
    for kind in kinds:
        for mode in tau_modes if kind == "category-masked" else ("per-layer",):
            t0 = time.perf_counter()
            fit = fit_users(handle, rows, position=position, basis="category", users=users, batch_size=batch_size,
                            data={"preferences": "users-caa", "split": "train"}, features=train_h, feature_kind=kind,
                            tau_per_axis=mode == "per-axis")
            result = score(fit, texts, test_h, users, pools)
            result["fit_seconds"] = round(time.perf_counter() - t0, 2)
            result["capture_seconds"] = round(capture_s, 1)
            key = kind if mode == "per-layer" else f"{kind}, τ per axis"
            out[key] = (result, fit)
    return out


def score(fit: Any, texts: list[tuple[str, str]], h: torch.Tensor, users: list[str],
          pools: dict[str, Any]) -> dict[str, Any]:
    lib = fit.library
    position = lib.position
    phi = torch.einsum("lnd,lkd->nlk", h.double(), lib.basis.double())
    if lib.features != "raw":  # measured as the fit measured its training texts
        phi = centre_by_prompt(phi, prompt_groups([p for p, _ in texts]))
    if lib.features == "category-masked":  # each held-out item read on its behaviour's own axis, as in the fit
        labels = lib.meta["basis"]["labels"]
        axis = [labels.index(b) for b in BEHAVIOURS for _ in pools[b]["test"] for _ in range(2)]
        phi = mask_to_category(phi, torch.tensor(axis))
    item_phi, at = {}, 0
    for b in BEHAVIOURS:
        n = len(pools[b]["test"])
        item_phi[b] = (phi[at : at + 2 * n : 2], phi[at + 1 : at + 2 * n : 2])
        at += 2 * n
    truth_map = true_ideal_points()
    truth = torch.tensor([truth_map[u] for u in users], dtype=torch.float64)
    counts = [lib.pair_count(u) for u in users]
    seen = [bool(lib.seen(u)) for u in users]
    theta = torch.stack([lib.theta(u)[0] for u in users]).double()  # [U, L, K]
    per_layer = implied_points(theta, item_phi)  # [U, L, 7]
    pop_layer = implied_points(lib.theta_pop.double()[None], item_phi)[0]  # [L, 7]
    t_hat, t_pop = per_layer.mean(1), pop_layer.mean(0)
    centre = truth.mean(0)
    result: dict[str, Any] = {
        "position": position, "layers": lib.layers, "k": lib.k, "basis": lib.meta["basis"]["labels"],
        "tau": lib.meta["prior"]["tau"], "tau_relative": lib.meta["prior"].get("relative"),
        "features": lib.features, "timings": {k: round(v, 3) for k, v in fit.timings.items()},
        "n_texts_captured": len(fit.texts),
        "cosine": grouped(cos(t_hat, truth), counts, seen),
        "cosine_population": grouped(cos(t_pop.expand_as(truth), truth), counts, seen),
        "cosine_deviation": grouped(cos(t_hat - t_pop, truth - centre), counts, seen),
        "cosine_by_layer_pairs_20_plus": {
            str(layer): summary([x for x, n in zip(cos(per_layer[:, j], truth).tolist(), counts, strict=True)
                                 if n >= 20]) for j, layer in enumerate(lib.layers)},
        # what the readout's uneven attenuation alone allows: each axis read back at the population's ratio
        # t̂_pop / t̄, applied to each user's exact point (a perfectly fitted θ)
        "attenuation_ceiling": grouped(cos((t_pop / centre) * truth, truth), counts, seen),
        "population_implied_point": [round(float(x), 3) for x in t_pop],
        "true_mean_point": [round(float(x), 3) for x in centre],
    }
    # the brief's second comparison: w = θ_u − φ̄ on the category basis, a per-axis affine map fitted on the seen
    # users (least squares, each behaviour's own axis), scored on the unseen users
    labels = lib.meta["basis"]["labels"]
    order = [labels.index(b) for b in BEHAVIOURS]
    w = (theta - lib.phi_mean.double()).mean(1)[:, order]  # [U, 7] layer-averaged weights in BEHAVIOURS order
    s_idx = torch.tensor(seen)
    mapped = torch.empty_like(w)
    for k in range(len(BEHAVIOURS)):
        x = torch.stack([w[s_idx, k], torch.ones(int(s_idx.sum()), dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(x, truth[s_idx, k : k + 1]).solution[:, 0]
        mapped[:, k] = w[:, k] * coef[0] + coef[1]
    unseen = ~s_idx
    result["cosine_axis_scaled_unseen"] = grouped(cos(mapped[unseen], truth[unseen]),
                                                  [c for c, s in zip(counts, seen, strict=True) if not s],
                                                  [False] * int(unseen.sum()))
    profiles = user_profiles()
    result["cosine_pairs_20_plus_by_profile"] = {
        p: summary([x for x, n, u in zip(cos(t_hat, truth).tolist(), counts, users, strict=True)
                    if n >= 20 and profiles[u] == p]) for p in sorted(set(profiles.values()))}
    return result


def time_thousand_users(fit: Any, repeats: int = 3) -> dict[str, Any]:
    """The ideal-point fit alone (τ chosen by 5-fold held-out likelihood, then the final fit) on 1 000 users:
    users-caa's 200 users' train pairs replicated 5× under new names, features already captured."""
    phi = fit.phi.double()
    lib = fit.library
    users = list(lib.users)
    base_index = fit.user_index
    ch, rj = phi[fit.chosen], phi[fit.rejected]
    reps = 5
    ch_r, rj_r = ch.repeat(reps, 1, 1), rj.repeat(reps, 1, 1)
    idx = torch.cat([base_index + i * len(users) for i in range(reps)])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fit_ideal_points(ch_r, rj_r, idx, reps * len(users))
        times.append(time.perf_counter() - t0)
    return {"users": reps * len(users), "pairs": len(idx), "layers": len(lib.layers), "k": lib.k,
            "seconds": [round(t, 2) for t in times], "best_s": round(min(times), 2),
            "threads": torch.get_num_threads(),
            "includes": "τ choice (5 folds × 9 grid points, on at most TAU_USERS = 300 sampled users) "
                        "+ final fit of every user"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--positions", default="response-mean,answer-token")
    ap.add_argument("--features", default="category-masked,prompt-centred,raw",
                    help="feature kinds to fit, comma-separated")
    ap.add_argument("--tau", default="per-layer,per-axis",
                    help="τ modes for category-masked features, comma-separated: per-layer (the fit's default), "
                         "per-axis")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    handle = load_model(args.model)
    out: dict[str, Any] = {"model": args.model, "data": "users-caa (synthetic; data/users_caa.py)",
                           "command": "nice -n 5 python experiments/users_recovery.py " + " ".join(sys.argv[1:]),
                           "method": __doc__,
                           "positions": {}}
    last = None
    kinds, modes = args.features.split(","), args.tau.split(",")
    for position in args.positions.split(","):
        out["positions"][position] = {}
        for kind, (result, fit) in run_position(handle, position, args.batch_size, kinds, modes).items():
            out["positions"][position][kind] = result
            last = last or fit
            c = result["cosine"]
            by_pairs = ", ".join(f"{k}: {v['mean']}" for k, v in c["by_pairs_per_user"].items())
            print(f"{position} {kind}: cos(t̂, t) at 20+ pairs {c['pairs_20_plus']['mean']} (unseen "
                  f"{c['unseen_pairs_20_plus'].get('mean')}); population "
                  f"{result['cosine_population']['pairs_20_plus']['mean']}; by pairs {{{by_pairs}}}", flush=True)
    if last is not None:
        out["fit_1000_users"] = time_thousand_users(last)
        print(f"1 000 users' ideal points: {out['fit_1000_users']['best_s']} s")
    write_text_atomic(args.out, json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
