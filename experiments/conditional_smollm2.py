"""On smollm2-135m (which complies with almost everything): a conditional plan — condition: harmful vs
benign prompts, behaviour: add the refusal-pairs direction — vs plain addition, on held-out prompts.

Writes experiments/results/conditional_smollm2.json.

    steerable calibrate --model smollm2-135m --positive advbench:train --negative benign:train \
        --position last --out runs/smollm2-harmful.safetensors
    steerable calibrate --model smollm2-135m --pairs refusal-pairs --position response-mean \
        --out runs/smollm2-refusal-pairs.safetensors
    python experiments/conditional_smollm2.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json

from steerable.data.loaders import load_prompts
from steerable.evaluate.cast_hits import cast_hits, hit_rates
from steerable.evaluate.refusal import refusal_rate
from steerable.fsutil import write_text_atomic
from steerable.generation import generate
from steerable.models.load import load_model
from steerable.steering.plan import build_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--condition", default="runs/smollm2-harmful.safetensors")
    ap.add_argument("--behaviour", default="runs/smollm2-refusal-pairs.safetensors")
    ap.add_argument("--layers", default="9-11")
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default="experiments/results/conditional_smollm2.json")
    args = ap.parse_args()

    handle = load_model(args.model)
    harmful = load_prompts("advbench:test")[: args.n_eval]
    benign = load_prompts("benign:test")[: args.n_eval]
    add = {"vector": args.behaviour, "method": "add", "strength": args.strength, "layers": args.layers}
    cond = {"method": "conditional", "vector": args.condition, "layer": "auto", "threshold": "auto", "then": add}
    checked = build_plan(cond, handle)
    condition = checked.interventions[0].conditions[0]
    hits = hit_rates(cast_hits(handle, cond, harmful), cast_hits(handle, cond, benign))
    out = {"model": args.model, "plan": checked.to_json(), "condition": condition.report(),
           "condition_on_test_prompts": hits, "n_eval": len(harmful), "tokens": args.tokens, "rates": {}}
    print(f"condition: {condition.report()}\non held-out prompts: {hits}")
    for name, plan in (("unsteered", None), ("add", add), ("conditional", cond)):
        h = generate(handle, harmful, plan, max_new_tokens=args.tokens, batch_size=16, progress=True)
        b = generate(handle, benign, plan, max_new_tokens=args.tokens, batch_size=16, progress=True)
        out["rates"][name] = {"harmful_refusal": refusal_rate(h).to_json(), "benign_refusal": refusal_rate(b).to_json()}
        print(f"{name:>12}: harmful refusal {refusal_rate(h)}  benign refusal {refusal_rate(b)}")
    write_text_atomic(args.out, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
