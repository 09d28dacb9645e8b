"""The method comparison tables of docs/training.md from experiments/train_trait.py's outputs.

Reads every MODEL-persona-sft*.json result file in --results (plain: MODEL-persona-sft.json; the control
`-assistant` is left out) and prints, per method and setting (λ, strength), one row with 95 % t-intervals over
seeds, marked "matched" where the held-out SFT loss is within 5 % of plain fine-tuning's; then, where the files
have them, settings outside 5 % against the plain run of another budget nearest their loss, and the capability /
coherence columns and the inference-time cap on top (seed 000 exp. 5).

  python experiments/training_table.py --model smollm2-135m [--results experiments/results/training_v2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

T975 = {2: 12.706, 3: 4.303, 4: 3.182}
ORDER = ("none", "preventative", "aux", "actreg", "contrastive", "combined", "caft")


def ci(xs: list[float], digits: int = 2, sign: str = "+") -> str:
    """Mean [95 % t-interval] over seeds; `sign` "" for a level (a loss) rather than a shift."""
    m = statistics.fmean(xs)
    f = f"{sign}.{digits}f"
    if len(xs) < 2:
        return f"{m:{f}} (1 seed)"
    h = T975.get(len(xs), 1.96) * statistics.stdev(xs) / len(xs) ** 0.5
    return f"{m:{f}} [{m - h:{f}}, {m + h:{f}}]"


def setting(rec: dict[str, Any], plain_steps: int) -> str:
    """The row's label: the method and its knob, plus its layers where the run set them and its steps where they
    differ from plain fine-tuning's."""
    m = rec["method"]
    if m == "none":
        label = "none (plain)"
    elif m in ("aux", "actreg", "contrastive"):
        label = f"{m} λ {rec['lam']:g}"
    elif m == "combined":
        label = f"combined λ {rec['lam']:g} + {rec['lam_reg'] if rec['lam_reg'] is not None else rec['lam']:g}"
    elif m == "preventative":
        label = f"preventative α {rec['strength']:g}"
    else:
        label = m
    if rec.get("caft_ablation") == "mean":
        label += " (mean ablation)"
    if rec.get("method_layers"):
        label += f", layers {rec['method_layers']}"
    if rec["steps"] != plain_steps:
        label += f", {rec['steps']} steps"
    return label


def records(results: Path, model: str) -> list[dict[str, Any]]:
    recs = [json.loads(f.read_text()) for f in sorted(results.glob(f"{model}-persona-sft*.json"))
            if not f.name.endswith("-assistant.json")]
    return sorted(recs, key=lambda r: (ORDER.index(r["method"]) if r["method"] in ORDER else 99, r["lam"],
                                       r["strength"], r.get("caft_ablation") or "", r.get("method_layers") or "",
                                       r["steps"]))


def col(rows: list[dict[str, Any]], key: str, scale: float = 1.0, digits: int = 2, sign: str = "+") -> str:
    if not all(key in r for r in rows):
        return "—"
    return ci([scale * r[key] for r in rows], digits, sign)


def within_5(gap: float) -> str:
    return f"{'yes' if abs(gap) <= 0.05 else 'no'} ({100 * gap:+.1f} %)"


def matched(rec: dict[str, Any], plain_steps: int, gap: float) -> str:
    if rec["method"] == "none":
        return "—" if rec["steps"] == plain_steps else f"({100 * gap:+.1f} %)"
    return within_5(gap)


def mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def other_budget_table(recs: list[dict[str, Any]], plain_rec: dict[str, Any], plain_loss: float) -> None:
    """Settings whose held-out loss is not within 5 % of plain fine-tuning's at the default budget, each set against
    the plain run of another budget (fewer or more steps) whose loss is nearest theirs and marked where that one is
    within 5 %: matched task loss reached from plain's side rather than the method's."""
    others = [r for r in recs if r["method"] == "none" and r["steps"] != plain_rec["steps"]]
    pairs = []
    for rec in recs:
        loss = mean(rec["runs"], "heldout_sft_loss")
        if rec["method"] == "none" or abs(loss / plain_loss - 1) <= 0.05 or not others:
            continue
        ref = min(others, key=lambda o: abs(mean(o["runs"], "heldout_sft_loss") / loss - 1))
        pairs.append((rec, ref, loss / mean(ref["runs"], "heldout_sft_loss") - 1))
    if not pairs:
        return
    print("\n| method | against plain at | its loss | within 5 % | projection shift: % of that plain's | "
          "text projection shift (that plain's) | below-band shift (that plain's) |")
    print("|---|---|---|---|---|---|---|")
    for rec, ref, gap in pairs:
        rows, ref_rows = rec["runs"], ref["runs"]
        print(f"| {setting(rec, plain_rec['steps'])} | {ref['steps']} steps | "
              f"{mean(ref_rows, 'heldout_sft_loss'):.3f} | {within_5(gap)} | "
              f"{100 * mean(rows, 'projection_shift') / mean(ref_rows, 'projection_shift'):.0f} % | "
              f"{col(rows, 'text_projection_shift')} ({col(ref_rows, 'text_projection_shift')}) | "
              f"{col(rows, 'below_band_shift')} ({col(ref_rows, 'below_band_shift')}) |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--results", default="experiments/results/training")
    args = ap.parse_args()
    recs = records(Path(args.results), args.model)
    # Plain fine-tuning at the default budget is MODEL-persona-sft.json; plain runs with other step counts (the
    # shorter budgets that CAFT's losses are matched against) are rows like any other.
    plain_rec = json.loads((Path(args.results) / f"{args.model}-persona-sft.json").read_text())
    plain_loss = mean(plain_rec["runs"], "heldout_sft_loss")
    plain_shift = mean(plain_rec["runs"], "projection_shift")
    print("| method | seeds | projection shift [95 % CI] | % of plain's | text projection shift | below-band shift "
          "| held-out SFT loss | within 5 % of plain's |")
    print("|---|---|---|---|---|---|---|---|")
    for rec in recs:
        rows = rec["runs"]
        shifts = [r["projection_shift"] for r in rows]
        loss = mean(rows, "heldout_sft_loss")
        gap = loss / plain_loss - 1
        print(f"| {setting(rec, plain_rec['steps'])} | {','.join(str(r['seed']) for r in rows)} | {ci(shifts)} | "
              f"{100 * statistics.fmean(shifts) / plain_shift:.0f} % | {col(rows, 'text_projection_shift')} | "
              f"{col(rows, 'below_band_shift')} | {loss:.3f} | {matched(rec, plain_rec['steps'], gap)} |")
    other_budget_table(recs, plain_rec, plain_loss)
    with_cap = [rec for rec in recs if all("capped_text_projection_shift" in r for r in rec["runs"])]
    if not with_cap:
        return
    first = with_cap[0]
    base, capped = first["before"], first["before"]["capped"]
    print(f"\nBase model: coherent replies {base['coherent']:.3f}, capability {base.get('capability', 0.0):.3f}"
          f" ({first['capability_task']}, {first['capability_items']} items); with the cap ({first['cap']} floor): "
          f"text projection {capped['text_projection'] - base['text_projection']:+.2f}, "
          f"below band {capped['below_band'] - base['below_band']:+.3f}, "
          f"held-out loss {capped['heldout_sft_loss']:.3f} (unsteered {base['heldout_sft_loss']:.3f})\n")
    print("| method | coherent-reply shift | capability Δ (points) | capped: text projection shift | capped: "
          "below-band shift | capped: coherent-reply shift | capped: held-out SFT loss |")
    print("|---|---|---|---|---|---|---|")
    for rec in with_cap:
        rows = rec["runs"]
        print(f"| {setting(rec, plain_rec['steps'])} | {col(rows, 'coherent_shift')} | "
              f"{col(rows, 'capability_shift', 100, 1)} | "
              f"{col(rows, 'capped_text_projection_shift')} | {col(rows, 'capped_below_band_shift')} | "
              f"{col(rows, 'capped_coherent_shift')} | {col(rows, 'capped_heldout_sft_loss', 1, 3, '')} |")


if __name__ == "__main__":
    main()
