"""Markdown tables for docs/results.md, straight from sweep result files (no number typed by hand).

    python experiments/results_table.py experiments/results/qwen_methods.jsonl [--mmlu FILE_mmlu.json] [--best]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from steerable.sweeps.records import RateSummary, baseline_of, ppl_violations, read_records
from steerable.sweeps.select import median_ppl

sys.path.insert(0, str(Path(__file__).parent))
from qwen_methods_mmlu import operating_points


def _pct(r: RateSummary) -> str:
    return f"{r.rate:.0%} [{r.ci95[0]:.0%}, {r.ci95[1]:.0%}]"


def _change(change: dict[str, Any] | None) -> str:
    return f"{change['change']:+.1%} [{change['ci95'][0]:+.0%}, {change['ci95'][1]:+.0%}]" if change else "—"


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
    if base.benign is None:
        raise SystemExit(f"{args.results}: the table needs a sweep with benign prompts")
    mmlu: dict[str, dict[str, Any]] = {}  # the _mmlu.json's changes (its JSON as written), by line key
    if args.mmlu and Path(args.mmlu).exists():
        m = json.loads(Path(args.mmlu).read_text())
        mmlu = {c["key"]: c["change"] for c in m["configs"]}
        mmlu[base.key] = {"change": 0.0, "ci95": [0.0, 0.0], "n": m["items"]}
    rows = records
    if args.best:
        rows = [base, *operating_points(records)]
    name = base.behaviour.name
    head = ["configuration", f"{name} (n={base.behaviour.n})",
            f"benign refused (n={base.benign.refusal.n})", "KL", "median ppl", f"ppl > {threshold:.1f}",
            "language", "compression", "rep-4"]
    # coherent compliance (methods.md §8): on the steered prompts, neither refused nor incoherent; absent from
    # lines written before it existed
    coherent = all(r.prompts.coherent_compliance is not None for r in rows)
    if coherent:
        head.insert(2, f"coherent compliance (n={base.behaviour.n})")
    if mmlu or any(r.capability for r in records):
        head.append("capability Δ")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        benign = r.benign
        if benign is None:
            raise SystemExit(f"{args.results}: {r.label} has no benign prompts")
        cells = [r.label.replace("layers=", ""), _pct(r.behaviour),
                 *([_pct(r.prompts.coherent_compliance)] if coherent and r.prompts.coherent_compliance else []),
                 _pct(benign.refusal),
                 f"{r.kl:.3f}", f"{median_ppl(r):.2f}", str(ppl_violations(r, threshold)),
                 f"{r.prompts.language_consistency:.3f}", f"{r.prompts.compression_ratio:.3f}",
                 f"{r.prompts.rep4:.3f}"]
        if len(head) > len(cells):
            own = r.capability.change if r.capability is not None else None
            cells.append(_change(mmlu.get(r.key) or (own.to_json() if own else None)))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
