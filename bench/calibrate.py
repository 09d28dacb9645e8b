"""Capture throughput vs a bare batched forward pass of the same model and data, in one process.

Writes bench/results/calibrate.json: {"capture_tps", "forward_tps", "ratio", ...}. Target: ratio ≥ 0.9.
A/B runs are interleaved and medians taken, since this machine is shared and noisy.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads ruin timings

import argparse
import json
import statistics
import time

import torch

from steerable.capture.run import batch_examples, capture_stats, encode_examples
from steerable.data.loaders import contrastive_examples
from steerable.fsutil import write_text_atomic
from steerable.models.batch import position_ids
from steerable.models.load import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=40, help="pairs (2 examples each)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/calibrate.json")
    args = ap.parse_args()

    handle = load_model(args.model)
    examples = contrastive_examples(pairs="refusal-pairs", limit=args.n)
    batches = batch_examples(examples, args.batch_size)
    encoded = [encode_examples(handle, b.examples)[0] for b in batches]
    n_tokens = sum(int(e["attention_mask"].sum()) for e in encoded)

    @torch.inference_mode()
    def forward() -> None:
        for enc in encoded:
            handle.model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False)

    def capture(layers: list[int]) -> None:
        capture_stats(handle, examples, layers, position="response-mean", batch_size=args.batch_size,
                      progress=False)

    all_layers = list(range(handle.n_layers))
    half = list(range(handle.n_layers // 2))
    forward()  # warm-up
    capture(all_layers)
    times: dict[str, list[float]] = {"forward": [], "capture": [], "capture_half": []}
    for _ in range(args.rounds):
        for name, fn in (("forward", forward), ("capture", lambda: capture(all_layers)),
                         ("capture_half", lambda: capture(half))):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "capture_tps": n_tokens / med["capture"],
        "forward_tps": n_tokens / med["forward"],
        "ratio": med["forward"] / med["capture"],
        "capture_first_half_tps": n_tokens / med["capture_half"],
        "ratio_first_half": med["forward"] / med["capture_half"],
        "model": args.model, "n_examples": len(examples), "n_tokens": n_tokens, "batch_size": args.batch_size,
        "position": "response-mean", "layers_all": len(all_layers), "layers_half": len(half),
        "rounds": args.rounds, "times_s": times, "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "times_s"}, indent=2))


if __name__ == "__main__":
    main()
