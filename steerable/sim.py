"""Synthetic lab for seed 000 (activation capping): activations with a KNOWN Assistant axis.

Experiment 1 (seed Table 1 / Figure 1): how well each estimator recovers the axis as noise σ and the
calibration size n vary. Experiment 2 (seed Figure 2): harm reduction H, capability preservation C and
F1 = 2HC/(H+C) over the capping threshold τ. `run_lab` runs both and writes the files; `steerable sim --out DIR
[--quick]` prints `summary_text` of its result (`python -m steerable.sim` logs it).

The generative model (ours; the seed does not specify one). With unit axis a, centre μ, k nuisance
directions Q ⟂ a and per-role offsets o_r ⟂ a (centred over roles, so balanced roles average them out):
    assistant_i = μ + (s/2)·a + ε_i
    role_i      = μ − (s/2)(1 + κ z_i)·a + o_{r(i)} + ε'_i,   z_i ~ N(0, 1)
    ε = σ·N(0, I_d) + νσ·N(0, I_k) Q
Pair i is (assistant_i, role_i). κ (how much a persona's strength varies) is the only spread of the pair
differences along a, so pairwise PCA sees the axis only while κs/2 outweighs every other direction's spread.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerable.capture.stats import LayerStats
from steerable.directions.axis import assistant_axis as axis_estimator
from steerable.directions.estimators import lda, logistic, mean_diff, pca
from steerable.fsutil import atomic_path, write_text_atomic
from steerable.steering import ops

log = logging.getLogger(__name__)

ESTIMATOR_NAMES = ("assistant-axis", "mean-diff", "pca", "lda", "logistic")
DEFAULT_TAUS = tuple(round(0.1 * i, 1) for i in range(1, 51))  # the seed's sweep, τ ∈ [0.1, 5.0]


@dataclass(frozen=True)
class SimSpec:
    d: int = 64
    n: int = 400  # samples per class
    sigma: float = 0.5
    separation: float = 4.0  # s: distance between the class means along a
    seed: int = 0
    n_roles: int = 8
    role_spread: float = 0.15  # per-coordinate std of the role offsets o_r
    intensity_spread: float = 0.5  # κ
    n_nuisance: int = 3
    nuisance_scale: float = 3.0  # ν: nuisance std in units of σ
    role_skew: float = 0.0  # role frequencies ∝ exp(−skew·r); 0 = every role equally often


@dataclass(frozen=True)
class World:
    """The fixed geometry of one seed; draws of samples share it."""

    spec: SimSpec
    axis: torch.Tensor  # [d], unit
    centre: torch.Tensor  # μ
    nuisance: torch.Tensor  # [k, d], orthonormal, ⟂ axis
    offsets: torch.Tensor  # [n_roles, d], ⟂ axis, sum to zero

    @property
    def assistant_mean(self) -> torch.Tensor:
        return self.centre + self.spec.separation / 2 * self.axis


@dataclass(frozen=True)
class Sample:
    assistant: torch.Tensor  # [n, d] float32; row i is paired with roles[i]
    roles: torch.Tensor  # [n, d] float32
    role_ids: torch.Tensor  # [n] long
    axis: torch.Tensor  # [d] float32, the true unit axis (points toward the Assistant)


def make_world(spec: SimSpec, gen: torch.Generator) -> World:
    d = spec.d
    axis = torch.randn(d, generator=gen, dtype=torch.float64)
    axis /= axis.norm()
    centre = 2.0 * torch.randn(d, generator=gen, dtype=torch.float64)
    # QR of [a, random]: the remaining columns are orthonormal and orthogonal to a
    q, _ = torch.linalg.qr(torch.cat([axis[:, None], torch.randn(d, spec.n_nuisance, generator=gen,
                                                                   dtype=torch.float64)], 1))
    offsets = spec.role_spread * torch.randn(spec.n_roles, d, generator=gen, dtype=torch.float64)
    offsets -= (offsets @ axis)[:, None] * axis
    offsets -= offsets.mean(0)  # the role population averages to μ − (s/2)a exactly
    return World(spec, axis, centre, q[:, 1:].T.contiguous(), offsets)


def _noise(world: World, n: int, gen: torch.Generator) -> torch.Tensor:
    s = world.spec
    iso = s.sigma * torch.randn(n, s.d, generator=gen, dtype=torch.float64)
    return iso + s.nuisance_scale * s.sigma * torch.randn(n, s.n_nuisance, generator=gen,
                                                          dtype=torch.float64) @ world.nuisance


def _role_ids(spec: SimSpec, n: int, gen: torch.Generator) -> torch.Tensor:
    if spec.role_skew == 0:
        return torch.arange(n) % spec.n_roles
    p = torch.exp(-spec.role_skew * torch.arange(spec.n_roles, dtype=torch.float64))
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=gen)


def draw(world: World, n: int, gen: torch.Generator) -> Sample:
    s = world.spec
    ids = _role_ids(s, n, gen)
    strength = 1 + s.intensity_spread * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    asst = world.assistant_mean + _noise(world, n, gen)
    roles = world.centre - s.separation / 2 * strength * world.axis + world.offsets[ids] + _noise(world, n, gen)
    return Sample(asst.float(), roles.float(), ids, world.axis.float())


def sample_world(spec: SimSpec) -> Sample:
    """`spec.n` pairs drawn from the world of `spec.seed` (the world and the draw both fixed by the seed)."""
    gen = torch.Generator().manual_seed(spec.seed)
    return draw(make_world(spec, gen), spec.n, gen)


# -- estimators ---------------------------------------------------------------------------------------

def _stats(pos: torch.Tensor, neg: torch.Tensor) -> LayerStats:
    # reservoir as large as the data: the logistic probe then trains on every row
    st = LayerStats(pos.shape[1], second_moments=True, reservoir_cap=max(len(pos), len(neg)), seed=0)
    st.add(pos, torch.ones(len(pos), dtype=torch.long), torch.zeros(len(pos), dtype=torch.bool))
    st.add(neg, torch.zeros(len(neg), dtype=torch.long), torch.zeros(len(neg), dtype=torch.bool))
    st.add_pair_diffs(pos - neg)
    return st


def assistant_axis(sample: Sample) -> torch.Tensor:
    """mean(assistant) − mean over roles of each role's mean (methods.md §3), by the project's own estimator."""
    personas = [None] * len(sample.assistant) + [f"role-{int(r)}" for r in sample.role_ids]
    return axis_estimator(torch.cat([sample.assistant, sample.roles]), personas)


def estimate_all(sample: Sample) -> dict[str, torch.Tensor]:
    """Unit direction per estimator, each oriented toward the Assistant (positive class)."""
    st = _stats(sample.assistant, sample.roles)
    return {"assistant-axis": assistant_axis(sample), "mean-diff": mean_diff(st).direction,
            "pca": pca(st).direction, "lda": lda(st).direction, "logistic": logistic(st).direction}


# -- experiment 1: axis recovery ----------------------------------------------------------------------

def bootstrap_ci(x: Sequence[float], seed: int = 0, n_boot: int = 2000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    v = np.asarray(x, dtype=float)
    means = v[np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def alignment_experiment(
    sigmas: Sequence[float],
    ns: Sequence[int],
    repeats: int,
    d: int | None = None,
    seed: int = 0,
    base: SimSpec | None = None,
) -> dict:
    """Cosine of each estimate with the true axis; `d` (if given) overrides `base.d`. Repeat r uses one world
    for every σ and n, and the same standard-normal draws at every σ, so comparisons across σ are paired."""
    base = base or SimSpec()
    d = base.d if d is None else d
    rows = []
    for r in range(repeats):
        for sigma in sigmas:
            for n in ns:
                spec = replace(base, d=d, n=n, sigma=sigma, seed=seed * 100_003 + r)
                sample = sample_world(spec)
                for name, v in estimate_all(sample).items():
                    rows.append({"estimator": name, "sigma": sigma, "n": n, "repeat": r,
                                 "cosine": float(v @ sample.axis)})
    return {"rows": rows, "summary": summarise(rows, seed)}


def summarise(rows: list[dict], seed: int = 0) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["estimator"], row["sigma"], row["n"]), []).append(row["cosine"])
    out = []
    for (name, sigma, n), cos in groups.items():
        lo, hi = bootstrap_ci(cos, seed)
        out.append({"estimator": name, "sigma": sigma, "n": n, "repeats": len(cos), "mean": float(np.mean(cos)),
                    "median": float(np.median(cos)), "ci95": [lo, hi]})
    return out


# -- experiment 2: capping threshold ------------------------------------------------------------------

def cap_band(h: torch.Tensor, axis: torch.Tensor, centre: float, tau: float) -> torch.Tensor:
    """Seed 000 eq. 1 with p = h·â − centre: h' = h − max(0, p − τ)â + max(0, −τ − p)â.

    The seed prints the second term as min(0, p + τ)·â, which pushes a low projection further down;
    the clamp into [−τ, τ] that its text describes is the max form used here."""
    return ops.cap(h, axis[None], torch.tensor([centre - tau]), torch.tensor([centre + tau]))


def cap_floor(h: torch.Tensor, axis: torch.Tensor, centre: float, tau: float) -> torch.Tensor:
    """Assistant Axis paper's floor: raise p = h·â − centre to −τ when below, leave everything else."""
    return ops.cap(h, axis[None], torch.tensor([centre - tau]), torch.tensor([math.inf]))


def f1(h: float, c: float) -> float:
    return 0.0 if h + c == 0 else 2 * h * c / (h + c)


def capping_experiment(
    taus: Sequence[float] = DEFAULT_TAUS,
    spec: SimSpec | None = None,
    n_test: int = 2000,
    estimator: str = "assistant-axis",
    coverage: float = 0.99,
) -> dict:
    """H, C and F1 per τ for band and floor capping, along an axis estimated from a calibration draw.

    Benign = fresh Assistant samples; harmful (persona-pushed) = fresh role samples of the same world.
    Harm is judged on the TRUE axis, capping only sees the estimate. With t = (h − E[assistant])·a:
    - harmless region R (ours): the central `coverage` interval of the benign samples' t;
    - H (ours) = among harmful samples with t ∉ R, the fraction whose capped t' lies in R;
    - C (ours) = fraction of benign samples the cap leaves bit-for-bit unchanged (chosen over a relative
      norm change, which depends on the arbitrary ‖μ‖);
    - F1 = 2HC/(H+C). `best` is the τ with the highest F1 (the smallest such τ on ties).
    """
    spec = spec or SimSpec()
    gen = torch.Generator().manual_seed(spec.seed)
    world = make_world(spec, gen)
    cal, test = draw(world, spec.n, gen), draw(world, n_test, gen)
    axis_hat = estimate_all(cal)[estimator]
    centre = float(cal.assistant.mean(0) @ axis_hat)
    a, mu_a = world.axis.float(), world.assistant_mean.float()

    def true_coord(h: torch.Tensor) -> torch.Tensor:
        return (h - mu_a) @ a

    q = torch.quantile(true_coord(test.assistant).double(), torch.tensor([(1 - coverage) / 2, (1 + coverage) / 2],
                                                                        dtype=torch.float64))
    lo, hi = float(q[0]), float(q[1])
    t_harm = true_coord(test.roles)
    outside = (t_harm < lo) | (t_harm > hi)
    rows: list[dict[str, Any]] = []
    for mode, cap in (("band", cap_band), ("floor", cap_floor)):
        for tau in taus:
            t_capped = true_coord(cap(test.roles, axis_hat, centre, tau))
            back = outside & (t_capped >= lo) & (t_capped <= hi)
            h_red = float(back.sum()) / max(int(outside.sum()), 1)
            benign = cap(test.assistant, axis_hat, centre, tau)
            cap_pres = float((benign == test.assistant).all(1).float().mean())
            rows.append({"mode": mode, "tau": tau, "H": h_red, "C": cap_pres, "F1": f1(h_red, cap_pres)})
    best = {m: max((r for r in rows if r["mode"] == m), key=lambda r: (r["F1"], -r["tau"])) for m in ("band", "floor")}
    return {"rows": rows, "best": best, "harmless_region": [lo, hi], "estimator": estimator,
            "axis_cosine": float(axis_hat @ a), "n_calibration": spec.n, "n_test": n_test, "coverage": coverage}


# -- CLI ----------------------------------------------------------------------------------------------

def _plot_alignment(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    n_max = max(r["n"] for r in summary)
    sig_ref = min((r["sigma"] for r in summary), key=lambda s: abs(s - 1.0))
    for name in ESTIMATOR_NAMES:
        for ax, key, fixed, val in ((left, "sigma", "n", n_max), (right, "n", "sigma", sig_ref)):
            pts = sorted((r[key], r["mean"], *r["ci95"]) for r in summary if r["estimator"] == name and r[fixed] == val)
            x, m, lo, hi = map(np.array, zip(*pts, strict=True))
            ax.plot(x, m, marker="o", ls="--" if name == "assistant-axis" else "-", label=name)
            ax.fill_between(x, lo, hi, alpha=0.2)
    left.set(xscale="log", xlabel="noise σ", ylabel="cosine with true axis", title=f"n = {n_max} per class")
    right.set(xscale="log", xlabel="n per class", title=f"σ = {sig_ref}")
    left.legend()
    _save(fig, path)


def _plot_capping(cap: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, style in (("band", "-"), ("floor", "--")):
        rows = [r for r in cap["rows"] if r["mode"] == mode]
        for key, color in (("H", "C3"), ("C", "C0"), ("F1", "k")):
            ax.plot([r["tau"] for r in rows], [r[key] for r in rows], style, color=color, label=f"{key} ({mode})")
    ax.axvline(cap["best"]["band"]["tau"], color="grey", ls=":", label="best τ (band)")
    ax.set(xlabel="τ (projection units, centred on the Assistant mean)", ylabel="rate", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    fig.clf()


def run_lab(out: str | Path, *, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Both experiments on the default spec (seed `seed`); writes sim.json, sim_alignment.png and
    sim_capping.png to `out` and returns what sim.json holds. `quick`: a small grid (seconds)."""
    import sklearn.linear_model  # noqa: F401  loads scipy's BLAS now, so that the limit below reaches it
    from threadpoolctl import threadpool_limits  # installed with scikit-learn (the logistic probe)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # d×d with d = 64: idle OpenMP threads spinning between calls cost more than they add
    try:
        with threadpool_limits(limits=1):  # the same for the BLAS under scikit-learn's fits (10× faster here)
            return _run(Path(out), quick, seed)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, quick: bool, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    if quick:
        grid: dict[str, Any] = {"sigmas": [0.1, 1.0], "ns": [50, 200], "repeats": 3}
    else:
        grid = {"sigmas": [0.05, 0.1, 0.25, 0.5, 1.0, 2.0], "ns": [50, 100, 200, 500, 1000], "repeats": 30}
    spec = SimSpec(seed=seed)
    align = alignment_experiment(grid["sigmas"], grid["ns"], grid["repeats"], d=spec.d, seed=seed, base=spec)
    cap = capping_experiment(DEFAULT_TAUS, spec)
    result = {"spec": asdict(spec), "grid": grid, "alignment": align, "capping": cap,
              "f1_optimum": cap["best"]["band"], "elapsed_s": round(time.perf_counter() - t0, 2)}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "sim.json", json.dumps(result, indent=1))
    _plot_alignment(align["summary"], out / "sim_alignment.png")
    _plot_capping(cap, out / "sim_capping.png")
    log.info("wrote %s, %s, %s (%.1f s)", out / "sim.json", out / "sim_alignment.png", out / "sim_capping.png",
             result["elapsed_s"])
    return result


def summary_text(result: dict[str, Any]) -> str:
    """Markdown tables of axis recovery (at σ ≈ 0.1 and 1 over n; at the largest n over σ) and each capping
    mode's best τ, from `run_lab`'s result."""
    summary, cap, elapsed = result["alignment"]["summary"], result["capping"], result["elapsed_s"]
    ns, sigmas = sorted({r["n"] for r in summary}), sorted({r["sigma"] for r in summary})
    cell = {(r["estimator"], r["sigma"], r["n"]): r for r in summary}
    fmt = "{0[mean]:.4f} [{0[ci95][0]:.3f}, {0[ci95][1]:.3f}]".format
    lines: list[str] = []
    for sigma in sorted({min(sigmas, key=lambda s: abs(s - t)) for t in (0.1, 1.0)}):
        lines.append(f"\nAxis recovery at σ = {sigma}: mean cosine with the true axis [95% bootstrap CI]")
        lines.append("| estimator | " + " | ".join(f"n={n}" for n in ns) + " |\n|---|" + "---|" * len(ns))
        for name in ESTIMATOR_NAMES:
            lines.append(f"| {name} | " + " | ".join(fmt(cell[name, sigma, n]) for n in ns) + " |")
    lines.append(f"\nAxis recovery at n = {ns[-1]} per class")
    lines.append("| estimator | " + " | ".join(f"σ={s}" for s in sigmas) + " |\n|---|" + "---|" * len(sigmas))
    for name in ESTIMATOR_NAMES:
        lines.append(f"| {name} | " + " | ".join(f"{cell[name, s, ns[-1]]['mean']:.4f}" for s in sigmas) + " |")
    lo, hi = cap["harmless_region"]
    lines.append(f"\nCapping ({cap['estimator']} axis, cosine {cap['axis_cosine']:.4f}; "
                 f"harmless region [{lo:.3f}, {hi:.3f}])")
    for mode, b in cap["best"].items():
        lines.append(f"  {mode:5s}: best τ = {b['tau']}  H = {b['H']:.4f}  C = {b['C']:.4f}  F1 = {b['F1']:.4f}")
    lines.append(f"\n({elapsed:.1f} s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m steerable.sim --out DIR [--quick] [--seed N]`: `run_lab`, its summary logged at INFO."""
    ap = argparse.ArgumentParser(prog="python -m steerable.sim", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="small grid (seconds), for smoke tests")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    result = run_lab(args.out, quick=args.quick, seed=args.seed)
    log.info("%s", summary_text(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
