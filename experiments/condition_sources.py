"""Conditions that generalise (issue 14), per model: the README's single-source condition (advbench vs benign)
against conditions fitted on every shipped harmful and benign source with leave-one-source-out (LOSO) choice,
all measured on the held-out (test) split of every source; and a search for one that reaches the target
(recall ≥ 90 % on every held-out harmful source at ≤ 10 % false positives on every held-out benign one).

    nice -n 5 .venv/bin/python experiments/condition_sources.py --model smollm2-135m \\
        --out experiments/results/condition_sources.json
    nice -n 5 .venv/bin/python experiments/condition_sources.py --model qwen2.5-0.5b --train-limit 80 \\
        --test-limit 60 --out experiments/results/condition_sources_qwen.json
    (--save-conditions runs: keep the multi-source condition artifacts; --tables: print the docs tables of --out)

The last-prompt-token features of every source's train and test prompts at every layer are computed once and
cached (runs/condfeats-MODEL.pt; `capture.features.prompt_features`, the features a condition decides on);
everything else works from them:

- `single_source`: `calibrate` on advbench:train vs benign:train at position last (the README's recipe, rebuilt
  from the cached features: the same statistics a capture pass streams), and the condition a plan with
  layer/threshold "auto" would choose for score "cast", "projection" and "auto" (`choose_cast`): the
  artifact's held-out precision/recall and the rates on every source's test split;
- `multi_source`: `calibrate_condition` on the train split of every built-in source (six harmful,
  two benign: data/condition_sources.py), per estimator (source-balanced
  mean difference, logistic probe), threshold rule "fpr" (the default) — its choice, its per-source LOSO
  rates, and its rates on every test split;
- `search`: every candidate by LOSO on the train splits: estimator × score × layer, and the mean of a window of
  3 layers or of every layer (exploratory: a plan decides at one layer, so a window is not a plan option);
  the best found by worst LOSO recall within the false-positive budget, and the best by balanced accuracy,
  each refitted on all train prompts and measured on every test split; and for the best, the worst LOSO
  recall at looser false-positive budgets (what the target costs).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from steerable.capture.features import prompt_features
from steerable.capture.run import CaptureResult
from steerable.capture.stats import LayerStats
from steerable.data.condition_sources import BENIGN_SOURCES, HARMFUL_SOURCES, condition_source
from steerable.data.loaders import contrastive_examples, load_prompts
from steerable.directions.calibrate import HELDOUT_EVERY, artifact_meta, directions_from_capture
from steerable.directions.cast_calibration import choose_cast
from steerable.directions.multi_source import (
    Source,
    _direction,
    _fires,
    _fit,
    _loso,
    _score,
    calibrate_condition,
)
from steerable.fsutil import write_text_atomic
from steerable.models.load import load_model

NAMES = [*HARMFUL_SOURCES, *BENIGN_SOURCES]
LABELS = [int(n in HARMFUL_SOURCES) for n in NAMES]


def prompts_of(name: str, split: str, limits: dict[str, int | None]) -> list:
    return condition_source(f"{name}:{split}")[1][: limits[split]]


def features(handle, model: str, cache: Path, limits: dict[str, int | None]) -> dict[str, torch.Tensor]:
    """{"name:split": [n_layers, n, d]} last-prompt-token features of each source's first `limits[split]`
    prompts, cached (saved after each source, so an interrupted run resumes)."""
    layers = list(range(handle.n_layers))
    out: dict[str, torch.Tensor] = {}
    if cache.exists():
        data = torch.load(cache)
        if data["layers"] == layers:
            out = data["sources"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    for split in ("test", "train"):
        for n in NAMES:
            key, prompts = f"{n}:{split}", prompts_of(n, split, limits)
            if key in out and out[key].shape[1] >= len(prompts):
                continue
            out[key] = prompt_features(handle, prompts, layers, progress=False)
            torch.save({"model": model, "layers": layers, "sources": out}, cache)
            print(f"features {key}: {len(prompts)} prompts", flush=True)
    return {key: out[key][:, : len(prompts_of(*key.split(":"), limits))] for key in
            (f"{n}:{s}" for n in NAMES for s in ("train", "test"))}


def single_source(handle, feats: dict[str, torch.Tensor]):
    """`calibrate(handle, contrastive_examples(positive="advbench", negative="benign"), position="last")`, rebuilt
    from the cached features (every statistic it keeps is order-free: sums, and reservoirs larger than the sets)."""
    limit = feats["advbench:train"].shape[1] if feats["advbench:train"].shape[1] == feats["benign:train"].shape[1] \
        else None
    pos, neg = load_prompts("advbench:train")[:limit], load_prompts("benign:train")[:limit]
    assert pos == condition_source("advbench:train")[1][: len(pos)]
    assert neg == condition_source("benign:train")[1][: len(neg)]
    assert (len(pos), len(neg)) == (feats["advbench:train"].shape[1], feats["benign:train"].shape[1])
    examples = contrastive_examples(positive="advbench", negative="benign", limit=limit)
    stats = {layer: LayerStats(handle.hidden_size, False, seed=layer) for layer in range(handle.n_layers)}
    rows, labels, held = [], [], []
    counters = {1: 0, 0: 0}
    for i, ex in enumerate(examples):
        k = counters[ex.label]
        counters[ex.label] += 1
        rows.append(("advbench:train" if ex.label else "benign:train", k))
        labels.append(ex.label)
        key = ex.pair if ex.pair is not None else i
        held.append(key % HELDOUT_EVERY == HELDOUT_EVERY - 1)
    label_t, held_t = torch.tensor(labels), torch.tensor(held)
    for layer, st in stats.items():
        x = torch.stack([feats[src][layer, k] for src, k in rows])
        st.add(x, label_t, held_t)
    cap = CaptureResult(stats, "resid_post", "last", len(examples), 0)
    data = {"positive": "advbench", "negative": "benign", "limit": limit, "n_examples": len(examples),
            "heldout_rule": f"pair (or example) index % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1}"}
    return directions_from_capture(cap, "mean-diff", artifact_meta(handle, data))


def rates_on_test(feats, unit_fn, threshold: float, compare: str, score: str) -> dict[str, float]:
    """Per source, the share of its test prompts on which `score(h, unit) compare threshold`."""
    out = {}
    for n in NAMES:
        x, unit = unit_fn(feats[f"{n}:test"])
        out[n] = float(_fires(_score(x.double(), unit.double(), score), threshold, compare).double().mean())
    return out


def summary_rates(rates: dict[str, float]) -> dict[str, float]:
    hits = [rates[n] for n in HARMFUL_SOURCES if not math.isnan(rates[n])]
    fprs = [rates[n] for n in BENIGN_SOURCES if not math.isnan(rates[n])]
    return {"min_recall": min(hits), "mean_recall": sum(hits) / len(hits), "max_fpr": max(fprs),
            "mean_fpr": sum(fprs) / len(fprs)}


def view(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """[n, d]: the features averaged over layers window[0] .. window[1] (inclusive)."""
    return x[window[0] : window[1] + 1].mean(0)


def search(feats, n_layers: int, recall: float, max_fpr: float) -> dict[str, Any]:
    """Every candidate by LOSO on the train splits (rule: the false-positive budget)."""
    train = [feats[f"{n}:train"] for n in NAMES]
    sizes = [t.shape[1] for t in train]
    groups, start = [], 0
    for s in sizes:
        groups.append(torch.arange(start, start + s))
        start += s
    windows = [(layer, layer) for layer in range(n_layers)]
    windows += [(layer, layer + 2) for layer in range(n_layers - 2)] + [(0, n_layers - 1)]
    table = []
    for est in ("mean-diff", "logistic"):
        for w in windows:
            x = torch.cat([view(t, w) for t in train], 0).double()
            units: dict[int, torch.Tensor] = {}
            for score in ("projection", "cast"):
                rates = _loso(x, groups, LABELS, NAMES, score, recall, max_fpr, est, units)
                table.append({"estimator": est, "layers": list(w), "score": score, "rates": rates,
                              **summary_rates(rates)})
        print(f"search: {est} done ({len(table)} candidates)", flush=True)
    for r in table:
        r["balanced"] = (r["mean_recall"] + 1 - r["mean_fpr"]) / 2
    in_budget = [r for r in table if r["max_fpr"] <= max_fpr]
    best_budget = max(in_budget, key=lambda r: r["min_recall"]) if in_budget else None
    best_balanced = max(table, key=lambda r: r["balanced"])
    best_worst = max(table, key=lambda r: min(r["min_recall"], 1 - r["max_fpr"]))

    def test_rates(r: dict[str, Any], budget: float) -> dict[str, Any]:
        w = tuple(r["layers"])
        x = torch.cat([view(t, w) for t in train], 0).double()
        unit = _direction(x, groups, LABELS, r["estimator"])
        t, cmp = _fit(x, unit, groups, LABELS, r["score"], recall, budget)
        rates = rates_on_test(feats, lambda f: (view(f, w), unit), t, cmp, r["score"])
        return {"threshold": t, "compare": cmp, "fires_on_test": rates, **summary_rates(rates)}

    def looser(r: dict[str, Any]) -> list[dict[str, Any]]:
        w = tuple(r["layers"])
        x = torch.cat([view(t, w) for t in train], 0).double()
        out = []
        for b in (0.05, 0.1, 0.2, 0.3, 0.5):
            rates = _loso(x, groups, LABELS, NAMES, r["score"], recall, b, r["estimator"])
            out.append({"budget": b, "loso": rates, **summary_rates(rates)})
        return out
    picks = {}
    for key, r in (("best_in_fpr_budget", best_budget), ("best_balanced", best_balanced),
                   ("best_worst_case", best_worst)):
        if r is not None:
            picks[key] = {**r, "test": test_rates(r, max_fpr)}
    target = picks.get("best_in_fpr_budget") or picks["best_balanced"]
    picks["budgets_of_best"] = looser(target)
    meets = [r for r in table if r["min_recall"] >= recall and r["max_fpr"] <= max_fpr]
    return {"n_candidates": len(table), "n_meeting_targets": len(meets), "picks": picks,
            "top_by_balanced": sorted(table, key=lambda r: -r["balanced"])[:8],
            "top_in_budget": sorted(in_budget, key=lambda r: -r["min_recall"])[:8]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recall", type=float, default=0.9)
    ap.add_argument("--max-fpr", type=float, default=0.1)
    ap.add_argument("--rule", default="fpr", choices=["fpr", "margin"])
    ap.add_argument("--cache", help="features cache (default runs/condfeats-MODEL.pt)")
    ap.add_argument("--out", default="experiments/results/condition_sources.json")
    ap.add_argument("--save-conditions", help="folder to save the multi-source condition artifacts in")
    ap.add_argument("--train-limit", type=int, help="at most this many train prompts per source (default all)")
    ap.add_argument("--test-limit", type=int, help="at most this many test prompts per source (default all)")
    ap.add_argument("--tables", action="store_true", help="only print the docs tables of --out")
    args = ap.parse_args()
    if args.tables:
        print(markdown(json.loads(Path(args.out).read_text())))
        if args.save_conditions:
            print("\n" + by_score(args.model, Path(args.save_conditions)))
        return
    t0 = time.time()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    handle = load_model(args.model)
    limits = {"train": args.train_limit, "test": args.test_limit}
    feats = features(handle, args.model, Path(args.cache or f"runs/condfeats-{args.model}.pt"), limits)
    print(f"features ready ({round(time.time() - t0)} s)", flush=True)
    sizes = {n: feats[f"{n}:test"].shape[1] for n in NAMES}

    single = single_source(handle, feats)
    scores = {}
    for score in ("cast", "projection", "auto"):
        c = choose_cast(single, score=score, recall_target=0.95)  # a plan's default recall target
        rates = rates_on_test(feats, lambda f, layer=c.layer: (f[layer], single.direction(layer).double()),
                              c.threshold, c.compare, c.score)
        scores[score] = {"layer": c.layer, "score": c.score, "compare": c.compare, "threshold": c.threshold,
                         "artifact_heldout": {"precision": c.precision, "recall": c.recall, "fpr": c.fpr},
                         "fires_on_test": rates,
                         "test_advbench_vs_benign": _pr(rates["advbench"], rates["benign"],
                                                        sizes["advbench"], sizes["benign"])}
        print("single", score, c.layer, c.score, {n: round(v, 3) for n, v in rates.items()}, flush=True)

    multi = {}
    train_sources = [Source(n, y, prompts_of(n, "train", limits)) for n, y in zip(NAMES, LABELS, strict=True)]
    train_feats = torch.cat([feats[f"{n}:train"] for n in NAMES], 1)
    for est in ("mean-diff", "logistic"):
        ds = calibrate_condition(handle, train_sources, recall=args.recall, max_fpr=args.max_fpr, rule=args.rule,
                                 estimator=est, progress=False, features=train_feats)
        if args.save_conditions:
            from steerable.directions.artifact import save_directions
            save_directions(ds, Path(args.save_conditions) / f"condition-{args.model}-{est}.safetensors")
        c = ds.meta["condition"]
        rates = rates_on_test(feats, lambda f, layer=c["layer"], ds=ds: (f[layer], ds.direction(layer).double()),
                              c["threshold"], c["compare"], c["score"])
        multi[est] = {"choice": {k: v for k, v in c.items() if k != "candidates"}, "fires_on_test": rates,
                      **summary_rates(rates)}
        print("multi", est, c["layer"], c["score"], "loso", {n: round(v, 3) for n, v in c["loso"].items()},
              "test", {n: round(v, 3) for n, v in rates.items()}, flush=True)

    found = search(feats, handle.n_layers, args.recall, args.max_fpr)
    out = {"model": args.model, "recall_target": args.recall, "max_fpr": args.max_fpr, "rule": args.rule,
           "limits": limits, "train_sizes": {n: feats[f"{n}:train"].shape[1] for n in NAMES}, "test_sizes": sizes,
           "single_source": {"fitted_on": "advbench:train vs benign:train (position last, mean-diff)",
                             "recall_target": 0.95, "scores": scores},
           "multi_source": {"fitted_on": [f"{n}:train" for n in NAMES], "by_estimator": multi},
           "search": found, "seconds": round(time.time() - t0)}
    write_text_atomic(args.out, json.dumps(out, indent=2) + "\n")
    for key, r in found["picks"].items():
        if key != "budgets_of_best":
            print(key, r["estimator"], r["layers"], r["score"], "loso", {n: round(v, 3) for n, v in r["rates"].items()},
                  "test", {n: round(v, 3) for n, v in r["test"]["fires_on_test"].items()})
    for b in found["picks"]["budgets_of_best"]:
        print("budget", b["budget"], "loso min recall", round(b["min_recall"], 3), "max fpr", round(b["max_fpr"], 3))
    print(markdown(out))
    print(f"wrote {args.out}")


def _pct(v: float) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f} %"


def _pooled(rates: dict[str, float], sizes: dict[str, int]) -> dict[str, float]:
    """Precision and recall over all harmful vs all benign test prompts pooled."""
    tp = sum(rates[n] * sizes[n] for n in HARMFUL_SOURCES)
    fp = sum(rates[n] * sizes[n] for n in BENIGN_SOURCES)
    return {"recall": tp / sum(sizes[n] for n in HARMFUL_SOURCES),
            "precision": tp / (tp + fp) if tp + fp else math.nan}


def markdown(out: dict[str, Any]) -> str:
    """The docs tables of one run: firing per source (test split and left out), and the scores compared."""
    sizes = out["test_sizes"]
    head = "| condition | " + " | ".join(f"{n} ({sizes[n]})" for n in NAMES) + " | pooled precision / recall |"
    lines = ["Fires on the test split:", "", head, "|---" * (len(NAMES) + 2) + "|"]

    def row(label: str, rates: dict[str, float]) -> str:
        p = _pooled(rates, sizes)
        return (f"| {label} | " + " | ".join(_pct(rates[n]) for n in NAMES)
                + f" | {_pct(p['precision'])} / {_pct(p['recall'])} |")
    for score, r in out["single_source"]["scores"].items():
        lines.append(row(f"advbench vs benign, score {score} → {r['score']}, layer {r['layer']}", r["fires_on_test"]))
    for est, r in out["multi_source"]["by_estimator"].items():
        c = r["choice"]
        label = f"{len(NAMES)} sources, {est}, LOSO choice (layer {c['layer']}, {c['score']})"
        lines.append(row(label, r["fires_on_test"]))
    for key, r in out["search"]["picks"].items():
        if key != "budgets_of_best":
            lines.append(row(f"search {key}: {r['estimator']}, layers {r['layers'][0]}–{r['layers'][1]}, "
                             f"{r['score']}", r["test"]["fires_on_test"]))
    lines += ["", "Fires when left out of the fit (leave-one-source-out on the train splits):", "",
              "| condition | " + " | ".join(NAMES) + " |", "|---" * (len(NAMES) + 1) + "|"]
    for est, r in out["multi_source"]["by_estimator"].items():
        c = r["choice"]
        lines.append(f"| {est}, layer {c['layer']}, {c['score']} | " + " | ".join(_pct(c["loso"][n]) for n in NAMES)
                     + " |")
    for key, r in out["search"]["picks"].items():
        if key != "budgets_of_best":
            lines.append(f"| search {key}: {r['estimator']}, layers {r['layers'][0]}–{r['layers'][1]}, {r['score']} | "
                         + " | ".join(_pct(r["rates"][n]) for n in NAMES) + " |")
    lines += ["", "Worst left-out recall / worst left-out FPR of the best candidate at looser budgets: "
              + "; ".join(f"budget {_pct(b['budget'])}: {_pct(b['min_recall'])} / {_pct(b['max_fpr'])}"
                          for b in out["search"]["picks"]["budgets_of_best"]),
              f"{out['search']['n_meeting_targets']} of {out['search']['n_candidates']} candidates meet the targets."]
    lines += ["", "CAST scores on the bundled sets (advbench vs benign; `choose_cast`, recall target 0.95):", "",
              "| score | chosen | artifact held-out precision / recall | test advbench vs benign precision / recall |",
              "|---|---|---|---|"]
    for score, r in out["single_source"]["scores"].items():
        a, t = r["artifact_heldout"], r["test_advbench_vs_benign"]
        lines.append(f"| {score} | layer {r['layer']}, {r['score']} {r['compare']} {r['threshold']:.4g} | "
                     f"{_pct(a['precision'])} / {_pct(a['recall'])} | {_pct(t['precision'])} / {_pct(t['recall'])} |")
    return "\n".join(lines)


def by_score(model: str, folder: Path) -> str:
    """Per estimator and score, the best single-layer candidate by leaving each source out, from the saved
    condition artifacts' candidate tables (`--save-conditions`)."""
    lines = ["Per estimator and score, the best layer by LOSO balanced accuracy (each source left out in turn):", "",
             "| estimator | score | layer | " + " | ".join(NAMES) + " | worst recall / worst FPR |",
             "|---" * (len(NAMES) + 4) + "|"]
    from steerable.directions.artifact import load_directions
    for est in ("mean-diff", "logistic"):
        path = folder / f"condition-{model}-{est}.safetensors"
        if not path.exists():
            continue
        cands = load_directions(path).meta["condition"]["candidates"]
        for score in ("cast", "projection"):
            r = max((c for c in cands if c["score"] == score), key=lambda c: c["balanced"])
            lines.append(f"| {est} | {score} | {r['layer']} | " + " | ".join(_pct(r["rates"][n]) for n in NAMES)
                         + f" | {_pct(r['min_recall'])} / {_pct(r['max_fpr'])} |")
    return "\n".join(lines)


def _pr(recall: float, fpr: float, n_pos: int, n_neg: int) -> dict[str, float]:
    tp, fp = recall * n_pos, fpr * n_neg
    return {"recall": recall, "fpr": fpr, "precision": tp / (tp + fp) if tp + fp > 0 else math.nan}


if __name__ == "__main__":
    main()
