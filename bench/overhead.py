"""Greedy decode throughput with each intervention on 7 layers vs unsteered, at batch 1 and 16.

Writes bench/results/overhead.json: a list of {"method", "layers", "batch", "steered_tps", "unsteered_tps",
"ratio"} plus one entry {"method": "mixed-16-plans", ...} whose ratio is 16 rows with 16 different plans
against the same batch with one shared plan. Every ratio comes from interleaved A/B runs in this
process (median of per-round ratios), since these machines are shared and noisy.
Targets: ratio ≥ 0.99 for every intervention; mixed-16-plans ≥ 0.97.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads ruin timings

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from steerable.data.loaders import contrastive_examples, load_prompts  # noqa: E402
from steerable.directions.artifact import save_directions  # noqa: E402
from steerable.directions.calibrate import calibrate  # noqa: E402
from steerable.fsutil import write_text_atomic  # noqa: E402
from steerable.models.load import load_model  # noqa: E402
from steerable.steering.hooks import steer  # noqa: E402


def plans(vec: str, layers: str) -> dict[str, dict]:
    base = {"vector": vec, "layers": layers}
    return {
        "add": {**base, "method": "add", "strength": 0.5},
        "ablate": {**base, "method": "ablate"},
        "cap": {**base, "method": "cap", "cap_floor": "p5", "cap_ceiling": "p95"},
        "rotate": {**base, "method": "rotate", "angle": 30},
        "angular": {**base, "method": "angular", "angle": 30, "strength": 0.2},
        "angular-adaptive": {**base, "method": "angular-adaptive", "angle": 30, "strength": 0.2},
        "sttp": {**base, "method": "sttp"},
        "stmp": {**base, "method": "stmp"},
        "add-gated-first:8": {**base, "method": "add", "strength": 0.5, "gate": "prompt+first:8"},
        "conditional": {"method": "conditional", "vector": vec, "layer": 8, "threshold": 0.0,
                        "then": {**base, "method": "add", "strength": 0.5}},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="9-15", help="7 layers")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--methods", help="comma-separated subset")
    ap.add_argument("--out", default="bench/results/overhead.json")
    ap.add_argument("--work", default="bench/results/.work")
    args = ap.parse_args()

    torch.manual_seed(0)
    handle = load_model(args.model)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    vec = str(Path(args.work) / "bench-directions.safetensors")
    save_directions(calibrate(handle, contrastive_examples(pairs="refusal-pairs", limit=24), position="last",
                              progress=False), vec)
    prompts = load_prompts("benign:test")
    tok = handle.tokenizer
    kw = {"do_sample": False, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
          "pad_token_id": tok.pad_token_id, "temperature": None, "top_p": None, "top_k": None}

    def runner(batch: int) -> Callable[[Callable[[], contextlib.AbstractContextManager]], float]:
        enc = handle.encode([handle.render(p) for p in prompts[:batch]])

        @torch.inference_mode()
        def run(ctx: Callable[[], contextlib.AbstractContextManager]) -> float:
            with ctx() as session:
                if session is not None:
                    session.begin(int(enc["input_ids"].shape[1]))
                t = time.perf_counter()
                handle.model.generate(**enc, **kw)
                return batch * args.new_tokens / (time.perf_counter() - t)
        return run

    def ab(run: Callable, steered: Callable, base: Callable) -> tuple[float, float, float]:
        run(steered), run(base)  # warm-up
        a, b, r = [], [], []
        for _ in range(args.rounds):
            x, y = run(steered), run(base)
            a.append(x), b.append(y), r.append(x / y)
        return statistics.median(a), statistics.median(b), statistics.median(r)

    chosen = plans(vec, args.layers)
    if args.methods:
        chosen = {k: v for k, v in chosen.items() if k in args.methods.split(",")}
    results = []
    batches = [int(b) for b in args.batches.split(",")]
    bar = tqdm(total=len(chosen) * len(batches) + 1, desc="overhead")
    for batch in batches:
        run = runner(batch)
        for name, plan in chosen.items():
            s, u, ratio = ab(run, lambda p=plan: steer(handle, p), contextlib.nullcontext)
            results.append({"method": name, "layers": args.layers, "batch": batch, "steered_tps": round(s, 2),
                            "unsteered_tps": round(u, 2), "ratio": round(ratio, 4)})
            bar.set_postfix_str(f"{name}@{batch}: {ratio:.3f}")
            bar.update()
    # 16 users, 16 plans (own strength and direction each) vs the same batch with one shared plan
    run = runner(16)
    per_row = [{"vector": vec, "method": "add", "layers": args.layers, "strength": 0.1 + 0.05 * i,
                "direction": [9, 10, 11, 12][i % 4]} for i in range(16)]
    shared = per_row[0]
    s, u, ratio = ab(run, lambda: steer(handle, rows=per_row), lambda: steer(handle, shared))
    results.append({"method": "mixed-16-plans", "layers": args.layers, "batch": 16, "steered_tps": round(s, 2),
                    "unsteered_tps": round(u, 2), "ratio": round(ratio, 4), "baseline": "one shared plan"})
    bar.update()
    bar.close()
    for r in results:
        print(f"{r['method']:>20}  batch {r['batch']:>2}  {r['steered_tps']:8.1f} vs {r['unsteered_tps']:8.1f} tok/s"
              f"  ratio {r['ratio']:.4f}")
    write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
