"""`make demo`: calibrate a refusal direction on the default model and show what steering does.

Calibrates on the train split of `refusal-pairs` (response-mean), prints the per-layer table, shows
unsteered vs steered completions side by side, and measures the refusal rate (substring judge) on
held-out harmful and benign prompts with and without steering.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from steerable.data.loaders import contrastive_examples, load_prompts
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.directions.summary import inspect_table
from steerable.evaluate.refusal import is_refusal, refusal_rate
from steerable.fsutil import write_text_atomic
from steerable.generation import generate
from steerable.models.load import load_model
from steerable.tables import table


def _clip(text: str, width: int = 58) -> str:
    return textwrap.shorten(" ".join(text.split()), width, placeholder=" …")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steerable.demo")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="demo-out")
    ap.add_argument("--layers", default="9-11")
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--n-eval", type=int, default=100, help="held-out harmful and benign prompts each")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()

    handle = load_model(args.model)
    print(f"== calibrating a refusal direction on {args.model} (refusal-pairs, train split, response-mean)")
    examples = contrastive_examples(pairs="refusal-pairs")
    ds = calibrate(handle, examples, position="response-mean", data={"pairs": "refusal-pairs"})
    vec = save_directions(ds, out / "refusal.safetensors")
    print(inspect_table(ds))
    print(f"\nwrote {vec}")

    plan = {"vector": str(vec), "method": "add", "strength": args.strength, "layers": args.layers}
    harmful = load_prompts("advbench:test")[: args.n_eval]
    benign = load_prompts("benign:test")[: args.n_eval]
    print(f"\n== generating: {len(harmful)} held-out harmful + {len(benign)} held-out benign prompts, greedy, "
          f"{args.max_new_tokens} tokens; steering = add α={args.strength} on layers {args.layers}")
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=20, progress=True)
    results = {
        "unsteered": (generate(handle, harmful, **gen), generate(handle, benign, **gen)),
        "steered": (generate(handle, harmful, plan, **gen), generate(handle, benign, plan, **gen)),
    }

    print("\n== side by side (first held-out prompts)")
    rows = []
    for kind, prompts, i in (("harmful", harmful, 0), ("benign", benign, 1)):
        for j in range(3):
            rows.append([kind, _clip(prompts[j], 40), _clip(results["unsteered"][i][j]),
                         _clip(results["steered"][i][j])])
    print(table(["", "prompt", "unsteered", "steered"], rows))

    summary: dict[str, Any] = {}
    print("\n== refusal rate (substring judge), held-out prompts, bootstrap 95 % CI")
    rate_rows = []
    for name, (h, b) in results.items():
        rh, rb = refusal_rate(h), refusal_rate(b)
        summary[name] = {"harmful": rh.to_json(), "benign": rb.to_json()}
        rate_rows.append([name, str(rh), str(rb)])
    print(table(["", "harmful (advbench:test)", "benign (benign:test)"], rate_rows))
    summary.update(model=args.model, plan=plan, max_new_tokens=args.max_new_tokens, seconds=round(time.time() - t0),
                   examples=[{"prompt": p, "unsteered": u, "steered": s, "steered_refuses": is_refusal(s)}
                             for p, u, s in zip(harmful[:5], results["unsteered"][0], results["steered"][0],
                                                strict=False)])
    write_text_atomic(out / "demo.json", json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"\nwrote {out / 'demo.json'}  ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
