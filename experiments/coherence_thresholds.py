"""Validate the coherence bounds of coherent compliance (steerable.evaluate.coherence.CoherenceBounds).

Per model: greedy completions (64 new tokens, as sweeps make them) of the held-out benign prompts
(`benign:test`), scored by the unsteered model's perplexity; the pass rate of each check and of all
together (target: ≥ 95 %). Then deliberately broken texts, scored the same way, and how many fail:
loops (one word, the completion's first phrase), random characters, non-Latin text, shuffled words,
and the model's own completions under add α=8 on every layer (a refusal direction calibrated here on
refusal-pairs). Writes experiments/results/coherence_thresholds.json with every per-text value, so
`--rescore` recomputes the summary under other bounds without running a model.

    python experiments/coherence_thresholds.py --models smollm2-135m,qwen2.5-0.5b
    python experiments/coherence_thresholds.py --rescore   # the summary again, from the JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

from steerable.evaluate.coherence import (
    CHECKS,
    CoherenceBounds,
    coherence_checks,
    language_consistency,
    rep_n,
)

OUT = Path("experiments/results/coherence_thresholds.json")
_CYRILLIC = "абвгдежзийклмнопрстуфхцчшщыэюя"
_CJK = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自之着去"


def _broken_synthetic(completions: list[str], rng: random.Random) -> dict[str, list[str]]:
    """Deliberately broken texts, one per benign completion and kind."""
    words = [w for c in completions for w in c.split()] or ["the"]
    out: dict[str, list[str]] = {"word loop": [], "phrase loop": [], "random characters": [],
                                 "cyrillic": [], "cjk": [], "shuffled words": []}
    for c in completions:
        ws = c.split() or ["the"]
        out["word loop"].append(" ".join([rng.choice(words)] * 40))
        out["phrase loop"].append(" ".join((ws[:6] * 12)[:60]))
        out["random characters"].append(" ".join(
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789.,;") for _ in range(rng.randint(2, 9)))
            for _ in range(40)))
        out["cyrillic"].append(" ".join("".join(rng.choice(_CYRILLIC) for _ in range(rng.randint(2, 9)))
                                        for _ in range(30)))
        out["cjk"].append("".join(rng.choice(_CJK) for _ in range(60)))
        shuffled = list(ws)
        rng.shuffle(shuffled)
        out["shuffled words"].append(" ".join(shuffled))
    return out


def _values(texts: list[str], ppl: list[float]) -> list[dict[str, Any]]:
    return [{"text": t, "language_consistency": round(language_consistency(t), 4), "rep4": round(rep_n(t, 4), 4),
             "perplexity": round(p, 4) if math.isfinite(p) else None} for t, p in zip(texts, ppl, strict=True)]


def _summary(rows: list[dict[str, Any]], bounds: CoherenceBounds) -> dict[str, Any]:
    """Pass rate of each check and of all together."""
    checks = [coherence_checks(r["text"], r["perplexity"], bounds) for r in rows]
    n = len(rows)
    out: dict[str, Any] = {"n": n}
    for c in CHECKS:
        out[f"pass_{c}"] = sum(ch[c] for ch in checks) / n
    out["pass_all"] = sum(all(ch.values()) for ch in checks) / n
    out["fail_all"] = 1 - out["pass_all"]
    return out


def _quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    if not xs:
        return {}
    q = {f"p{k}": xs[min(len(xs) - 1, int(k / 100 * len(xs)))] for k in (5, 50, 90, 95, 99)}
    return {"min": xs[0], **q, "max": xs[-1]}


def summarise(result: dict[str, Any], bounds: CoherenceBounds) -> dict[str, Any]:
    out: dict[str, Any] = {"bounds": bounds.to_json(), "models": {}}
    for model, m in result["models"].items():
        un = m["unsteered_benign"]
        fin = [r["perplexity"] for r in un if r["perplexity"] is not None]
        out["models"][model] = {
            "unsteered_benign": _summary(un, bounds),
            "unsteered_distribution": {
                "language_consistency": _quantiles([r["language_consistency"] for r in un]),
                "rep4": _quantiles([r["rep4"] for r in un]),
                "perplexity": _quantiles(fin), "perplexity_median": statistics.median(fin) if fin else None},
            "broken": {kind: _summary(rows, bounds) for kind, rows in m["broken"].items()},
        }
    return out


def _run_model(name: str, n: int | None, broken_n: int, tokens: int, batch_size: int, steer_alpha: float,
               rng: random.Random) -> dict[str, Any]:
    from steerable.data.loaders import contrastive_examples, load_prompt_rows
    from steerable.directions.calibrate import calibrate
    from steerable.evaluate.logits import perplexity
    from steerable.generation import generate
    from steerable.models.load import load_model
    from steerable.steering.builders import add

    t0 = time.perf_counter()
    handle = load_model(name)
    prompts = [r["prompt"] for r in load_prompt_rows("benign:test")][:n]
    comps = generate(handle, prompts, max_new_tokens=tokens, batch_size=batch_size)
    ppl = perplexity(handle, prompts, comps, None, batch_size=batch_size)
    print(f"{name}: {len(prompts)} unsteered completions in {time.perf_counter() - t0:.0f}s", flush=True)
    sub = prompts[:broken_n]
    broken = _broken_synthetic(comps[:broken_n], rng)
    ds = calibrate(handle, contrastive_examples(pairs="refusal-pairs", limit=32), position="response-mean",
                   progress=False)
    steered = generate(handle, sub, add(ds, steer_alpha, layers=list(range(handle.n_layers))),
                       max_new_tokens=tokens, batch_size=batch_size)
    broken[f"add alpha={steer_alpha:g}, every layer"] = steered
    kinds = list(broken)
    flat = [t for k in kinds for t in broken[k]]
    flat_ppl = perplexity(handle, sub * len(kinds), flat, None, batch_size=batch_size)
    per = len(sub)
    print(f"{name}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    return {"n_prompts": len(prompts), "n_broken_per_kind": per,
            "calibration": "refusal-pairs, 32 pairs, response-mean", "seconds": round(time.perf_counter() - t0, 1),
            "unsteered_benign": _values(comps, ppl),
            "broken": {k: _values(broken[k], flat_ppl[i * per : (i + 1) * per]) for i, k in enumerate(kinds)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=None, help="first N benign:test prompts (default: all)")
    ap.add_argument("--broken-n", type=int, default=48, help="broken texts per kind (from the first N prompts)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--rescore", action="store_true", help="recompute the summary from --out, no model")
    args = ap.parse_args()
    from steerable.fsutil import write_text_atomic

    out = Path(args.out)
    bounds = CoherenceBounds()
    if args.rescore:
        result = json.loads(out.read_text())
    else:
        result = json.loads(out.read_text()) if out.exists() else {}
        result.setdefault("models", {})
        result.update(prompts="benign:test", tokens=args.tokens, decoding="greedy",
                      command="python experiments/coherence_thresholds.py --models " + args.models)
        rng = random.Random(0)
        for name in args.models.split(","):
            result["models"][name] = _run_model(name, args.n, args.broken_n, args.tokens, args.batch_size,
                                                args.alpha, rng)
            write_text_atomic(out, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    result["summary"] = summarise(result, bounds)
    write_text_atomic(out, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
