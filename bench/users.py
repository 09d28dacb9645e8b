"""Per-user steering (issue 15): serving speed with 16 users in a batch, a 100 000-user library's load cost, and
the ideal-point fit's speed. Writes bench/results/users.json.

1. *Mixed users* (smollm2-135m, float32, CPU): the server's own decode path (`ServerState.build` with
   `--profiles`, requests admitted by `Admission.chat` — parse, tokenise, compose each user's vectors — and
   decoded together by `Engine.run`, the dynamic-batching worker; continuous batching runs the same per-step
   ops) on 16 chat requests of `benign:test`, each from a different user of a synthetic profile library
   ({"profile": "bench", "strength": 1, "layers": "9-15"}, the user from the OpenAI `user` field), against
   the same 16 requests under one shared vector (a preset naming one direction file: the same plan object
   for every row, so its op is a single broadcast vector, not 16 stacked ones). EOS is disabled so that
   every row decodes exactly `--new-tokens` tokens in both arms. ABBA rounds after one warm-up of each, the
   ratio the median of per-round ratios. Beside it, the steering hooks' own cost per decode step for each
   arm, called as a forward pass calls them (bench/overhead.py's `hook_cost_us`), and its share of the
   measured step. Target: ratio ≥ 0.97.
2. *Library load*: a synthetic 100 000-user library (smollm2's d = 576, 7 layers, K = 8) written with
   `save_profiles`; each of `--load-runs` fresh subprocesses imports torch and steerable, then times
   `load_profiles` and reads its resident memory (VmRSS) before and after, and after composing 1 000
   random users' vectors. Targets: load ≤ 1 s, ≤ 50 MB added.
3. *Fit*: `fit_ideal_points` (τ chosen by held-out likelihood, the whole procedure) on synthetic features of
   1 000 users with 3–40 pairs each (L = 7, K = 8), labels drawn from a Bradley–Terry model of known ideal
   points; the recovered points' mean cosine with the true ones is reported as a sanity check. Target ≤ 10 s.

Run: `OMP_WAIT_POLICY=PASSIVE nice -n 5 python bench/users.py`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads ruin timings

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from steerable.directions.profiles import ProfileLibrary, load_profiles, save_profiles

USERS_BATCH = 16
LAYERS = list(range(9, 16))  # 7 layers, as bench/serve.py steers
K = 8


def synthetic_library(d: int, n_users: int, meta_model: dict[str, Any], seed: int = 0,
                      layers: list[int] = LAYERS, k: int = K) -> ProfileLibrary:
    g = torch.Generator().manual_seed(seed)
    n = len(layers)
    basis = torch.linalg.qr(torch.randn(n, d, k, generator=g)).Q.transpose(1, 2).contiguous()
    population = torch.randn(n, d, generator=g)
    population = 2.0 * population / population.norm(dim=1, keepdim=True)
    return ProfileLibrary(
        layers=layers, population=population, basis=basis, phi_mean=0.1 * torch.randn(n, k, generator=g),
        theta_pop=torch.zeros(n, k), users=[f"user{i:06d}" for i in range(n_users)], pair_counts=[20] * n_users,
        theta=torch.randn(n_users, n, k, generator=g), dislike=torch.randn(n_users, n, k, generator=g),
        meta={"model": meta_model, "site": "resid_post", "position": "response-mean",
              "data": {"source": "synthetic (bench/users.py)"}})


# -- 1. 16 users in one batch vs one shared vector ---------------------------------------------------------


def mixed_users(model: str, work: Path, new_tokens: int, rounds: int) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    from overhead import ab_medians, hook_cost_us

    from steerable.data.loaders import load_prompts
    from steerable.directions.artifact import save_directions
    from steerable.directions.calibrate import model_meta
    from steerable.models.load import load_model
    from steerable.serve import schemas
    from steerable.serve.auth import EVERYTHING
    from steerable.serve.config import Limits, ServeConfig
    from steerable.serve.engine import Engine
    from steerable.serve.jobs import Job
    from steerable.serve.metrics import Metrics
    from steerable.serve.server import ServerState

    handle = load_model(model)
    lib = synthetic_library(handle.hidden_size, 1000, model_meta(handle))
    profiles = work / "bench.safetensors"
    save_profiles(lib, profiles)
    vectors, presets = work / "vectors", work / "presets"
    vectors.mkdir(parents=True, exist_ok=True)
    presets.mkdir(parents=True, exist_ok=True)
    shared_ds, _ = lib.direction_set(None)  # the population vector, as a plain direction file
    save_directions(shared_ds, vectors / "shared.safetensors")
    layers = f"{LAYERS[0]}-{LAYERS[-1]}"
    (presets / "shared.json").write_text(json.dumps({"vector": "shared", "strength": 1.0, "layers": layers}))
    state = ServerState.build(handle, ServeConfig(model=model, vectors=vectors, presets=presets,
                                                  profiles=(profiles,), limits=Limits(max_tokens=new_tokens)))
    prompts = load_prompts("benign:test")[:USERS_BATCH]
    users = list(lib.users[:USERS_BATCH])
    personal = {"profile": "bench", "strength": 1.0, "layers": layers}

    def jobs(mixed: bool) -> list[Job]:
        out = []
        for p, u in zip(prompts, users, strict=True):
            body = {"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": new_tokens,
                    "user": u, "steering": personal if mixed else {"preset": "shared"}}
            req = schemas.parse(body, chat=True)
            assert isinstance(req, schemas.ChatRequest)
            admitted = state.admission.chat(req, EVERYTHING)
            out.append(admitted.job)
        return out

    t = time.perf_counter()
    mixed_jobs = jobs(True)
    admit_s = time.perf_counter() - t
    assert all(j.plan is not None and not j.plan.profile_fallback for j in mixed_jobs)
    assert len({id(j.plan.interventions[0].vectors) for j in mixed_jobs if j.plan}) == USERS_BATCH
    shared_jobs = jobs(False)
    assert len({id(j.plan) for j in shared_jobs}) == 1  # one plan object: one broadcast vector per layer

    engine = Engine(handle, Metrics())
    engine.eos = set()  # every row decodes exactly new_tokens tokens, in both arms
    seconds: dict[bool, list[float]] = {True: [], False: []}

    def decode(batch: list[Job]) -> float:
        t = time.perf_counter()
        engine.run(batch, lambda _events: None)
        return time.perf_counter() - t

    def run(mixed: bool) -> float:
        dt = decode(jobs(mixed))
        seconds[mixed].append(dt)
        return USERS_BATCH * new_tokens / dt

    m, s, ratio = ab_medians(run, True, False, rounds)  # run(True): mixed users; run(False): shared vector
    # one decode step, for the hooks' share: a run's time less its prefill (a one-token run), per token after
    def one_token() -> list[Job]:
        batch = jobs(False)
        for j in batch:
            j.max_tokens = 1
        return batch

    prefill = statistics.median(decode(one_token()) for _ in range(3))
    step_s = (statistics.median(seconds[False]) - prefill) / (new_tokens - 1)
    hook_mixed = hook_cost_us(handle, rows=[j.plan for j in mixed_jobs], batch=USERS_BATCH)
    hook_shared = hook_cost_us(handle, rows=[j.plan for j in shared_jobs], batch=USERS_BATCH)
    return {
        "model": model, "batch": USERS_BATCH, "new_tokens": new_tokens, "rounds": rounds, "layers": layers,
        "mixed_users_tps": round(m, 2), "shared_vector_tps": round(s, 2), "ratio": round(ratio, 4),
        "target": ">= 0.97", "met": ratio >= 0.97,
        "decode_step_ms": round(step_s * 1e3, 2), "prefill_ms": round(prefill * 1e3, 1),
        "per_round_s": {"mixed_users": [round(x, 3) for x in seconds[True]],
                        "shared_vector": [round(x, 3) for x in seconds[False]]},
        "hook_us_per_step": {"mixed_users": round(hook_mixed, 1), "shared_vector": round(hook_shared, 1),
                             "difference": round(hook_mixed - hook_shared, 1)},
        "hook_share_of_step": {"mixed_users": round(hook_mixed * 1e-6 / step_s, 5),
                               "shared_vector": round(hook_shared * 1e-6 / step_s, 5)},
        "admission_ms_per_request_cold": round(admit_s / USERS_BATCH * 1e3, 2),
    }


# -- 2. a 100 000-user library's load time and memory ------------------------------------------------------


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def load_child(path: str) -> None:
    """In a fresh process: RSS before and after `load_profiles`, and after composing 1 000 users' vectors."""
    import gc
    import random

    torch.zeros(1).sum()  # torch's own lazy allocations before the baseline
    gc.collect()
    before, before_anon = _rss_mb(), _rss_mb("RssAnon")
    t = time.perf_counter()
    lib = load_profiles(path)
    load_s = time.perf_counter() - t
    loaded, loaded_anon = _rss_mb(), _rss_mb("RssAnon")
    rng = random.Random(0)
    t = time.perf_counter()
    for u in rng.sample(list(lib.users), 1000):
        lib.direction_set(u)
    compose_ms = (time.perf_counter() - t) / 1000 * 1e3
    gc.collect()
    print(json.dumps({"load_s": load_s, "rss_before_mb": before, "rss_loaded_mb": loaded,
                      "rss_after_1000_users_mb": _rss_mb(), "compose_ms_per_user": compose_ms,
                      "anon_added_loaded_mb": loaded_anon - before_anon,
                      "anon_added_after_1000_users_mb": _rss_mb("RssAnon") - before_anon,
                      "users": len(lib), "k": lib.k, "layers": len(lib.layers)}))


def library_load(work: Path, runs: int, n_users: int) -> dict[str, Any]:
    path = work / "users100k.safetensors"
    meta = {"name": "smollm2-135m (synthetic)", "hidden_size": 576, "n_layers": 30}
    t = time.perf_counter()
    save_profiles(synthetic_library(576, n_users, meta, seed=1), path)
    write_s = time.perf_counter() - t
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, __file__, "--load-child", str(path)], check=True, capture_output=True,
                             text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    load_s = statistics.median(r["load_s"] for r in results)
    added = statistics.median(r["rss_loaded_mb"] - r["rss_before_mb"] for r in results)
    added_after = statistics.median(r["rss_after_1000_users_mb"] - r["rss_before_mb"] for r in results)
    return {
        "users": n_users, "d": 576, "layers": len(LAYERS), "k": K, "file_mb": round(path.stat().st_size / 2**20, 1),
        "write_s": round(write_s, 2), "runs": runs,
        "load_s": round(load_s, 4), "load_s_max": round(max(r["load_s"] for r in results), 4),
        "rss_added_mb": round(added, 1), "rss_added_mb_max": round(max(r["rss_loaded_mb"] - r["rss_before_mb"]
                                                                       for r in results), 1),
        "rss_added_after_1000_compositions_mb": round(added_after, 1),
        # of which anonymous (the rest is the file's pages mapped in by reading rows: page cache)
        "anon_added_mb": round(statistics.median(r["anon_added_loaded_mb"] for r in results), 1),
        "anon_added_after_1000_compositions_mb": round(statistics.median(r["anon_added_after_1000_users_mb"]
                                                                         for r in results), 1),
        "compose_ms_per_user": round(statistics.median(r["compose_ms_per_user"] for r in results), 3),
        "target": "load <= 1 s, <= 50 MB added", "met": load_s <= 1.0 and added <= 50.0,
    }


# -- 3. fitting 1 000 users' ideal points ------------------------------------------------------------------


def fit_speed(n_users: int, runs: int, seed: int = 0) -> dict[str, Any]:
    from steerable.directions.ideal_points import dislike_weights, fit_ideal_points, log_odds

    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(3, 41, (n_users,), generator=g)
    user_index = torch.repeat_interleave(torch.arange(n_users), counts)
    p, n = int(counts.sum()), len(LAYERS)
    # the same ideal point and response features at every layer up to small per-layer noise, so that each
    # layer's fit sees the whole signal of a pair's one label
    true = (torch.randn(n_users, 1, K, generator=g) + 0.1 * torch.randn(n_users, n, K, generator=g)) / K ** 0.5
    phi_a = torch.randn(p, 1, K, generator=g) + 0.1 * torch.randn(p, n, K, generator=g)
    phi_b = torch.randn(p, 1, K, generator=g) + 0.1 * torch.randn(p, n, K, generator=g)
    # one Bradley-Terry label per pair, from the mean over layers of the user's log-odds
    z = log_odds(true[user_index], phi_a, phi_b).mean(1)
    a_wins = torch.rand(p, generator=g, dtype=torch.float64) < torch.sigmoid(z)
    chosen = torch.where(a_wins[:, None, None], phi_a, phi_b)
    rejected = torch.where(a_wins[:, None, None], phi_b, phi_a)
    times, cpu, fit = [], [], None
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        fit = fit_ideal_points(chosen, rejected, user_index, n_users)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    assert fit is not None
    t = time.perf_counter()
    dislike_weights(chosen, rejected, user_index, n_users)
    dislike_s = time.perf_counter() - t
    cos = torch.nn.functional.cosine_similarity(fit.theta.double(), true.double(), dim=-1)
    many = counts >= 20
    fit_s = statistics.median(times)
    return {"users": n_users, "pairs": p, "pairs_per_user": "3-40 (uniform)", "layers": n, "k": K, "runs": runs,
            "fit_s": round(fit_s, 3), "fit_s_max": round(max(times), 3),
            # process CPU time of all threads: a wall time well above it means the machine was contended
            "fit_cpu_s": round(statistics.median(cpu), 3), "dislike_weights_s": round(dislike_s, 4),
            "tau": [round(float(x), 4) for x in fit.tau], "recovery_cosine_mean": round(float(cos.mean()), 3),
            "recovery_cosine_mean_20plus_pairs": round(float(cos[many].mean()), 3),
            "label_agreement_with_sign": round(float(((z > 0) == a_wins).double().mean()), 3),
            "target": "<= 10 s", "met": fit_s <= 10.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--load-runs", type=int, default=3)
    ap.add_argument("--library-users", type=int, default=100_000)
    ap.add_argument("--fit-users", type=int, default=1000)
    ap.add_argument("--fit-runs", type=int, default=3)
    ap.add_argument("--parts", default="mixed,load,fit")
    ap.add_argument("--out", default="bench/results/users.json")
    ap.add_argument("--load-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_child:
        load_child(args.load_child)
        return
    from steerable.fsutil import write_text_atomic

    torch.manual_seed(0)
    parts = args.parts.split(",")
    command = "OMP_WAIT_POLICY=PASSIVE nice -n 5 python bench/users.py " + " ".join(sys.argv[1:])
    out: dict[str, Any] = {"command": command.strip(),
                           "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                       "python": platform.python_version(), "torch": torch.__version__,
                                       "load_average_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="bench-users-") as tmp:
        work = Path(tmp)
        if "fit" in parts:
            out["fit"] = fit_speed(args.fit_users, args.fit_runs)
            print("fit", out["fit"], flush=True)
        if "load" in parts:
            out["library_load"] = library_load(work, args.load_runs, args.library_users)
            print("load", out["library_load"], flush=True)
        if "mixed" in parts:
            out["mixed_users"] = mixed_users(args.model, work, args.new_tokens, args.rounds)
            print("mixed", out["mixed_users"], flush=True)
    out["machine"]["load_average_end"] = os.getloadavg()
    # parts not rerun keep their earlier result (each part records its own command and machine load)
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    for key, part in (("fit", "fit"), ("library_load", "load"), ("mixed_users", "mixed")):
        if part not in parts and key in previous:
            out[key] = {**previous[key], "from_earlier_run": previous.get("command"),
                        "earlier_machine": previous.get("earlier_machine", previous.get("machine"))}
    write_text_atomic(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
