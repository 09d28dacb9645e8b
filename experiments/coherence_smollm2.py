"""Coherence across the knob of rotate (θ), SAS (θ) and add (α) on smollm2-135m, all configurations in
one batched generate call with a plan per row. Writes experiments/results/coherence_smollm2.json.

    steerable calibrate --model smollm2-135m --pairs refusal-pairs --position response-mean \
        --out runs/smollm2-refusal-pairs.safetensors
    python experiments/coherence_smollm2.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics

from steerable.data.loaders import load_prompts
from steerable.evaluate.coherence import compression_ratio, language_consistency, rep_n
from steerable.evaluate.refusal import is_refusal
from steerable.fsutil import write_text_atomic
from steerable.generation import generate
from steerable.models.load import load_model
from steerable.steering.plan import build_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--vector", default="runs/smollm2-refusal-pairs.safetensors")
    ap.add_argument("--angles", default="0,45,90,135,180,225,270,315")
    ap.add_argument("--strengths", default="0,0.5,1,2,4")
    ap.add_argument("--add-layers", default="9-11")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--out", default="experiments/results/coherence_smollm2.json")
    args = ap.parse_args()

    handle = load_model(args.model)
    prompts = load_prompts("benign:test")[: args.n]
    configs: dict[str, dict | None] = {"unsteered": None}
    for a in map(float, args.angles.split(",")):
        configs[f"rotate θ={a:g}"] = {"vector": args.vector, "method": "rotate", "angle": a, "layers": "discriminative"}
        configs[f"angular θ={a:g}"] = {"vector": args.vector, "method": "angular", "angle": a,
                                       "layers": "discriminative"}
    for s in map(float, args.strengths.split(",")):
        configs[f"add α={s:g}"] = {"vector": args.vector, "method": "add", "strength": s, "layers": args.add_layers}
    disc = build_plan(configs["rotate θ=0"], handle).interventions[0].layers
    rows_prompts = [p for _ in configs for p in prompts]
    rows_plans = [plan for plan in configs.values() for _ in prompts]
    texts = generate(handle, rows_prompts, plans=rows_plans, max_new_tokens=args.tokens, batch_size=32,
                     progress=True)
    out = {"model": args.model, "vector": args.vector, "discriminative_layers": list(disc), "n": len(prompts),
           "tokens": args.tokens, "prompts": "benign:test", "results": []}
    for i, (name, plan) in enumerate(configs.items()):
        chunk = texts[i * len(prompts) : (i + 1) * len(prompts)]
        r = {"config": name, "plan": plan,
             "language_consistency": statistics.mean(map(language_consistency, chunk)),
             "rep4": statistics.mean(rep_n(t, 4) for t in chunk),
             "compression_ratio": statistics.mean(map(compression_ratio, chunk)),
             "refusal_rate": sum(map(is_refusal, chunk)) / len(chunk), "example": chunk[0]}
        out["results"].append(r)
        print(f"{name:>16}  lang {r['language_consistency']:.3f}  rep4 {r['rep4']:.3f}  "
              f"zlib {r['compression_ratio']:.3f}  refusal {r['refusal_rate']:.2f}  | {chunk[0][:60]!r}")
    write_text_atomic(args.out, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
