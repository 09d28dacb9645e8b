"""Does plain fine-tuning move a model along a trait direction? (issue 16: "a trait that fine-tuning really moves")

For each seed: fresh model → LoRA on an SFT set (`steerable.train`, method none unless --method) → on held-out
prompts, (a) the mean projection of the last prompt token's activation on the trait direction (the Persona
Vectors paper's fine-tuning-shift measure) before and after, and (b) the CAA A/B behaviour score (p(matching
letter) / (p(A) + p(B))) before and after, (c) the held-out SFT loss. The criterion: the mean projection shift
over seeds ≥ 3× its seed-to-seed standard deviation, and the behaviour score moves.

  python experiments/train_trait.py --vector syc.safetensors --layer 18 --seeds 0,1,2 \
      --out experiments/results/training/smollm2-135m-sycophancy-sft.json   (experiments/training.sh runs it)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from steerable.capture.features import prompt_features
from steerable.data.loaders import load_pairs
from steerable.data.sft import load_sft
from steerable.directions.artifact import load_directions
from steerable.evaluate.logits import ab_score
from steerable.fsutil import write_text_atomic
from steerable.models.load import load_model
from steerable.train import TrainConfig, train
from steerable.train.batches import collate, tokenise
from steerable.train.losses import task_loss


def heldout_loss(handle, sft, n: int, max_length: int, batch_size: int = 8) -> float:
    items = tokenise(handle, sft.examples[:n], max_length)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            b = collate(items[i:i + batch_size], list(range(i, i + len(items[i:i + batch_size]))),
                        handle.tokenizer.pad_token_id, handle.device)
            k = int((b.labels[:, 1:] != -100).sum())
            total += float(task_loss(handle.model(**b.inputs()).logits, b.labels)) * k
            count += k
    return total / count


def measure(handle, ds, layer: int, pairs, sft_test, n_loss: int, max_length: int) -> dict:
    feats = prompt_features(handle, [p.prompt for p in pairs], [layer], progress=False)[0]
    proj = feats @ ds.direction(layer).float()
    ab = ab_score(handle, pairs)
    return {"projection": float(proj.mean()), "projection_sd": float(proj.std()),
            "ab_score": statistics.fmean(ab), "ab_matching_rate": statistics.fmean(x > 0.5 for x in ab),
            "heldout_sft_loss": heldout_loss(handle, sft_test, n_loss, max_length)}


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--vector", required=True)
    ap.add_argument("--layer", type=int, help="layer to read (default: the file's best held-out AUROC)")
    ap.add_argument("--data", default="sycophancy-sft")
    ap.add_argument("--eval-pairs", default="caa-sycophancy:test")
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--method", default="none")
    ap.add_argument("--train-vector", help="direction file for the method (default --vector)")
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--layers", help="layers of the method's terms / plan (default: --layer)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--runs", default="runs/h16/trait")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    handle = load_model(args.model)
    ds = load_directions(args.vector, handle)
    layer = args.layer if args.layer is not None else ds.layers[int(torch.nan_to_num(ds.auroc, nan=-1).argmax())]
    pairs = load_pairs(args.eval_pairs)[:args.n_eval]
    sft, sft_test = load_sft(f"{args.data}:train"), load_sft(f"{args.data}:test")
    before = measure(handle, ds, layer, pairs, sft_test, args.n_eval, args.max_length)
    print("before", before, flush=True)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        h = load_model(args.model)
        vector = None if args.method == "none" else (args.train_vector or args.vector)
        config = TrainConfig(method=args.method, vector=vector,
                             layers=args.layers or str(layer), lam=args.lam, strength=args.strength,
                             steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                             seed=seed)
        out = Path(args.runs) / f"{args.data}-{args.method}-s{seed}"
        result = train(h, sft, config, out if not (out / "steering.json").exists() else None)
        after = measure(h, ds, layer, pairs, sft_test, args.n_eval, args.max_length)
        runs.append({"seed": seed, **after, "final_train_task_loss": result.log[-1]["task_loss"],
                     "train_seconds": result.record["seconds"],
                     "projection_shift": after["projection"] - before["projection"],
                     "ab_shift": after["ab_score"] - before["ab_score"]})
        print(runs[-1], flush=True)
    shifts = [r["projection_shift"] for r in runs]
    ab_shifts = [r["ab_shift"] for r in runs]
    summary = {"projection_shift_mean": statistics.fmean(shifts), "projection_shift_sd_over_seeds": sd(shifts),
               "shift_over_sd": statistics.fmean(shifts) / sd(shifts) if len(shifts) > 1 else None,
               "meets_3sd": len(shifts) > 1 and abs(statistics.fmean(shifts)) >= 3 * sd(shifts),
               "ab_shift_mean": statistics.fmean(ab_shifts), "ab_shift_sd_over_seeds": sd(ab_shifts),
               "base_projection_sd_over_prompts": before["projection_sd"]}
    record = {"model": args.model, "vector": args.vector, "layer": layer, "data": args.data, "method": args.method,
              "eval_pairs": args.eval_pairs, "n_eval": len(pairs), "steps": args.steps, "lr": args.lr,
              "batch_size": args.batch_size, "max_length": args.max_length, "lam": args.lam,
              "strength": args.strength, "before": before, "runs": runs, "summary": summary,
              "seconds": round(time.perf_counter() - t0, 1)}
    write_text_atomic(args.out, json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
