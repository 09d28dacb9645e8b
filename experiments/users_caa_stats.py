"""The numbers docs/users_caa.md quotes: what the synthetic users-caa set holds, and how well its ideal points can
be recovered when the response features are known exactly (an oracle ceiling for `steerable users fit`, which
must instead read features off model activations).

    python experiments/users_caa_stats.py   # -> experiments/results/users_caa_stats.json (seconds, no model)
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from steerable.data.preferences import BEHAVIOURS
from steerable.data.users_caa import item_pools, label_probability, synthetic_users, users_caa
from steerable.fsutil import write_text_atomic

OUT = Path("experiments/results/users_caa_stats.json")
TAUS = (0.25, 0.5, 1.0)


def _sig(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _map(d: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """argmax Σ log σ(2θ·d) − ‖θ − prior‖² / 2τ² by Newton (d = φ(chosen) − φ(rejected), equal norms)."""
    th = prior.copy()
    for _ in range(30):
        p = _sig(2 * d @ th)
        g = 2 * d.T @ (1 - p) - (th - prior) / tau ** 2
        h = 4 * (d.T * (p * (1 - p))) @ d + np.eye(len(th)) / tau ** 2
        th = th + np.linalg.solve(h, g)
    return th


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> int:
    users = synthetic_users()
    rows = users_caa("all")
    matching = {(b, p.prompt): p.positive for b, s in item_pools().items() for ps in s.values() for p in ps}
    k = {b: i for i, b in enumerate(BEHAVIOURS)}
    theta = {u.name: np.array(u.theta) for u in users}
    feats: dict[str, dict[str, list[np.ndarray]]] = {"train": defaultdict(list), "test": defaultdict(list)}
    won = []
    for r in rows:
        d = np.zeros(len(BEHAVIOURS))
        w = r.chosen == matching[(str(r.category), r.prompt)]
        d[k[str(r.category)]] = 2.0 if w else -2.0  # φ(chosen) − φ(rejected), features at ±e_k
        feats[str(r.split)][r.user].append(d)
        won.append((w, label_probability(theta[r.user][k[str(r.category)]]), theta[r.user][k[str(r.category)]]))
    # the population point: one MAP over every user's training pairs (a flat prior)
    all_train = np.array([d for ds in feats["train"].values() for d in ds])
    pop = _map(all_train, np.zeros(len(BEHAVIOURS)), 100.0)
    n_train = {u.name: u.n_train for u in users}

    def acc(est: dict[str, np.ndarray]) -> float:
        return float(np.mean([(d @ est[u]) > 0 for u, ds in feats["test"].items() for d in ds]))

    oracle = {}
    for tau in TAUS:
        est = {u: _map(np.array(feats["train"][u]), pop, tau) for u in theta}
        by_n: dict[int, list[float]] = defaultdict(list)
        for u, e in est.items():
            by_n[n_train[u]].append(_cos(e, theta[u]))
        oracle[str(tau)] = {"test_accuracy": round(acc(est), 4),
                            "cosine_by_train_pairs": {n: round(float(np.mean(v)), 3) for n, v in sorted(by_n.items())}}
    report = {
        "users": len(users), "rows": len(rows),
        "pairs_by_split": dict(Counter(str(r.split) for r in rows)),
        "pairs_by_behaviour": dict(Counter(str(r.category) for r in rows)),
        "users_by_profile": dict(Counter(u.profile for u in users)),
        "unseen_users_by_profile": dict(Counter(u.profile for u in users if not u.seen)),
        "unseen_users": sum(not u.seen for u in users),
        "matching_chosen_rate": round(float(np.mean([w for w, _, _ in won])), 4),
        "matching_chosen_expected": round(float(np.mean([p for _, p, _ in won])), 4),
        "label_agrees_with_sign_of_theta": round(float(np.mean([w == (t > 0) for w, _, t in won])), 4),
        "population_point": [round(float(x), 3) for x in pop],
        "mean_true_ideal_point": [round(float(x), 3) for x in np.mean(list(theta.values()), axis=0)],
        "test_accuracy": {"population_point": round(acc({u: pop for u in theta}), 4),
                          "true_ideal_points": round(acc(theta), 4)},
        "oracle_map_by_tau": oracle,
        "note": "oracle = BT MAP with the true response features (±e_k), not model activations",
    }
    write_text_atomic(OUT, json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
