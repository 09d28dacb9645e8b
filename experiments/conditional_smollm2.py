"""On smollm2-135m (which complies with almost everything): a conditional plan — condition: harmful vs benign
prompts, fitted on every shipped source and chosen by leaving each source out (`steerable calibrate-condition`),
behaviour: add the refusal-pairs direction — vs plain addition, on the held-out (test) prompts of every harmful
and benign source: the condition's firing rate, the refusal rate (95 % bootstrap CI) and the coherent-compliance
rate (non-refusals that pass the coherence checks, evaluate/coherence.py) per source.

    steerable calibrate-condition --model smollm2-135m --out runs/smollm2-condition.safetensors
    steerable calibrate --model smollm2-135m --pairs refusal-pairs --position response-mean \\
        --out runs/smollm2-refusal-pairs.safetensors
    nice -n 10 python experiments/conditional_smollm2.py --out experiments/results/conditional_smollm2_sources.json

`--condition runs/smollm2-harmful.safetensors` (calibrated on advbench vs benign, the earlier recipe) measures the
single-source condition the same way.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time

import torch

from steerable.data.condition_sources import BENIGN_SOURCES, HARMFUL_SOURCES, condition_source
from steerable.evaluate.cast_hits import cast_hits
from steerable.evaluate.coherence import CoherenceBounds, coherent_compliance
from steerable.evaluate.logits import perplexity
from steerable.evaluate.refusal import rate, refusal_rate
from steerable.fsutil import write_text_atomic
from steerable.generation import generate
from steerable.models.load import load_model
from steerable.steering.plan import build_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--condition", default="runs/smollm2-condition.safetensors")
    ap.add_argument("--behaviour", default="runs/smollm2-refusal-pairs.safetensors")
    ap.add_argument("--layers", default="9-11")
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--n-eval", type=int, default=60, help="at most this many test prompts per source")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default="experiments/results/conditional_smollm2_sources.json")
    args = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    handle = load_model(args.model)
    names = [*HARMFUL_SOURCES, *BENIGN_SOURCES]
    prompts = {n: condition_source(f"{n}:test")[1][: args.n_eval] for n in names}
    add = {"vector": args.behaviour, "method": "add", "strength": args.strength, "layers": args.layers}
    cond = {"method": "conditional", "vector": args.condition, "layer": "auto", "threshold": "auto", "then": add}
    checked = build_plan(cond, handle)
    condition = checked.interventions[0].conditions[0]
    fired = {n: cast_hits(handle, cond, p) for n, p in prompts.items()}
    out = {"model": args.model, "plan": checked.to_json(), "condition": condition.report(),
           "n_per_source": {n: len(p) for n, p in prompts.items()}, "tokens": args.tokens,
           "condition_fires_on_test": {n: rate(f).to_json() for n, f in fired.items()},
           "coherence_bounds": CoherenceBounds().to_json(), "rates": {}}
    print("condition fires on test:", {n: round(sum(f) / len(f), 3) for n, f in fired.items()}, flush=True)
    for name, plan in (("unsteered", None), ("add", add), ("conditional", cond)):
        per = {}
        for src, p in prompts.items():
            texts = generate(handle, p, plan, max_new_tokens=args.tokens, batch_size=16)
            ppl = perplexity(handle, p, texts, batch_size=16)  # under the unsteered model
            ok = coherent_compliance(texts, ppl)
            per[src] = {"refusal": refusal_rate(texts).to_json(),
                        "coherent_compliance": rate(ok).to_json(),
                        "examples": texts[:2]}
            print(f"{name:>12} {src:>16}: refusal {refusal_rate(texts)}  coherent compliance "
                  f"{sum(ok) / len(ok):.0%}", flush=True)
        out["rates"][name] = per
    out["seconds"] = round(time.time() - t0)
    write_text_atomic(args.out, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
