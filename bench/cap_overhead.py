"""Capping overhead on the three built-in models, and the cost of monitoring drift while generating.

Per model: a floor+ceiling cap on the Assistant Axis paper's ~15 % of layers and on every layer, at batch 1
and 8, each as (a) the time the steering hooks take per decode step, called as a forward pass calls them
("hook_us_per_step", and "hook_share" = that over the unsteered step), and (b) the end-to-end greedy decode
throughput ratio steered / unsteered from interleaved ABBA rounds (median of per-round ratios). The entry
"monitor" is the same A/B for an AxisMonitor reading one layer during generation. The capped direction is a
quickly calibrated one: the arithmetic of capping does not depend on which unit vector it caps along.

Writes bench/results/cap_overhead.json. Target: ratio ≥ 0.99 and hook_share < 1 %.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads ruin timings

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from overhead import ab_medians, hook_cost_us

from steerable.data.loaders import contrastive_examples, load_prompts
from steerable.directions.artifact import layer_ranges, save_directions
from steerable.directions.axis import default_cap_layers
from steerable.directions.calibrate import calibrate
from steerable.evaluate.monitor import AxisMonitor
from steerable.fsutil import write_text_atomic
from steerable.models.load import load_model
from steerable.steering.hooks import steer


def measure(model: str, work: Path, rounds: int, new_tokens: int, batches: list[int]) -> list[dict]:
    handle = load_model(model)
    vec = str(work / f"{model}-cap.safetensors")
    ds = calibrate(handle, contrastive_examples(pairs="refusal-pairs", limit=16), position="last", progress=False)
    save_directions(ds, vec)
    prompts = load_prompts("benign:test")
    tok = handle.tokenizer
    kw = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
          "pad_token_id": tok.pad_token_id, "temperature": None, "top_p": None, "top_k": None}
    cap_layers = layer_ranges(default_cap_layers(handle.n_layers))
    configs = {f"cap {cap_layers}": cap_layers, f"cap all ({handle.n_layers})": f"0-{handle.n_layers - 1}"}
    mid = handle.n_layers // 2
    out = []
    for batch in batches:
        enc = handle.encode([handle.render(p) for p in prompts[:batch]])

        @torch.inference_mode()
        def run(ctx, enc=enc, batch=batch) -> float:
            with ctx() as session:
                if session is not None and hasattr(session, "begin"):
                    session.begin(int(enc["input_ids"].shape[1]))
                t = time.perf_counter()
                handle.model.generate(**enc, **kw)
                return batch * new_tokens / (time.perf_counter() - t)

        def ab(steered, run=run) -> tuple[float, float, float]:
            return ab_medians(run, steered, contextlib.nullcontext, rounds)

        for name, layers in configs.items():
            plan = {"vector": vec, "method": "cap", "cap_floor": "p25", "cap_ceiling": "p95", "layers": layers}
            s, u, ratio = ab(lambda p=plan: steer(handle, p))
            us = hook_cost_us(handle, plan, batch=batch)
            out.append({"model": model, "config": name, "layers": layers, "batch": batch,
                        "steered_tps": round(s, 2), "unsteered_tps": round(u, 2), "ratio": round(ratio, 4),
                        "hook_us_per_step": round(us, 1), "hook_share": round(us * 1e-6 * u / batch, 5)})
            print(out[-1])
        monitor = AxisMonitor(ds.direction(mid), mid)
        s, u, ratio = ab(lambda m=monitor, b=batch: m.watch(handle, list(range(b))))
        out.append({"model": model, "config": f"monitor layer {mid}", "layers": str(mid), "batch": batch,
                    "steered_tps": round(s, 2), "unsteered_tps": round(u, 2), "ratio": round(ratio, 4)})
        print(out[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-0.5b")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--out", default="bench/results/cap_overhead.json")
    ap.add_argument("--work", default="bench/results/.work")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models.split(","):
        results += measure(model, work, args.rounds, args.new_tokens, [int(b) for b in args.batches.split(",")])
    write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
