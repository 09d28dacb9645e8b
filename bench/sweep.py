"""A sweep of 8 strengths over 32 prompts: all configurations in shared batches vs one after another.

Writes bench/results/sweep.json with {"batched_s", "sequential_s", "ratio"} (target: ratio ≤ 0.4), both
arms timed in this process, interleaved (ABBA… over --rounds rounds, medians). Both arms run the same
`run_sweep` code with the same metrics; only the grouping differs:
- batched: every configuration's rows (8 × 32) in one group, generated in batches of --batch-size rows;
- sequential: one configuration per group, each generated in batches of 8 (the CLI's `generate` default),
  as a user running `steerable generate` once per configuration would.
Also recorded: "sequential_full_batch_s", one configuration at a time with all its 32 prompts in one batch
(the best a one-at-a-time loop can do), timed once, so the gain from batching alone is visible too.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads ruin timings

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from steerable.data.loaders import contrastive_examples, load_prompt_rows
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.fsutil import write_text_atomic
from steerable.models.load import load_model
from steerable.sweeps.grid import Config
from steerable.sweeps.run import SweepSpec, run_sweep

STRENGTHS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def timed(handle, spec: SweepSpec) -> float:
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        run_sweep(handle, spec, Path(d) / "r.jsonl", progress=False)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default="bench/results/sweep.json")
    args = ap.parse_args()

    handle = load_model(args.model)
    with tempfile.TemporaryDirectory() as d:
        vec = str(Path(d) / "v.safetensors")
        examples = contrastive_examples(positive="advbench", negative="benign", limit=48)
        save_directions(calibrate(handle, examples, layers=range(8, 13), progress=False), vec)
        configs = [Config("add", "9-11", s) for s in STRENGTHS]
        prompts = load_prompt_rows("advbench:test")[: args.prompts]
        common = dict(vector=vec, configs=configs, prompts=prompts, max_new_tokens=args.max_new_tokens, examples=0)
        batched = SweepSpec(**common, batch_size=args.batch_size, group_rows=len(configs) * len(prompts))
        sequential = SweepSpec(**common, batch_size=8, group_rows=1)
        full = SweepSpec(**common, batch_size=len(prompts), group_rows=1)
        times: dict[str, list[float]] = {"batched": [], "sequential": []}
        for r in range(args.rounds):
            order = ("batched", "sequential") if r % 2 == 0 else ("sequential", "batched")
            for arm in order:
                times[arm].append(timed(handle, batched if arm == "batched" else sequential))
                print(f"round {r}: {arm} {times[arm][-1]:.1f} s", flush=True)
        full_s = timed(handle, full)
        print(f"sequential, one batch per configuration: {full_s:.1f} s", flush=True)
    b, s = statistics.median(times["batched"]), statistics.median(times["sequential"])
    result = {"batched_s": round(b, 2), "sequential_s": round(s, 2), "ratio": round(b / s, 3), "target": 0.4,
              "sequential_full_batch_s": round(full_s, 2), "ratio_vs_full_batch": round(b / full_s, 3),
              "rounds": times, "configs": len(configs), "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "batched_batch_size": args.batch_size,
              "sequential_batch_size": 8, "model": args.model, "threads": torch.get_num_threads()}
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("batched_s", "sequential_s", "ratio", "ratio_vs_full_batch")}))


if __name__ == "__main__":
    main()
