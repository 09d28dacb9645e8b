"""The report's figures, each a function of the sweep lines that writes one PNG (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work without a display
import matplotlib.pyplot as plt

from steerable.errors import DataError
from steerable.sweeps.records import RateSummary, SweepRecord
from steerable.sweeps.select import median_ppl

NO_RATE = RateSummary(0, 0, 0, (0, 0))  # a category a line has no prompt of


def _series(records: Sequence[SweepRecord]) -> dict[tuple[str, str, str], list[SweepRecord]]:
    """Steered lines grouped by (method, layers, knob), each sorted along its knob."""
    out: dict[tuple[str, str, str], list[SweepRecord]] = {}
    for r in records:
        c = r.config
        if c.is_baseline:
            continue
        method = c.method + (" band" if c.cap_ceiling is not None else "")
        out.setdefault((method, str(c.layers or "default"), r.knob), []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: _x(r.value))
    return out


def _x(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value[:1] in "pn" and value[1:].isdigit():
        return float(value[1:])
    return 0.0


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dose_response(records: Sequence[SweepRecord], base: SweepRecord, path: Path) -> Path:
    """Behaviour rate (95 % CI band) and benign refusal against each method's knob; when the behaviour is
    compliance, coherent compliance too (dash-dot)."""
    series = _series(records)
    knobs = sorted({k for _, _, k in series})
    fig, axes = plt.subplots(1, len(knobs), figsize=(6.2 * len(knobs), 4.2), squeeze=False)
    name = base.behaviour.name
    for ax, knob in zip(axes[0], knobs, strict=True):
        for (method, layers, k), rs in series.items():
            if k != knob:
                continue
            xs = [_x(r.value) for r in rs]
            ys = [r.behaviour.rate for r in rs]
            line = ax.plot(xs, ys, marker="o", label=f"{method} · {layers}")[0]
            ax.fill_between(xs, [r.behaviour.ci95[0] for r in rs], [r.behaviour.ci95[1] for r in rs],
                            color=line.get_color(), alpha=0.15)
            coherent = [r.prompts.coherent_compliance for r in rs if r.prompts.coherent_compliance is not None]
            if name == "compliance" and len(coherent) == len(rs):  # attack success without the gibberish
                ax.plot(xs, [c.rate for c in coherent], ls="-.", marker=".", color=line.get_color(), alpha=0.8,
                        label=f"  coherent compliance ({method} · {layers})")
            benign = [r.benign for r in rs if r.benign is not None]
            if len(benign) == len(rs):
                ax.plot(xs, [b.refusal.rate for b in benign], ls="--", color=line.get_color(), alpha=0.7,
                        label=f"  benign refusal ({method} · {layers})")
        ax.axhline(base.behaviour.rate, color="grey", ls=":", label=f"unsteered {name}")
        ax.set_xlabel(knob.replace("_", " ") + (" (°)" if knob == "angle" else ""))
        ax.set_ylabel(f"{name} rate (n={base.behaviour.n}, 95% CI)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Dose-response")
    return _save(fig, path)


def _kl(r: SweepRecord) -> float:
    return r.kl or 0.0


def _mmlu_change(r: SweepRecord) -> float:
    return r.capability.change.change if r.capability is not None and r.capability.change is not None else 0.0


def _benign_refusal(r: SweepRecord) -> float:
    if r.benign is None:  # every line of a sweep with benign prompts has them
        raise DataError(f"{r.label}: the line has no benign prompts, its sweep's baseline has")
    return r.benign.refusal.rate


def tradeoff(records: Sequence[SweepRecord], base: SweepRecord, chosen: SweepRecord | None, path: Path) -> Path:
    """Behaviour against each side effect measured: KL, perplexity and (when measured) MMLU change."""
    panels: list[tuple[str, Callable[[SweepRecord], float]]] = [
        ("KL on benign prompts", _kl), ("median perplexity (unsteered model)", median_ppl)]
    if base.capability is not None:
        panels.append(("MMLU accuracy change", _mmlu_change))
    elif base.benign is not None:
        panels.append(("benign refusal rate", _benign_refusal))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    methods = sorted({r.config.method for r in records})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (label, fx) in zip(axes[0], panels, strict=True):
        for r in records:
            y = r.behaviour.rate
            ax.errorbar(fx(r), y, yerr=[[y - r.behaviour.ci95[0]], [r.behaviour.ci95[1] - y]],
                        fmt="o", color=colours[r.config.method], alpha=0.75, ms=5, capsize=2)
        if chosen is not None:
            ax.scatter([fx(chosen)], [chosen.behaviour.rate], marker="*", s=320, color="gold",
                       edgecolor="black", zorder=5, label=f"chosen: {chosen.label}")
        for m in methods:
            ax.plot([], [], "o", color=colours[m], label="unsteered" if m == "none" else m)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{base.behaviour.name} rate")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Behaviour vs side effects")
    return _save(fig, path)


def categories(base: SweepRecord, chosen: SweepRecord, path: Path) -> Path | None:
    """Behaviour per prompt category, unsteered vs the chosen configuration."""
    cats = sorted(set(base.categories) | set(chosen.categories))
    if not cats:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cats) + 2), 4.6))
    width = 0.4
    for j, (rec, label) in enumerate(((base, "unsteered"), (chosen, chosen.label))):
        vals = [rec.categories.get(c, NO_RATE) for c in cats]
        xs = [i + (j - 0.5) * width for i in range(len(cats))]
        ys = [v.rate for v in vals]
        err = [[y - v.ci95[0] for y, v in zip(ys, vals, strict=True)],
               [v.ci95[1] - y for y, v in zip(ys, vals, strict=True)]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(cats)), [f"{c}\n(n={base.categories.get(c, NO_RATE).n})" for c in cats],
                  rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"{base.behaviour.name} rate")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Per category")
    return _save(fig, path)


def layer_profile(record: SweepRecord, chosen: SweepRecord | None, path: Path) -> Path | None:
    """Per-layer AUROC and |Cohen's d| of the direction file, the chosen configuration's layers shaded."""
    prof = record.layer_profile
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    layers = prof.layers
    ax.plot(layers, prof.auroc, marker="o", label="AUROC")
    ax.set_ylabel("AUROC")
    ax.set_xlabel("layer")
    ax.set_ylim(0.4, 1.02)
    ax2 = ax.twinx()
    ax2.plot(layers, [abs(d) for d in prof.cohens_d], marker="s", color="C1", label="|Cohen's d|")
    ax2.set_ylabel("|Cohen's d|")
    for layer in chosen.layers if chosen is not None else []:
        ax.axvspan(layer - 0.5, layer + 0.5, color="gold", alpha=0.25, lw=0)
    ax.legend(loc="lower left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    ax.set_title("Per-layer quality of the direction (shaded: chosen layers)")
    ax.grid(alpha=0.3)
    return _save(fig, path)
