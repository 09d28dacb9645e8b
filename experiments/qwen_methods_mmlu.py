"""MMLU change of each method's best setting in a sweep (docs/results.md), one batched pass.

MMLU costs more forward passes than the sweep itself on two CPU cores, so it runs only on the
configuration each (method, layer choice) would be operated at: `operating_points`, the tune budget
criterion within the group — the highest success rate whose median completion perplexity is at most
twice the unsteered median (`--max-ppl-increase` = the unsteered median).

    python experiments/qwen_methods_mmlu.py experiments/results/qwen_methods.jsonl
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import json
from pathlib import Path

from steerable.errors import SteerableError
from steerable.evaluate.capability import DEFAULT_FORMAT, load_mmlu, mc_correct, paired_change, stratified
from steerable.evaluate.refusal import rate
from steerable.fsutil import write_text_atomic
from steerable.models.load import load_model
from steerable.sweeps.records import SweepRecord, baseline_of, read_records
from steerable.sweeps.select import Budget, median_ppl, select


def operating_points(records: list[SweepRecord]) -> list[SweepRecord]:
    """Per (method, layer choice), the most successful setting whose median perplexity is at most twice
    the unsteered median; groups where none qualifies are left out."""
    base = baseline_of(records)
    groups: dict[tuple[str, str], list[SweepRecord]] = {}
    for r in records:
        if not r.is_baseline:
            groups.setdefault((r.config.method, str(r.config.layers)), []).append(r)
    out = []
    for rs in groups.values():
        with contextlib.suppress(SteerableError):
            out.append(select([base, *rs], "budget", Budget(max_ppl_increase=median_ppl(base))).record)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--per-subject", type=int, default=1)
    ap.add_argument("--out", help="default: RESULTS with suffix _mmlu.json")
    args = ap.parse_args()
    records = read_records(args.results, repair=False)
    base = baseline_of(records)
    best = operating_points(records)
    handle = load_model(base.sweep.model)
    items = stratified(load_mmlu(), args.per_subject)
    plans = [None, *(r.plan for r in best)]
    correct = mc_correct(handle, items * len(plans), plans=[p for p in plans for _ in items], batch_size=16)
    n = len(items)
    base_ok = correct[:n]
    out = {"model": base.sweep.model, "items": n, "per_subject": args.per_subject, "format": DEFAULT_FORMAT,
           "rule": "budget: median ppl ≤ 2 × unsteered median", "unsteered": rate(base_ok).to_json(), "configs": []}
    for k, r in enumerate(best, 1):
        ok = correct[k * n : (k + 1) * n]
        out["configs"].append({"label": r.label, "key": r.key, "plan": r.plan,
                               "behaviour": r.behaviour.to_json(), "accuracy": rate(ok).to_json(),
                               "change": paired_change(ok, base_ok).to_json()})
        print(f"{r.label:>45}: MMLU {rate(ok)}  change {paired_change(ok, base_ok)}")
    path = args.out or str(Path(args.results).with_suffix("")) + "_mmlu.json"
    write_text_atomic(path, json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
