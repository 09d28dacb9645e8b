"""Throughput and latency of `steerable serve` under 16 concurrent streaming clients, on smollm2-135m.

Writes bench/results/serve.json with
- "ratio_vs_offline": aggregate generated tokens/s of 16 concurrent streaming chat requests (one shared plan)
  over an offline batched `generate` of the same 16 prompts, same plan, same max tokens;
- "ratio_mixed_plans": the same 16 clients each with its own plan, over the shared-plan load;
- p50/p99 time to first token and inter-token latency, as the clients see them;
- "poisson": continuous vs dynamic batching (two servers, `--batching continuous|dynamic`) under the same
  Poisson arrivals at `--load` (0.7) of saturation, saturation being measured first in the same run (16
  concurrent requests with 16 different plans, on each server; the lower of the two): p50/p99 time to first
  token and tokens/s per mode, rounds interleaved (C D, D C, …) over the same arrival schedules.
Targets: ratio_vs_offline ≥ 0.8, ratio_mixed_plans ≥ 0.95; p99 TTFT dynamic/continuous ≥ 3, throughput
continuous/dynamic ≥ 1.

The server is the real CLI (`python -m steerable.cli.main serve`) in a subprocess; the clients are plain
asyncio HTTP/1.1 connections reading the SSE stream (light, so they take little CPU from the server on a
2-core machine). Every ratio comes from rounds that run the three loads back to back in alternating
order (median of per-round ratios), since these machines are shared and noisy. Both sides count the same
tokens: the server's `usage`, checked against the offline texts (`identical_to_offline`).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads ruin timings

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from steerable.data.loaders import contrastive_examples, load_prompts
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.fsutil import write_text_atomic
from steerable.generation import generate
from steerable.models.load import load_model


def start_server(args: argparse.Namespace, vectors: Path, log: Path,
                 batching: str = "continuous") -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "steerable.cli.main", "serve", "--model", args.model, "--vectors", str(vectors),
           "--port", "0", "--max-batch", "16", "--max-tokens", str(max(512, args.max_tokens)),
           "--batching", batching]
    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        m = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", log.read_text())
        if m:
            port = int(m.group(1))
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                    return proc, port
                except OSError:
                    time.sleep(0.2)
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 300 s")


async def stream_one(port: int, body: dict) -> dict:
    """One streaming chat request; chunk arrival times as the client sees them."""
    data = json.dumps(body).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    await writer.drain()
    status = (await reader.readline()).split()[1]
    if status != b"200":
        raise RuntimeError(f"server answered {status!r}: {await reader.read()}")
    times, text, usage = [], [], None
    while True:
        line = await reader.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue  # headers, chunk sizes, blank lines
        payload = line[6:].strip()
        if payload == b"[DONE]":
            break
        obj = json.loads(payload)
        if obj.get("choices"):
            content = obj["choices"][0]["delta"].get("content")
            if content:
                times.append(time.perf_counter())
                text.append(content)
        if obj.get("usage"):
            usage = obj["usage"]["completion_tokens"]
    writer.close()
    return {"t0": t0, "times": times, "text": "".join(text), "tokens": usage}


async def load(port: int, bodies: list[dict]) -> tuple[list[dict], float]:
    t = time.perf_counter()
    results = await asyncio.gather(*(stream_one(port, b) for b in bodies))
    return list(results), time.perf_counter() - t


async def poisson(port: int, bodies: list[dict], arrivals: list[float]) -> tuple[list[dict], float]:
    """Request i sent `arrivals[i]` seconds after the start (open loop: nobody waits for an answer)."""
    async def later(body: dict, at: float, start: float) -> dict:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        return await stream_one(port, body)

    t = time.perf_counter()
    results = await asyncio.gather(*(later(b, a, t) for b, a in zip(bodies, arrivals, strict=True)))
    return list(results), time.perf_counter() - t


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """`n` Poisson arrivals at `rate` per second (exponential gaps), the first at 0."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n).exponential_(rate, generator=g).tolist()
    out, t = [], 0.0
    for gap in gaps:
        out.append(t)
        t += gap
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] if xs else float("nan")


def poisson_part(args: argparse.Namespace, ports: dict[str, int], bodies: Any, plans: list[dict],
                 prompts: list[str]) -> dict:
    """Continuous vs dynamic batching under the same Poisson arrivals at `args.load` of saturation."""
    n = args.poisson_requests
    burst = bodies(plans)
    # more prompts than the 16 of the burst loads, each request with one of the 16 plans
    reqs = [{**burst[i % len(burst)], "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
            for i in range(n)]
    sat: dict[str, float] = {}
    for mode, port in ports.items():  # warm-up, then saturation: the 16-plan burst, as fast as the server goes
        asyncio.run(load(port, burst))
        res, wall = asyncio.run(load(port, burst))
        sat[mode] = len(res) / wall
    rate = args.load * min(sat.values())
    print(f"saturation: {sat['continuous']:.3f} req/s continuous, {sat['dynamic']:.3f} dynamic; Poisson at "
          f"{rate:.3f} req/s ({args.load:g} of the lower)", flush=True)
    per: dict[str, dict[str, list]] = {m: {"ttft": [], "tokens": [], "wall": [], "texts": []} for m in ports}
    per_round = []
    for r in range(args.poisson_rounds):
        arrivals = arrival_times(n, rate, seed=1000 + r // 2)  # each pair of rounds: one schedule, both modes
        mode = ["continuous", "dynamic"][(r + r // 2) % 2]  # C D, D C, C D, ...
        res, wall = asyncio.run(poisson(ports[mode], reqs, arrivals))
        tokens = sum(x["tokens"] for x in res)
        ttft = [x["times"][0] - x["t0"] for x in res if x["times"]]
        per[mode]["ttft"] += ttft
        per[mode]["tokens"].append(tokens)
        per[mode]["wall"].append(wall)
        per[mode]["texts"].append([x["text"] for x in res])
        per_round.append({"mode": mode, "seed": 1000 + r // 2, "tokens": tokens, "wall_s": round(wall, 3),
                          "tps": round(tokens / wall, 3), "ttft_p50_s": round(pct(ttft, 50), 4),
                          "ttft_p99_s": round(pct(ttft, 99), 4)})
        print(f"poisson round {r + 1}/{args.poisson_rounds} ({mode}): {tokens / wall:.1f} tok/s, TTFT p50 "
              f"{pct(ttft, 50):.3f} s, p99 {pct(ttft, 99):.3f} s", flush=True)
    out: dict[str, Any] = {"load": args.load, "rate_rps": round(rate, 4),
                           "saturation_rps": {m: round(v, 4) for m, v in sat.items()},
                           "requests_per_round": n, "rounds": args.poisson_rounds, "max_tokens": args.max_tokens}
    for mode, d in per.items():
        out[mode] = {"ttft_s": {"p50": round(pct(d["ttft"], 50), 4), "p99": round(pct(d["ttft"], 99), 4)},
                     "tps": round(sum(d["tokens"]) / sum(d["wall"]), 3), "requests": len(d["ttft"])}
    c, d = out["continuous"], out["dynamic"]
    out["ttft_p99_ratio_dynamic_over_continuous"] = round(d["ttft_s"]["p99"] / c["ttft_s"]["p99"], 3)
    out["ttft_p50_ratio_dynamic_over_continuous"] = round(d["ttft_s"]["p50"] / c["ttft_s"]["p50"], 3)
    out["tps_ratio_continuous_over_dynamic"] = round(c["tps"] / d["tps"], 4)
    pairs = list(zip(per["continuous"]["texts"], per["dynamic"]["texts"], strict=False))
    out["identical_texts_continuous_vs_dynamic"] = round(
        statistics.mean(a == b for ca, da in pairs for a, b in zip(ca, da, strict=True)), 4) if pairs else None
    out["targets"] = {"ttft_p99_ratio_dynamic_over_continuous": 3.0, "tps_ratio_continuous_over_dynamic": 1.0}
    out["per_round"] = per_round
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="9-15", help="7 layers")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--load", type=float, default=0.7, help="Poisson arrival rate as a fraction of saturation")
    ap.add_argument("--poisson-requests", type=int, default=24, help="requests per Poisson round")
    ap.add_argument("--poisson-rounds", type=int, default=4, help="Poisson rounds, half per batching mode")
    ap.add_argument("--out", default="bench/results/serve.json")
    ap.add_argument("--work", default="bench/results/.work")
    args = ap.parse_args()

    torch.manual_seed(0)
    load_avg_start = os.getloadavg()
    handle = load_model(args.model)
    work = Path(args.work)
    vectors = work / "serve-vectors"
    vectors.mkdir(parents=True, exist_ok=True)
    vec = vectors / "refusal.safetensors"
    save_directions(calibrate(handle, contrastive_examples(pairs="refusal-pairs", limit=24), position="last",
                              progress=False), vec)
    prompts = load_prompts("benign:test")[: args.clients]
    shared = {"vector": "refusal", "method": "add", "layers": args.layers, "strength": 0.5}
    mixed = [{"vector": "refusal", "method": "add", "layers": args.layers, "strength": 0.1 + 0.05 * i,
              "direction": [9, 10, 11, 12][i % 4]} for i in range(args.clients)]

    def bodies(plans: list[dict]) -> list[dict]:
        return [{"model": args.model, "messages": [{"role": "user", "content": p}], "max_tokens": args.max_tokens,
                 "stream": True, "stream_options": {"include_usage": True}, "steering": plan}
                for p, plan in zip(prompts, plans, strict=True)]

    offline_plan = {**shared, "vector": str(vec)}

    def offline() -> tuple[list[str], float]:
        t = time.perf_counter()
        out = generate(handle, prompts, offline_plan, max_new_tokens=args.max_tokens, batch_size=args.clients)
        return out, time.perf_counter() - t

    proc, port = start_server(args, vectors, work / "serve-server.log")
    dproc, dport = start_server(args, vectors, work / "serve-server-dynamic.log", batching="dynamic")
    try:
        loads = {"shared": bodies([shared] * args.clients), "mixed": bodies(mixed)}
        offline(), asyncio.run(load(port, loads["shared"])), asyncio.run(load(port, loads["mixed"]))  # warm-up
        rounds, ttft, itl = [], [], []
        identical = []
        for r in range(args.rounds):
            order = ["offline", "shared", "mixed"] if r % 2 == 0 else ["mixed", "shared", "offline"]
            got: dict = {}
            for name in order:
                if name == "offline":
                    got[name] = offline()
                else:
                    got[name] = asyncio.run(load(port, loads[name]))
            (shared_res, shared_s), (mixed_res, mixed_s) = got["shared"], got["mixed"]
            off_texts, off_s = got["offline"]
            tokens = sum(x["tokens"] for x in shared_res)
            mixed_tokens = sum(x["tokens"] for x in mixed_res)
            identical.append(sum(a["text"] == b for a, b in zip(shared_res, off_texts, strict=True)) / len(prompts))
            for x in shared_res + mixed_res:
                if x["times"]:
                    ttft.append(x["times"][0] - x["t0"])
                    itl += [b - a for a, b in zip(x["times"], x["times"][1:], strict=False)]
            row = {"offline_tps": tokens / off_s, "shared_tps": tokens / shared_s, "mixed_tps": mixed_tokens / mixed_s,
                   "tokens": tokens, "mixed_tokens": mixed_tokens}
            row["ratio_vs_offline"] = row["shared_tps"] / row["offline_tps"]
            row["ratio_mixed_plans"] = row["mixed_tps"] / row["shared_tps"]
            rounds.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            print(f"round {r + 1}/{args.rounds}: offline {row['offline_tps']:.1f} tok/s, "
                  f"served {row['shared_tps']:.1f} (x{row['ratio_vs_offline']:.3f}), "
                  f"16 plans {row['mixed_tps']:.1f} (x{row['ratio_mixed_plans']:.3f})", flush=True)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        arrivals = poisson_part(args, {"continuous": port, "dynamic": dport}, bodies, mixed,
                                load_prompts("benign:test"))
    finally:
        for p in (proc, dproc):
            p.terminate()
            p.wait(30)
    batch = {k: float(re.search(rf"^steerable_serve_batch_size_{k} (\S+)$", metrics, re.M).group(1))
             for k in ("sum", "count")}

    def med(k):
        return round(statistics.median(r[k] for r in rounds), 4)

    def spread(k):
        return [round(min(r[k] for r in rounds), 4), round(max(r[k] for r in rounds), 4)]

    result = {
        "model": args.model, "clients": args.clients, "max_tokens": args.max_tokens, "rounds": args.rounds,
        "layers": args.layers, "ratio_vs_offline": med("ratio_vs_offline"),
        "ratio_mixed_plans": med("ratio_mixed_plans"),
        "range_over_rounds": {"ratio_vs_offline": spread("ratio_vs_offline"),
                              "ratio_mixed_plans": spread("ratio_mixed_plans")},
        "targets": {"ratio_vs_offline": 0.8, "ratio_mixed_plans": 0.95},
        "mean_batch_rows": round(batch["sum"] / batch["count"], 2),
        "offline_tps": med("offline_tps"), "served_tps_shared_plan": med("shared_tps"),
        "served_tps_16_plans": med("mixed_tps"),
        "ttft_s": {"p50": round(pct(ttft, 50), 4), "p99": round(pct(ttft, 99), 4)},
        "itl_s": {"p50": round(pct(itl, 50), 4), "p99": round(pct(itl, 99), 4)},
        "identical_to_offline": round(statistics.mean(identical), 4),
        "per_round": rounds,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_start": [round(x, 2) for x in load_avg_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "command": "python bench/serve.py " + " ".join(sys.argv[1:]),
        "poisson": arrivals,
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_round", "poisson")}, indent=2))
    print(json.dumps({k: v for k, v in result["poisson"].items() if k != "per_round"}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
