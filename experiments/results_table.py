"""Markdown tables for docs/results.md, straight from sweep result files (no number typed by hand).

    python experiments/results_table.py experiments/results/qwen_methods.jsonl [--mmlu FILE_mmlu.json] [--best]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from steerable.sweeps.records import baseline_of, ppl_violations, read_records
from steerable.sweeps.select import median_ppl

sys.path.insert(0, str(Path(__file__).parent))
from qwen_methods_mmlu import operating_points


def _pct(r: dict) -> str:
    return f"{r['rate']:.0%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--mmlu", help="the _mmlu.json of experiments/qwen_methods_mmlu.py")
    ap.add_argument("--best", action="store_true",
                    help="only each (method, layers) group's operating setting (see qwen_methods_mmlu.py)")
    args = ap.parse_args()
    records = read_records(args.results, repair=False)
    base = baseline_of(records)
    threshold = 2 * median_ppl(base)
    mmlu = {}
    if args.mmlu and Path(args.mmlu).exists():
        m = json.loads(Path(args.mmlu).read_text())
        mmlu = {c["key"]: c["change"] for c in m["configs"]}
        mmlu[base["key"]] = {"change": 0.0, "ci95": [0.0, 0.0], "n": m["items"]}
    rows = records
    if args.best:
        rows = [base, *operating_points(records)]
    name = base["behaviour"]["name"]
    head = ["configuration", f"{name} (n={base['behaviour']['n']})",
            f"benign refused (n={base['benign']['refusal']['n']})", "KL", "median ppl", f"ppl > {threshold:.1f}",
            "language", "compression", "rep-4"]
    if mmlu or any(r.get("capability") for r in records):
        head.append("MMLU Δ")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["label"].replace("layers=", ""), _pct(r["behaviour"]), _pct(r["benign"]["refusal"]),
                 f"{r['kl']:.3f}", f"{median_ppl(r):.2f}", str(ppl_violations(r, threshold)),
                 f"{r['prompts']['language_consistency']:.3f}", f"{r['prompts']['compression_ratio']:.3f}",
                 f"{r['prompts']['rep4']:.3f}"]
        if len(head) > len(cells):
            ch = mmlu.get(r["key"]) or (r.get("capability") or {}).get("change")
            cells.append(f"{ch['change']:+.1%} [{ch['ci95'][0]:+.0%}, {ch['ci95'][1]:+.0%}]" if ch else "—")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
