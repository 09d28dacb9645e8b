"""Conditions that generalise (issue 14): a condition fitted on advbench vs benign (the README's recipe) against one
fitted on every harmful and benign source with leave-one-source-out selection, both measured on the held-out
(test) split of every source.

    .venv/bin/python experiments/condition_sources.py --out experiments/results/condition_sources.json
    (--rule margin: cast_calibration's max-margin threshold at the recall target instead of the FPR budget)
"""

from __future__ import annotations

import argparse
import json
import time

from steerable.data.condition_sources import BENIGN_SOURCES, HARMFUL_SOURCES, condition_source
from steerable.data.loaders import contrastive_examples
from steerable.directions.calibrate import calibrate
from steerable.directions.multi_source import Source, calibrate_condition
from steerable.evaluate.cast_hits import cast_hits
from steerable.fsutil import write_text_atomic
from steerable.models.load import load_model
from steerable.steering.plan import build_plan


def fires(handle, vector, prompts: list) -> float:
    plan = build_plan({"method": "conditional", "vector": vector, "then": {"vector": vector, "layers": [0]}}, handle)
    hits = cast_hits(handle, plan, prompts)
    return sum(hits) / len(hits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recall", type=float, default=0.9)
    ap.add_argument("--max-fpr", type=float, default=0.1)
    ap.add_argument("--rule", default="fpr", choices=["fpr", "margin"])
    ap.add_argument("--out", default="experiments/results/condition_sources.json")
    args = ap.parse_args()
    t0 = time.time()
    handle = load_model(args.model)
    names = [*HARMFUL_SOURCES, *BENIGN_SOURCES]
    test = {n: condition_source(f"{n}:test")[1] for n in names}
    # the README's recipe: advbench vs benign, position last, CAST score, layer/threshold auto
    single = calibrate(handle, contrastive_examples(positive="advbench", negative="benign"), position="last",
                       progress=False)
    multi = calibrate_condition(handle, [Source(n, int(n in HARMFUL_SOURCES), condition_source(f"{n}:train")[1])
                                         for n in names], recall=args.recall, max_fpr=args.max_fpr, rule=args.rule,
                                progress=False)
    cands = multi.meta["condition"]["candidates"]
    best_tradeoffs = sorted(cands, key=lambda r: -r["balanced"])[:5]
    out = {"model": args.model, "recall_target": args.recall, "max_fpr": args.max_fpr,
           "test_sizes": {n: len(p) for n, p in test.items()},
           "single_source": {"fitted_on": "advbench:train vs benign:train",
                             "fires_on_test": {n: fires(handle, single, p) for n, p in test.items()}},
           "multi_source": {"fitted_on": [f"{n}:train" for n in names],
                            "choice": {k: v for k, v in multi.meta["condition"].items() if k != "candidates"},
                            "fires_on_test": {n: fires(handle, multi, p) for n, p in test.items()},
                            "best_balanced_candidates": best_tradeoffs,
                            "fpr_ok_candidates": sorted([r for r in cands if r["max_fpr"] <= args.max_fpr],
                                                        key=lambda r: -r["min_recall"])[:5]},
           "seconds": round(time.time() - t0)}
    write_text_atomic(args.out, json.dumps(out, indent=2))
    for key in ("single_source", "multi_source"):
        print(key, {n: round(v, 3) for n, v in out[key]["fires_on_test"].items()})
    print("choice", out["multi_source"]["choice"]["layer"], out["multi_source"]["choice"]["score"],
          "loso", out["multi_source"]["choice"]["loso"])


if __name__ == "__main__":
    main()
