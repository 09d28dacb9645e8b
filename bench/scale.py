"""Scaling out on Ray: a sweep and a calibration with 2 Ray workers vs 1, in the same run, on one machine.

Writes bench/results/scale.json:
- "sweep": 16 configurations (+ the unsteered baseline) on --model, 2 configurations per group, run by
  `run_sweep_ray` with 1 worker and with 2 workers (1 torch thread each), and by `run_sweep` in this process
  with 1 thread (no Ray). Wall times include starting the actors and loading the model in each (the price
  a user pays); "ratio" = 2 workers / 1 worker. "lines_equal": the two Ray runs wrote the same lines (timing
  aside) — greedy decoding makes that a check, not a hope.
- "calibrate": `calibrate_ray` with 1 and 2 workers (and `calibrate` in this process), same examples;
  "max_abs_diff" between the two Ray artifacts' tensors.
- "serve": the Ray Serve overhead per request: p50 latency of Serve (1 replica, 1 thread) over the
  single-process server (1 thread), same model and plan, requests one at a time, servers alternating;
  at 1 generated token (the fixed per-request cost) and at --serve-tokens ("ratio_p50").
The machine has 2 CPU cores shared with whatever else runs; "loadavg" records the 1-minute load average
before and after, so a reader can judge how contended the cores were. Ratios, not absolute times, are the
result; on a contended machine even those move.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads ruin timings

import argparse
import contextlib
import dataclasses
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from steerable.data.loaders import contrastive_examples, load_prompt_rows
from steerable.directions.artifact import DirectionSet, save_directions
from steerable.directions.calibrate import calibrate
from steerable.fsutil import write_text_atomic
from steerable.models.load import load_model
from steerable.scale.ray_calibrate import calibrate_ray
from steerable.scale.ray_env import WorkerOptions, connect
from steerable.scale.ray_sweep import run_sweep_ray
from steerable.sweeps.grid import Config
from steerable.sweeps.records import record_line
from steerable.sweeps.run import SweepSpec, run_sweep

STRENGTHS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
CONFIGS = [Config("none")] + [Config("add", layers, s) for layers in ("9-11", "12-14") for s in STRENGTHS]
TENSORS = ("directions", "raw_norms", "scales", "mean_pos", "mean_neg", "percentiles", "auroc", "cohens_d")


def _timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _one_thread(fn: Any) -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def bench_sweep(args: argparse.Namespace, vector: str, work: Path) -> dict[str, Any]:
    prompts = load_prompt_rows("advbench:test")[: args.prompts]
    spec = SweepSpec(vector=vector, configs=CONFIGS, prompts=prompts, max_new_tokens=args.max_new_tokens,
                     batch_size=2 * len(prompts), group_rows=2 * len(prompts), examples=0)
    walls: dict[str, float] = {}
    lines: dict[int, dict[str, str]] = {}
    for workers in (1, 2):
        out = work / f"sweep{workers}.jsonl"
        walls[f"ray_{workers}_workers_s"], records = _timed(lambda out=out, workers=workers: run_sweep_ray(
            args.model, spec, out, options=WorkerOptions(workers=workers, threads=1), progress=False))
        lines[workers] = {r.key: record_line(dataclasses.replace(r, seconds_per_config=0.0)) for r in records}
        print(f"sweep, {workers} Ray worker(s): {walls[f'ray_{workers}_workers_s']:.1f} s", flush=True)
    handle = load_model(args.model)
    walls["in_process_1_thread_s"], _ = _timed(lambda: _one_thread(
        lambda: run_sweep(handle, spec, work / "sweep_local.jsonl", progress=False)))
    print(f"sweep, in this process (1 thread, model already loaded): {walls['in_process_1_thread_s']:.1f} s")
    return {**{k: round(v, 2) for k, v in walls.items()},
            "ratio": round(walls["ray_2_workers_s"] / walls["ray_1_workers_s"], 3),
            "lines_equal": lines[1] == lines[2], "configs": len(CONFIGS) - 1, "with_baseline": True,
            "groups": -(-len(CONFIGS) // 2), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens}


def bench_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    examples = contrastive_examples(positive="advbench", negative="benign", limit=args.calibration_pairs)
    walls: dict[str, float] = {}
    sets: dict[int, DirectionSet] = {}
    for workers in (1, 2):
        walls[f"ray_{workers}_workers_s"], sets[workers] = _timed(lambda workers=workers: calibrate_ray(
            args.model, examples, batch_size=16, options=WorkerOptions(workers=workers, threads=1), progress=False))
        print(f"calibrate, {workers} Ray worker(s): {walls[f'ray_{workers}_workers_s']:.1f} s", flush=True)
    handle = load_model(args.model)
    walls["in_process_1_thread_s"], local = _timed(lambda: _one_thread(
        lambda: calibrate(handle, examples, batch_size=16, progress=False)))
    print(f"calibrate, in this process (1 thread, model already loaded): {walls['in_process_1_thread_s']:.1f} s")
    diff = max(float((getattr(sets[1], t) - getattr(s, t)).abs().max()) for s in (sets[2], local) for t in TENSORS)
    return {**{k: round(v, 2) for k, v in walls.items()},
            "ratio": round(walls["ray_2_workers_s"] / walls["ray_1_workers_s"], 3),
            "max_abs_diff": diff, "examples": len(examples), "layers": len(local.layers), "estimator": "mean-diff"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _single_process_server(model: str, vectors: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """`steerable serve` (the real CLI, 1 torch thread) in a subprocess; it and its port once /health answers."""
    cmd = [sys.executable, "-m", "steerable.cli.main", "serve", "--model", model, "--vectors", str(vectors),
           "--port", "0", "--max-tokens", "64"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        m = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", log.read_text(errors="replace"))
        if m:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/health", timeout=5).read()
                return proc, int(m.group(1))
        if proc.poll() is not None:
            raise SystemExit(f"the single-process server exited:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the single-process server did not start in 600 s")


def _chat(base: str, body: dict[str, Any]) -> tuple[float, str]:
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t, out["choices"][0]["message"]["content"]


def bench_serve(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The Ray Serve overhead per request vs the single-process server, same model, plan and thread count:
    Serve with 1 replica of 1 torch thread (in this process's local Ray cluster) and the single-process
    server (the CLI in a subprocess, OMP_NUM_THREADS=1). Sequential non-streamed greedy chat requests, one
    at a time, alternating between the servers (A B, B A, …) at two lengths: 1 generated token (the
    per-request cost: proxy, routing, prefill) and `--serve-tokens`. p50 latency of each and the ratios."""
    from steerable.scale.ray_serve import RayServeOptions, import_serve, start
    from steerable.serve.config import Limits, ServeConfig

    vectors = work / "serve-vectors"
    examples = contrastive_examples(positive="advbench", negative="benign", limit=24)
    save_directions(calibrate(load_model(args.model), examples, layers=range(8, 16), progress=False),
                    vectors / "refusal.safetensors")
    proc, port = _single_process_server(args.model, vectors, work / "serve-single.log")
    serve = import_serve()
    try:
        t = time.monotonic()
        url = start(ServeConfig(model=args.model, vectors=vectors, port=_free_port(), limits=Limits(max_tokens=64)),
                    RayServeOptions(replicas=1, threads=1))
        start_s = time.monotonic() - t
        servers = {"single": f"http://127.0.0.1:{port}", "ray": url}
        prompts = [r["prompt"] for r in load_prompt_rows("benign:test")]
        plan = {"vector": "refusal", "method": "add", "layers": "9-15", "strength": 0.5}
        lengths = (1, args.serve_tokens)
        lat: dict[int, dict[str, list[float]]] = {n: {"single": [], "ray": []} for n in lengths}
        same: list[bool] = []
        for i in range(args.serve_requests + 2):  # the first two rounds warm up
            for n in lengths:
                body = {"model": args.model, "max_tokens": n, "steering": plan,
                        "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
                texts = {}
                for name in (("single", "ray") if i % 2 == 0 else ("ray", "single")):
                    dt, texts[name] = _chat(servers[name], body)
                    if i >= 2:
                        lat[n][name].append(dt)
                same.append(texts["single"] == texts["ray"])
    finally:
        serve.shutdown()
        proc.terminate()
        proc.wait(30)
    out: dict[str, Any] = {"setup": "Ray Serve: 1 replica × 1 torch thread; single process: 1 torch thread; "
                                    "sequential non-streamed greedy chat requests, servers alternating",
                           "requests_per_server_and_length": args.serve_requests, "plan": "add on 7 layers",
                           "identical_texts": sum(same) / len(same), "ray_serve_start_s": round(start_s, 1)}
    for n in lengths:
        p50 = {k: statistics.median(v) for k, v in lat[n].items()}
        out[f"max_tokens_{n}"] = {"p50_single_s": round(p50["single"], 4), "p50_ray_s": round(p50["ray"], 4),
                                  "ratio_p50": round(p50["ray"] / p50["single"], 3),
                                  "overhead_p50_ms": round(1000 * (p50["ray"] - p50["single"]), 1)}
    out["ratio_p50"] = out[f"max_tokens_{args.serve_tokens}"]["ratio_p50"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--calibration-pairs", type=int, default=96, help="examples per class for calibration")
    ap.add_argument("--serve-requests", type=int, default=20, help="timed requests per server and length")
    ap.add_argument("--serve-tokens", type=int, default=16, help="tokens per request of the longer serve load")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sweep", "calibrate", "serve"])
    ap.add_argument("--out", default="bench/results/scale.json")
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    connect("local", num_cpus=2)
    result: dict[str, Any] = {"model": args.model, "cpus": os.cpu_count(), "ray_cpus": 2,
                              "threads_per_worker": 1}
    with tempfile.TemporaryDirectory() as d:
        if "sweep" not in args.skip:
            vector = str(Path(d) / "v.safetensors")
            examples = contrastive_examples(positive="advbench", negative="benign", limit=48)
            save_directions(calibrate(load_model(args.model), examples, layers=range(8, 15), progress=False), vector)
            result["sweep"] = bench_sweep(args, vector, Path(d))
        if "calibrate" not in args.skip:
            result["calibrate"] = bench_calibrate(args)
        result["serve"] = None if "serve" in args.skip else bench_serve(args, Path(d))
    result["loadavg_1min"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")  # 1: CPU is shared per session, not process
    result["sched_autogroup_enabled"] = autogroup.read_text().strip() if autogroup.exists() else None
    previous = Path(args.out)
    if args.skip and previous.is_file():  # a skipped part keeps its result from the last run that measured it
        kept = json.loads(previous.read_text())
        for part in args.skip:
            if kept.get(part) is not None:
                result[part] = kept[part]
                result.setdefault("kept_from_previous_run", []).append(part)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
