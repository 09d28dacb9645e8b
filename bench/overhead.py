"""Greedy decode throughput with each intervention on 7 layers vs unsteered, at batch 1 and 16.

Writes bench/results/overhead.json: a list of {"method", "layers", "batch", "steered_tps", "unsteered_tps",
"ratio"} plus one entry {"method": "mixed-16-plans", ...} whose ratio is 16 rows with 16 different plans
against the same batch with one shared plan. Every ratio comes from interleaved A/B runs in this
process (median of per-round ratios, ABBA order), since these machines are shared and noisy: here one
decode step of the same model takes anywhere from 42 to 66 ms from one run to the next.
Targets: ratio ≥ 0.99 for every intervention; mixed-16-plans ≥ 0.97.

End-to-end ratios on a shared 2-core machine scatter by a few per cent, more than the effect measured, so
each entry also carries "hook_us_per_step": the time the steering hooks themselves take per decode step
(called exactly as a forward pass calls them, thousands of times), and "hook_share" = that time over the
unsteered step time: the cost steering adds, resolved far below the noise.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads ruin timings

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steerable.data.loaders import contrastive_examples, load_prompts
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.fsutil import write_text_atomic
from steerable.models.load import load_model
from steerable.steering.compile import compile_plans
from steerable.steering.hooks import Session, steer
from steerable.steering.plan import build_plan


class _Cache:
    """Stands in for a KV cache of `n` tokens, so the session sees a decode step."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_seq_length(self) -> int:
        return self.n


def hook_cost_us(handle, plan=None, rows=None, batch: int = 1, reps: int = 2000) -> float:
    """Microseconds per decode step spent in steering: the session's per-pass hook plus every layer hook,
    called on [batch, 1, d] activations exactly as a forward pass calls them (median of 5 timings)."""
    checked = build_plan(plan, handle) if rows is None else [build_plan(r, handle) for r in rows]
    ref = next(handle.model.parameters())
    compiled = compile_plans(checked, ref)
    session = Session(handle, compiled)
    session.begin(12)
    session.decisions = {c: torch.ones(batch, 1, 1) for cs in compiled.conditions.values() for c in cs}
    hooks = [session._make_hook(k, compiled.slots.get(k, []), compiled.conditions.get(k, []), False)
             for k in {*compiled.slots, *compiled.conditions}]
    h = torch.randn(batch, 1, handle.hidden_size, dtype=ref.dtype)
    kwargs = {"input_ids": torch.zeros(batch, 1, dtype=torch.long), "past_key_values": _Cache(16)}
    times = []
    with torch.inference_mode():
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                session._on_forward(None, (), kwargs)
                for hook in hooks:
                    hook(None, (), {}, h)
            times.append((time.perf_counter() - t) / reps * 1e6)
    return statistics.median(times)


def ab_medians(run: Callable, steered: Callable, base: Callable, rounds: int) -> tuple[float, float, float]:
    """Medians of run(steered), run(base) and their per-round ratio, in ABBA order so that drift in the
    machine's speed cancels out (after one warm-up of each)."""
    run(steered), run(base)
    a, b, r = [], [], []
    for i in range(rounds):
        if i % 2:
            y, x = run(base), run(steered)
        else:
            x, y = run(steered), run(base)
        a.append(x), b.append(y), r.append(x / y)
    return statistics.median(a), statistics.median(b), statistics.median(r)


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
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--methods", help="comma-separated subset")
    ap.add_argument("--out", default="bench/results/overhead.json")
    ap.add_argument("--work", default="bench/results/.work")
    ap.add_argument("--hooks-only", action="store_true",
                    help="only (re)measure hook_us_per_step / hook_share into the existing --out file")
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
        return ab_medians(run, steered, base, args.rounds)

    chosen = plans(vec, args.layers)
    per_row = [{"vector": vec, "method": "add", "layers": args.layers, "strength": 0.1 + 0.05 * i,
                "direction": [9, 10, 11, 12][i % 4]} for i in range(16)]
    if args.hooks_only:
        results = json.loads(Path(args.out).read_text())
        for r in results:
            if r["method"] == "mixed-16-plans":
                r["hook_us_per_step"] = round(hook_cost_us(handle, rows=per_row, batch=16), 1)
                r["shared_hook_us_per_step"] = round(hook_cost_us(handle, per_row[0], batch=16), 1)
            else:
                us = hook_cost_us(handle, chosen[r["method"]], batch=r["batch"])
                share = us * 1e-6 * r["unsteered_tps"] / r["batch"]
                r.update(hook_us_per_step=round(us, 1), hook_share=round(share, 5))
            print(r)
        write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
        return
    if args.methods:
        chosen = {k: v for k, v in chosen.items() if k in args.methods.split(",")}
    results = []
    batches = [int(b) for b in args.batches.split(",")]
    bar = tqdm(total=len(chosen) * len(batches) + 1, desc="overhead")
    for batch in batches:
        run = runner(batch)
        for name, plan in chosen.items():
            s, u, ratio = ab(run, lambda p=plan: steer(handle, p), contextlib.nullcontext)
            us = hook_cost_us(handle, plan, batch=batch)
            results.append({"method": name, "layers": args.layers, "batch": batch, "steered_tps": round(s, 2),
                            "unsteered_tps": round(u, 2), "ratio": round(ratio, 4), "hook_us_per_step": round(us, 1),
                            "hook_share": round(us * 1e-6 * u / batch, 5)})
            bar.set_postfix_str(f"{name}@{batch}: {ratio:.3f}")
            bar.update()
    # 16 users, 16 plans (own strength and direction each) vs the same batch with one shared plan
    run = runner(16)
    shared = per_row[0]
    s, u, ratio = ab(run, lambda: steer(handle, rows=per_row), lambda: steer(handle, shared))
    mixed_us, shared_us = hook_cost_us(handle, rows=per_row, batch=16), hook_cost_us(handle, shared, batch=16)
    results.append({"method": "mixed-16-plans", "layers": args.layers, "batch": 16, "steered_tps": round(s, 2),
                    "unsteered_tps": round(u, 2), "ratio": round(ratio, 4), "baseline": "one shared plan",
                    "hook_us_per_step": round(mixed_us, 1), "shared_hook_us_per_step": round(shared_us, 1)})
    bar.update()
    bar.close()
    for r in results:
        print(f"{r['method']:>20}  batch {r['batch']:>2}  {r['steered_tps']:8.1f} vs {r['unsteered_tps']:8.1f} tok/s"
              f"  ratio {r['ratio']:.4f}  hooks {r['hook_us_per_step']:7.1f} µs/step")
    write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
