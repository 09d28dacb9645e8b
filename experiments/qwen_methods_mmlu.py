"""MMLU change of each method's best setting in a sweep (docs/results.md), one batched pass.

MMLU costs more forward passes than the sweep itself on two CPU cores, so it runs only on the
configuration each (method, layer choice) would be operated at. That configuration is the seed-003
criterion applied within the group: the highest success rate with no completion above twice the
unsteered median perplexity, or the highest success rate when every setting has violations.

    python experiments/qwen_methods_mmlu.py experiments/results/qwen_methods.jsonl
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from steerable.evaluate.capability import load_mmlu, mc_correct, paired_change, stratified  # noqa: E402
from steerable.evaluate.refusal import rate  # noqa: E402
from steerable.fsutil import write_text_atomic  # noqa: E402
from steerable.models.load import load_model  # noqa: E402
from steerable.sweeps.records import baseline_of, ppl_violations, read_records  # noqa: E402
from steerable.sweeps.select import median_ppl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--per-subject", type=int, default=1)
    ap.add_argument("--out", help="default: RESULTS with suffix _mmlu.json")
    args = ap.parse_args()
    records = read_records(args.results, repair=False)
    base = baseline_of(records)
    threshold = 2 * median_ppl(base)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r["config"]["method"] != "none":
            groups.setdefault((r["config"]["method"], str(r["config"].get("layers"))), []).append(r)
    best = []
    for rs in groups.values():
        clean = [r for r in rs if ppl_violations(r, threshold) == 0] or rs
        best.append(max(clean, key=lambda r: r["behaviour"]["rate"]))
    handle = load_model(base["sweep"]["model"])
    items = stratified(load_mmlu(), args.per_subject)
    plans = [None, *(r["plan"] for r in best)]
    correct = mc_correct(handle, items * len(plans), plans=[p for p in plans for _ in items], batch_size=16)
    n = len(items)
    base_ok = correct[:n]
    out = {"model": base["sweep"]["model"], "items": n, "per_subject": args.per_subject,
           "ppl_threshold": threshold, "unsteered": rate(base_ok).to_json(), "configs": []}
    for k, r in enumerate(best, 1):
        ok = correct[k * n : (k + 1) * n]
        out["configs"].append({"label": r["label"], "key": r["key"], "plan": r["plan"],
                               "behaviour": r["behaviour"], "accuracy": rate(ok).to_json(),
                               "change": paired_change(ok, base_ok).to_json()})
        print(f"{r['label']:>45}: MMLU {rate(ok)}  change {paired_change(ok, base_ok)}")
    path = args.out or str(Path(args.results).with_suffix("")) + "_mmlu.json"
    write_text_atomic(path, json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
