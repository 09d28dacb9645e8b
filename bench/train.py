"""What training-time steering costs per LoRA step on smollm2-135m (issue 16's speed target).

Every method trains the same steps on the same batches (same seed) from a fresh copy of the model; the methods
run interleaved, in a rotated order each round, and each round's step times (median over the steps after the
first) are divided by the plain-LoRA run's of the same round. Reported: the median of those per-round ratios,
with their range. The contrastive term's frozen-model pass runs once before training (its projections are
cached per example); its time is reported apart, as a share of the run's plain training time.

End-to-end step times on a shared 2-core machine scatter by more than the effects measured, so the file also
carries "isolated": the time the added work itself takes per step, measured apart on tensors of the step's shape
(the loss terms' forward and backward on [B, T, d] activations at every steered layer; the plan's hooks called as
a forward pass calls them, then their backward), median of many repetitions, over the plain step time.
`--rounds 0` measures only that and adds it to an existing results file.

Targets: aux, actreg, contrastive (and combined) ≤ 1.10; preventative and caft ≤ 1.02.
Writes bench/results/train.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads ruin timings

import argparse
import copy
import json
import statistics
import time

import torch

from steerable.data.loaders import contrastive_examples
from steerable.data.sft import load_sft
from steerable.directions.calibrate import calibrate
from steerable.fsutil import write_text_atomic
from steerable.models.load import load_model
from steerable.steering.builders import ablate, add
from steerable.steering.compile import compile_plans
from steerable.steering.hooks import Session
from steerable.steering.layer_spec import parse_layers
from steerable.steering.plan import build_plan
from steerable.train import TrainConfig, train
from steerable.train.artifact import versions
from steerable.train.config import METHOD_TERMS
from steerable.train.losses import reference, steering_terms

METHODS = ("none", "aux", "actreg", "contrastive", "combined", "preventative", "caft")
TARGET = {"aux": 1.10, "actreg": 1.10, "contrastive": 1.10, "combined": 1.10, "preventative": 1.02, "caft": 1.02}


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def isolated_ms(handle, ds, layers: tuple[int, ...], batch: int, width: int, reps: int) -> dict[str, float]:
    """Per method: milliseconds per step of the work it adds, on [batch, width, d] activations."""
    d = handle.hidden_size
    g = torch.Generator().manual_seed(0)
    hs = {x: torch.randn(batch, width, d, generator=g) for x in layers}
    mask = torch.ones(batch, width, dtype=torch.bool)
    ref = reference(ds, layers)
    base = {x: torch.randn(batch, width, generator=g) for x in layers}
    out = {}
    for method, terms in METHOD_TERMS.items():
        if not terms:
            continue

        def step(terms=terms) -> None:
            leaves = {x: h.clone().requires_grad_(True) for x, h in hs.items()}
            vals = steering_terms(leaves, mask, ref, terms, base)
            sum(vals.values()).backward()
        out[method] = _median_ms(step, reps)
    plans = {"preventative": add(ds, 1.0, layers=list(layers)), "caft": ablate(ds, layers=list(layers))}
    for method, plan in plans.items():
        compiled = compile_plans(build_plan(plan, handle), next(handle.model.parameters()))
        session = Session(handle, compiled)
        hooks = [session._make_hook(k, compiled.slots.get(k, []), [], False) for k in compiled.slots]
        kwargs = {"input_ids": torch.zeros(batch, width, dtype=torch.long),
                  "attention_mask": torch.ones(batch, width, dtype=torch.long)}

        def run(hooks=hooks, session=session, kwargs=kwargs) -> None:
            session._on_forward(None, (), kwargs)
            leaves = [h.clone().requires_grad_(True) for h in hs.values()]
            outs = [hook(None, (), {}, h) for hook, h in zip(hooks, leaves, strict=False)]
            sum(o.sum() for o in outs).backward()
        out[method] = _median_ms(run, reps)
    return out


def add_isolated(out: dict, handle, ds, args) -> None:
    layers = parse_layers(args.layers, handle.n_layers, ds.layers)
    ms = isolated_ms(handle, ds, layers, args.batch_size, args.isolated_width, args.isolated_reps)
    step_ms = out["plain_step_s"] * 1e3
    out["isolated"] = {"width_tokens": args.isolated_width, "batch_size": args.batch_size, "layers": list(layers),
                       "reps": args.isolated_reps, "plain_step_ms": round(step_ms, 1),
                       "methods": {m: {"ms_per_step": round(v, 3), "share_of_plain_step": round(v / step_ms, 5),
                                       "meets_target": 1 + v / step_ms <= TARGET[m]} for m, v in ms.items()}}
    print(json.dumps(out["isolated"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="sycophancy-sft:train")
    ap.add_argument("--layers", default="9-14")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="per run; the first is dropped as warm-up")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--isolated-width", type=int, default=230, help="tokens per row of the isolated timing")
    ap.add_argument("--isolated-reps", type=int, default=30)
    ap.add_argument("--out", default="bench/results/train.json")
    args = ap.parse_args()
    t_start = time.perf_counter()
    base = load_model(args.model)
    # the direction's quality does not change what a step costs: a quickly calibrated one will do
    ds = calibrate(base, contrastive_examples(pairs="refusal-pairs", limit=16), position="last", progress=False)
    if args.rounds == 0:
        with open(args.out, encoding="utf-8") as f:
            out = json.load(f)
        add_isolated(out, base, ds, args)
        write_text_atomic(args.out, json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    sft = load_sft(args.data)
    times: dict[str, list[list[float]]] = {m: [] for m in METHODS}
    base_pass: list[float] = []
    losses: dict[str, float] = {}
    for r in range(args.rounds):
        order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
        for method in order:
            handle = copy.deepcopy(base)
            config = TrainConfig(method=method, vector=None if method == "none" else ds, layers=args.layers,
                                 lam=0.1, strength=1.0, steps=args.steps, batch_size=args.batch_size,
                                 max_length=args.max_length, seed=0)
            result = train(handle, sft, config)
            times[method].append([line["seconds"] for line in result.log[1:]])
            losses[method] = result.log[-1]["task_loss"]
            if method == "contrastive":
                base_pass.append(result.record["base_pass_seconds"])
            print(f"round {r} {method}: median step {statistics.median(times[method][-1]):.3f} s", flush=True)
            del handle, result
    med = {m: [statistics.median(t) for t in times[m]] for m in METHODS}
    rows = []
    for m in METHODS[1:]:
        ratios = [a / b for a, b in zip(med[m], med["none"], strict=True)]
        ratio = statistics.median(ratios)
        rows.append({"method": m, "ratio": round(ratio, 4), "ratios": [round(x, 4) for x in ratios],
                     "median_step_s": round(statistics.median(med[m]), 4), "target": TARGET[m],
                     "meets_target": ratio <= TARGET[m], "final_task_loss": round(losses[m], 4)})
    plain_run = statistics.median(med["none"]) * args.steps
    out = {
        "model": args.model, "data": args.data, "layers": args.layers, "rounds": args.rounds,
        "steps_per_run": args.steps, "timed_steps_per_run": args.steps - 1, "batch_size": args.batch_size,
        "max_length": args.max_length, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "plain_step_s": round(statistics.median(med["none"]), 4), "methods": rows,
        "contrastive_base_pass": {"seconds": [round(x, 3) for x in base_pass],
                                  "share_of_plain_run": round(statistics.median(base_pass) / plain_run, 4),
                                  "note": f"one pass over the {args.steps * args.batch_size} examples of the run "
                                          "(adapter disabled, stopped after the last layer), before training"},
        "versions": versions(), "seconds": round(time.perf_counter() - t_start, 1),
    }
    write_text_atomic(args.out, json.dumps(out, indent=2) + "\n")
    print(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
