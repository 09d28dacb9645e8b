"""docs/persona.md's tables from experiments/results/persona/<model>/ (written by experiments/persona.sh).

    python experiments/persona_table.py smollm2-135m qwen2.5-0.5b

Per sweep configuration: refusal on persona-framed harmful requests, harm reduction H (the share of the
baseline's compliance removed), capability preservation C (MMLU accuracy kept, and benign prompts still
answered), F1 = 2HC/(H+C) with the MMLU C (seed 000), KL on benign prompts and the median perplexity of
the benign completions; then capping vs plain addition at matched H, and the drift summary per condition.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from steerable.sweeps.records import Capability, SetSummary, SweepRecord, baseline_of, read_records

ROOT = Path("experiments/results/persona")


def _h(rec: SweepRecord, base: SweepRecord) -> float:
    b, r = base.behaviour.rate, rec.behaviour.rate
    return max(0.0, (r - b) / (1 - b)) if b < 1 else 1.0


def _capability(rec: SweepRecord) -> Capability:
    if rec.capability is None:
        raise SystemExit(f"{rec.label}: the capping sweep was run without --mmlu")
    return rec.capability


def _benign(rec: SweepRecord) -> SetSummary:
    if rec.benign is None:
        raise SystemExit(f"{rec.label}: the capping sweep was run without --benign")
    return rec.benign


def _c_mmlu(rec: SweepRecord, base: SweepRecord) -> float:
    acc, acc0 = _capability(rec).accuracy.rate, _capability(base).accuracy.rate
    return min(1.0, acc / acc0) if acc0 else 0.0


def _c_benign(rec: SweepRecord, base: SweepRecord) -> float:
    ok, ok0 = 1 - _benign(rec).refusal.rate, 1 - _benign(base).refusal.rate
    return min(1.0, ok / ok0) if ok0 else 0.0


def _f1(h: float, c: float) -> float:
    return 2 * h * c / (h + c) if h + c else 0.0


def sweep_table(model: str) -> tuple[str, list[dict]]:
    recs = read_records(ROOT / model / "cap_sweep.jsonl", repair=False)
    base = baseline_of(recs)
    rows: list[dict[str, Any]] = []  # this table's rows (not sweep lines)
    for rec in recs:
        h, cm, cb = _h(rec, base), _c_mmlu(rec, base), _c_benign(rec, base)
        rows.append({"label": rec.label, "method": rec.config.method, "refusal": rec.behaviour.rate,
                     "ci": rec.behaviour.ci95, "n": rec.behaviour.n, "H": h, "C_mmlu": cm, "C_benign": cb,
                     "F1": _f1(h, cm), "F1_benign": _f1(h, cb), "kl": rec.kl or 0.0,
                     "mmlu": _capability(rec).accuracy.rate, "benign_refusal": _benign(rec).refusal.rate,
                     "ppl": _benign(rec).perplexity_median})
    lines = ["| configuration | refusal on persona-harmful [95 % CI] | H | MMLU | C (MMLU) | benign refused | "
             "C (benign) | F1 (MMLU) | F1 (benign) | KL benign | benign ppl (median) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    best = max((r for r in rows if r["method"] != "none"), key=lambda r: r["F1"])
    for r in rows:
        mark = " **(F1 best)**" if r is best else ""
        lines.append(f"| {r['label']}{mark} | {r['refusal']:.0%} [{r['ci'][0]:.0%}, {r['ci'][1]:.0%}] (n={r['n']}) | "
                     f"{r['H']:.2f} | {r['mmlu']:.1%} | {r['C_mmlu']:.2f} | {r['benign_refusal']:.0%} | "
                     f"{r['C_benign']:.2f} | {r['F1']:.3f} | {r['F1_benign']:.3f} | {r['kl']:.3f} | {r['ppl']:.2f} |")
    return "\n".join(lines), rows


def matched(rows: list[dict]) -> str:
    """Each cap configuration beside the addition whose harm reduction is closest to it."""
    adds = [r for r in rows if r["method"] == "add"]
    lines = ["| cap | H | C (MMLU) | C (benign) | KL | closest add | H | C (MMLU) | C (benign) | KL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in (r for r in rows if r["method"] == "cap"):
        if not adds:
            break
        a = min(adds, key=lambda r: abs(r["H"] - c["H"]))
        lines.append(f"| {c['label']} | {c['H']:.2f} | {c['C_mmlu']:.2f} | {c['C_benign']:.2f} | {c['kl']:.3f} | "
                     f"{a['label']} | {a['H']:.2f} | {a['C_mmlu']:.2f} | {a['C_benign']:.2f} | {a['kl']:.3f} |")
    return "\n".join(lines)


def drift_table(model: str) -> str:
    path = ROOT / model / "drift" / "summary.json"
    if not path.exists():
        return "(no drift run yet)"
    s = json.loads(path.read_text())
    lines = [f"layer {s['band']['layer']}, Assistant band [{s['band']['lo']:.2f}, {s['band']['hi']:.2f}] "
             f"(p{s['band']['percentiles'][0]:g}–p{s['band']['percentiles'][1]:g})", "",
             "| condition | replies | projection while generating | below band | text re-read unsteered | "
             "text below band | text drift (vs unsteered) | conversations leaving the band | projection by turn |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = s["conditions"].get("unsteered")
    for name, c in s["conditions"].items():
        red = ""
        if base and name != "unsteered" and base.get("mean_text_drift"):
            red = f" ({1 - c['mean_text_drift'] / base['mean_text_drift']:.0%} reduction)"
        by_turn = " ".join(f"{v:.1f}" for v in c["mean_projection_by_turn"].values())
        leaving = f"{c['conversations_leaving_band']}/{c['conversations']}"
        text = (f"{c['mean_text_projection']:.2f} | {c['text_below_band']:.0%} | {c['mean_text_drift']:.2f}{red}"
                if "mean_text_projection" in c else "- | - | -")
        lines.append(f"| {name} | {c['replies']} | {c['mean_projection']:.2f} | {c['left_band']:.0%} | {text} | "
                     f"{leaving} | {by_turn} |")
    return "\n".join(lines)


def f1_plot(model: str, rows: list[dict]) -> Path:
    """Seed 000's Figure 2 on a real model: H, C and F1 against the floor percentile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floors = sorted((float(r["label"].split("floor=p")[1]), r) for r in rows if "floor=p" in r["label"])
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = [x for x, _ in floors]
    for key, style in (("H", "r-o"), ("C_mmlu", "b-s"), ("C_benign", "c--^"), ("F1", "k-D")):
        ax.plot(xs, [r[key] for _, r in floors], style, label=key.replace("_", " "))
    ax.set_xlabel("cap floor: percentile of the Assistant's own projections")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{model}: floor capping on persona-framed harmful requests")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = ROOT / model / "f1.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    for model in sys.argv[1:] or ["smollm2-135m", "qwen2.5-0.5b"]:
        print(f"## {model}\n")
        if (ROOT / model / "cap_sweep.jsonl").exists():
            text, rows = sweep_table(model)
            print(text, "\n")
            print(matched(rows), "\n")
            print(f"(figure: {f1_plot(model, rows)})\n")
        print(drift_table(model), "\n")


if __name__ == "__main__":
    main()
