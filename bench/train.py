"""What training-time steering costs per LoRA step on smollm2-135m (issue 16's speed target).

Every method trains the same steps on the same batches (same seed) from a fresh copy of the model; the methods
run interleaved, in a rotated order each round, and each round's step times (median over the steps after the
first) are divided by the plain-LoRA run's of the same round. Reported: the median of those per-round ratios,
with their range. The contrastive term's frozen-model pass runs once before training (its projections are
cached per example); its time is reported apart, as a share of the run's plain training time.

Targets: aux, actreg, contrastive (and combined) ≤ 1.10; preventative and caft ≤ 1.02.
Writes bench/results/train.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads ruin timings

import argparse
import copy
import json
import statistics
import time

import torch

from steerable.data.loaders import contrastive_examples
from steerable.data.sft import load_sft
from steerable.directions.calibrate import calibrate
from steerable.fsutil import write_text_atomic
from steerable.models.load import load_model
from steerable.train import TrainConfig, train
from steerable.train.artifact import versions

METHODS = ("none", "aux", "actreg", "contrastive", "combined", "preventative", "caft")
TARGET = {"aux": 1.10, "actreg": 1.10, "contrastive": 1.10, "combined": 1.10, "preventative": 1.02, "caft": 1.02}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="sycophancy-sft:train")
    ap.add_argument("--layers", default="9-14")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="per run; the first is dropped as warm-up")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="bench/results/train.json")
    args = ap.parse_args()
    t_start = time.perf_counter()
    base = load_model(args.model)
    # the direction's quality does not change what a step costs: a quickly calibrated one will do
    ds = calibrate(base, contrastive_examples(pairs="refusal-pairs", limit=16), position="last", progress=False)
    sft = load_sft(args.data)
    times: dict[str, list[list[float]]] = {m: [] for m in METHODS}
    base_pass: list[float] = []
    losses: dict[str, float] = {}
    for r in range(args.rounds):
        order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
        for method in order:
            handle = copy.deepcopy(base)
            config = TrainConfig(method=method, vector=None if method == "none" else ds, layers=args.layers,
                                 lam=0.1, strength=1.0, steps=args.steps, batch_size=args.batch_size,
                                 max_length=args.max_length, seed=0)
            result = train(handle, sft, config)
            times[method].append([line["seconds"] for line in result.log[1:]])
            losses[method] = result.log[-1]["task_loss"]
            if method == "contrastive":
                base_pass.append(result.record["base_pass_seconds"])
            print(f"round {r} {method}: median step {statistics.median(times[method][-1]):.3f} s", flush=True)
            del handle, result
    med = {m: [statistics.median(t) for t in times[m]] for m in METHODS}
    rows = []
    for m in METHODS[1:]:
        ratios = [a / b for a, b in zip(med[m], med["none"], strict=True)]
        ratio = statistics.median(ratios)
        rows.append({"method": m, "ratio": round(ratio, 4), "ratios": [round(x, 4) for x in ratios],
                     "median_step_s": round(statistics.median(med[m]), 4), "target": TARGET[m],
                     "meets_target": ratio <= TARGET[m], "final_task_loss": round(losses[m], 4)})
    plain_run = statistics.median(med["none"]) * args.steps
    out = {
        "model": args.model, "data": args.data, "layers": args.layers, "rounds": args.rounds,
        "steps_per_run": args.steps, "timed_steps_per_run": args.steps - 1, "batch_size": args.batch_size,
        "max_length": args.max_length, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "plain_step_s": round(statistics.median(med["none"]), 4), "methods": rows,
        "contrastive_base_pass": {"seconds": [round(x, 3) for x in base_pass],
                                  "share_of_plain_run": round(statistics.median(base_pass) / plain_run, 4),
                                  "note": f"one pass over the {args.steps * args.batch_size} examples of the run "
                                          "(adapter disabled, stopped after the last layer), before training"},
        "versions": versions(), "seconds": round(time.perf_counter() - t_start, 1),
    }
    write_text_atomic(args.out, json.dumps(out, indent=2) + "\n")
    print(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
