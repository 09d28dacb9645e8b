"""The method comparison table of docs/training.md from experiments/train_trait.py's outputs.

Reads MODEL-persona-sft.json (plain) and MODEL-persona-sft-METHOD.json; a method whose run has not finished is read
from its log's per-seed lines (runs/h16/logs/persona-METHOD.log), marked partial.

  python experiments/training_table.py --model smollm2-135m [--save PARTIAL.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
from pathlib import Path

T975 = {2: 12.706, 3: 4.303, 4: 3.182}


def ci(xs: list[float], digits: int = 2) -> str:
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return f"{m:+.{digits}f} (1 seed)"
    h = T975.get(len(xs), 1.96) * statistics.stdev(xs) / len(xs) ** 0.5
    return f"{m:+.{digits}f} [{m - h:+.{digits}f}, {m + h:+.{digits}f}]"


def runs_of(results: Path, logs: Path, model: str, method: str) -> tuple[list[dict], bool]:
    name = f"{model}-persona-sft" + ("" if method == "none" else f"-{method}")
    f = results / f"{name}.json"
    if f.exists():
        return json.loads(f.read_text())["runs"], False
    log = logs / f"persona-{method}.log"
    rows = [ast.literal_eval(line) for line in log.read_text().splitlines() if line.startswith("{'seed'")] \
        if log.exists() else []
    return rows, True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--results", default="experiments/results/training")
    ap.add_argument("--logs", default="runs/h16/logs")
    ap.add_argument("--methods", default="none,preventative,aux,caft,contrastive,actreg,combined")
    ap.add_argument("--save", help="write the per-seed rows of the partial (unfinished) methods to this JSON")
    args = ap.parse_args()
    saved: dict[str, list[dict]] = {}
    plain, _ = runs_of(Path(args.results), Path(args.logs), args.model, "none")
    plain_loss = statistics.fmean(r["heldout_sft_loss"] for r in plain)
    plain_shift = statistics.fmean(r["projection_shift"] for r in plain)
    print("| method | seeds | projection shift [95 % CI] | % of plain's | text projection shift | below-band shift "
          "| held-out SFT loss | within 5 % of plain's |")
    print("|---|---|---|---|---|---|---|---|")
    for m in args.methods.split(","):
        rows, partial = runs_of(Path(args.results), Path(args.logs), args.model, m)
        if not rows:
            continue
        if partial:
            saved[m] = rows
        shifts = [r["projection_shift"] for r in rows]
        loss = statistics.fmean(r["heldout_sft_loss"] for r in rows)
        gap = loss / plain_loss - 1
        print(f"| {m}{' (partial)' if partial else ''} | {','.join(str(r['seed']) for r in rows)} | {ci(shifts)} | "
              f"{100 * statistics.fmean(shifts) / plain_shift:.0f} % | "
              f"{ci([r['text_projection_shift'] for r in rows])} | {ci([r['below_band_shift'] for r in rows])} | "
              f"{loss:.3f} | {'yes' if abs(gap) <= 0.05 else 'no'} ({100 * gap:+.1f} %) |")
    if args.save:
        Path(args.save).write_text(json.dumps({"model": args.model, "partial": True, "runs": saved}, indent=1) + "\n")


if __name__ == "__main__":
    main()
