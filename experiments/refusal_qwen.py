"""On qwen2.5-0.5b (which refuses harmful requests): does ablating the refusal direction, or rotating it away
on the discriminative layers, lower the refusal rate on held-out advbench prompts?

The direction layer (ablate) and the angle (rotate) are chosen on *training* prompts, then measured on
the held-out test split. Writes experiments/results/refusal_qwen.json.

    python experiments/qwen_refusal_labels.py        # refused-harmful vs answered-benign training prompts
    steerable calibrate --model qwen2.5-0.5b --positive runs/qwen-refused.jsonl \
        --negative runs/qwen-complied.jsonl --position last --out runs/qwen-refusal-behav.safetensors
    python experiments/refusal_qwen.py --vector runs/qwen-refusal-behav.safetensors

(An advbench-vs-benign direction, `--positive advbench:train --negative benign:train`, barely moves this
model either way: see docs/interventions.md.)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
from typing import Any

from steerable.data.loaders import load_prompts
from steerable.directions.artifact import load_directions
from steerable.evaluate.refusal import refusal_rate
from steerable.fsutil import write_text_atomic
from steerable.generation import generate
from steerable.models.load import load_model
from steerable.steering.plan import build_plan


def pick(handle: Any, prompts: list[str], candidates: dict[str, Any], tokens: int) -> tuple[str, dict[str, float]]:
    """The candidate plan with the lowest refusal rate on `prompts` (ties: the first)."""
    scores = {}
    for name, plan in candidates.items():
        scores[name] = refusal_rate(generate(handle, prompts, plan, max_new_tokens=tokens, batch_size=16)).value
    return min(scores, key=lambda k: scores[k]), scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--vector", required=True)
    ap.add_argument("--n-select", type=int, default=24)
    ap.add_argument("--n-eval", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default="experiments/results/refusal_qwen.json")
    args = ap.parse_args()

    handle = load_model(args.model)
    ds = load_directions(args.vector, handle)
    train = load_prompts("advbench:train")[120 : 120 + args.n_select]  # [:120] built the direction
    test = load_prompts("advbench:test")[: args.n_eval]
    benign = load_prompts("benign:test")[: args.n_eval]
    n = handle.n_layers
    ablate = {f"ablate@{lay}": {"vector": args.vector, "method": "ablate", "layers": "all", "direction": lay}
              for lay in range(n * 4 // 10, n * 3 // 4 + 1) if lay in ds.layers}
    rotate = {f"rotate{a}": {"vector": args.vector, "method": "rotate", "angle": a, "layers": "discriminative"}
              for a in (90, 180, 270)}
    best_ablate, ablate_scores = pick(handle, train, ablate, args.tokens)
    best_rotate, rotate_scores = pick(handle, train, rotate, args.tokens)
    disc = build_plan(rotate[best_rotate], handle).interventions[0].layers
    out: dict[str, Any] = {"model": args.model, "vector": args.vector, "n_eval": len(test), "tokens": args.tokens,
                           "selection": {"ablate": ablate_scores, "rotate": rotate_scores},
                           "chosen": {"ablate": ablate[best_ablate], "rotate": rotate[best_rotate]},
                           "discriminative_layers": list(disc), "heldout": {}}
    for name, plan in (("unsteered", None), ("ablate", ablate[best_ablate]), ("rotate", rotate[best_rotate])):
        harmful = generate(handle, test, plan, max_new_tokens=args.tokens, batch_size=16, progress=True)
        harmless = generate(handle, benign, plan, max_new_tokens=args.tokens, batch_size=16, progress=True)
        out["heldout"][name] = {"harmful_refusal": refusal_rate(harmful).to_json(),
                                "benign_refusal": refusal_rate(harmless).to_json(),
                                "examples": [{"prompt": p, "completion": c} for p, c in zip(test[:3], harmful[:3],
                                                                                            strict=True)]}
        print(f"{name:>10}: harmful refusal {refusal_rate(harmful)}  benign refusal {refusal_rate(harmless)}")
    write_text_atomic(args.out, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
