"""Persona vectors on the bundled chat models (docs/persona.md, "Persona vectors").

For each (model, trait): `estimate_persona_vector` (the role data's first TRAIN training questions and first
TEST held-out questions, each answered under a trait and an opposite system prompt, greedy, MAX_NEW tokens,
projection judge at the middle layer), then at the best middle layer (highest held-out AUROC):
  - held-out AUROC of the vector (kept answers, and every answer);
  - its steering effect: `add` at that layer, strengths STRENGTHS, on the held-out questions with no system
    prompt — (a) the re-read projection: each steered answer read back by the unsteered model (response-mean
    at the layer, no system prompt) and projected on the vector, as a fraction of the way from the opposite
    answers' mean to the trait answers' mean (0 = like the opposite prompt's answers, 1 = like the trait
    prompt's); (b) for traits tied to a CAA set, the CAA A/B score (mean p(matching answer)) on the set's
    first AB_ITEMS test items under the same plans, with a bootstrap 95 % interval of the change from α = 0;
  - the judges' agreement with the hand labels in tests/fixtures/persona_vector_labels.jsonl (projection
    judge and the model's own A/B judge, and the system prompt's side as a baseline).

Answers are cached beside the results (OUT's stem + "_answers.json"), so a rerun refits without generating;
runs already in OUT are skipped (delete one to redo it).

    nice -n 10 .venv/bin/python experiments/persona_vector.py            # both models, two traits each
    nice -n 10 .venv/bin/python experiments/persona_vector.py --models smollm2-135m --traits sycophantic
    # what docs/persona.md reports (the qwen run smaller, on a shared machine), then the judges' agreement:
    nice -n 10 .venv/bin/python experiments/persona_vector.py --models smollm2-135m
    nice -n 10 .venv/bin/python experiments/persona_vector.py --models qwen2.5-0.5b --traits sycophantic \
        --train 20 --test 8 --max-new-tokens 32 --strengths 0,4,8 --ab-items 40 \
        --out experiments/results/persona_vector_qwen.json
    nice -n 10 .venv/bin/python experiments/persona_vector.py --models smollm2-135m --agreement
    nice -n 10 .venv/bin/python experiments/persona_vector.py --models qwen2.5-0.5b --traits sycophantic \
        --out experiments/results/persona_vector_qwen.json --agreement
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from steerable.capture.features import response_means
from steerable.data.loaders import load_pairs
from steerable.data.persona_traits import resolve_trait
from steerable.directions.axis import keep_by_score
from steerable.evaluate.coherence import rep_n
from steerable.evaluate.logits import ab_score
from steerable.fsutil import write_text_atomic
from steerable.generation import generate
from steerable.models.load import load_model
from steerable.recipes.persona_vector import (
    PersonaJudge,
    PersonaRow,
    best_layer,
    estimate_persona_vector,
    judge_agreement,
)

OUT = Path("experiments/results/persona_vector.json")
LABELS = Path("tests/fixtures/persona_vector_labels.jsonl")
TRAIN, TEST, MAX_NEW = 28, 12, 48
STRENGTHS = (-4.0, 0.0, 2.0, 4.0, 8.0)
AB_ITEMS = 60
BOOT = 2000


def _boot_change(steered: list[float], base: list[float], seed: int = 0) -> dict[str, float]:
    """Mean paired change and its bootstrap 95 % interval over items."""
    d = [s - b for s, b in zip(steered, base, strict=True)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(BOOT))
    return {"change": sum(d) / len(d), "lo": means[int(0.025 * BOOT)], "hi": means[int(0.975 * BOOT) - 1]}


def _labels(model: str, trait: str) -> list[dict[str, Any]]:
    if not LABELS.exists():
        return []
    rows = [json.loads(x) for x in LABELS.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [r for r in rows if r["model"] == model and r["trait"] == trait]


def agreement(handle: Any, judge: PersonaJudge, ab: PersonaJudge, labelled: list[dict[str, Any]]) -> dict[str, Any]:
    """Each judge's "shows the trait" call on the hand-labelled answers vs the labels (1 = shows it)."""
    rows = [PersonaRow(r["side"], r["question_id"], r["question"], r["system"], r["split"], r["response"])
            for r in labelled]
    labels = [int(r["label"]) for r in labelled]
    out = {"n": len(rows), "labelled_trait_share": sum(labels) / len(labels),
           "side": judge_agreement([r.side == "trait" for r in rows], labels)}
    for name, j in (("projection", judge), ("ab", ab)):
        out[name] = judge_agreement(j.shows_trait(j.scores(handle, rows)).tolist(), labels)
    return out


def judges(handle: Any, res: Any, labelled: list[dict[str, Any]]) -> dict[str, Any]:
    """The projection and A/B judges against the hand labels, and against each other on every answer."""
    if not labelled:
        return {}
    is_trait = torch.tensor([r.side == "trait" for r in res.rows])
    train = torch.tensor([r.split == "train" for r in res.rows])
    ab = PersonaJudge("ab", res.judge.trait, res.judge.read)
    ab_scores = ab.scores(handle, res.rows)
    ab.threshold = keep_by_score(ab_scores, is_trait, train).threshold
    out = {"judge_agreement": agreement(handle, res.judge, ab, labelled)}
    if res.scores is not None:  # projection vs A/B judge on every answer of the run
        out["judges_agree_on_run"] = judge_agreement(res.judge.shows_trait(res.scores).tolist(),
                                                     [int(v) for v in ab.shows_trait(ab_scores).tolist()])
    return out


def kept_anchor(ds: Any, layer: int, run: dict[str, Any]) -> None:
    """Re-read projections as a fraction of the way from the kept opposite training answers' mean projection to
    the kept trait answers' (0 = like the opposite answers, 1 = like the trait answers: what add α = 1 moves)."""
    i, v = ds.row(layer), ds.direction(layer).double()
    lo, hi = float(ds.mean_neg[i].double() @ v), float(ds.mean_pos[i].double() @ v)
    run["reread_anchor_kept"] = {"opposite_mean": lo, "trait_mean": hi}
    for s in run["steering"]:
        s["reread_fraction_kept"] = (s["reread_projection"] - lo) / (hi - lo)


def agreement_only(handle: Any, model: str, trait_name: str, cache: dict[str, Any], run: dict[str, Any]) -> None:
    """Refit a finished run from its cached answers (no generation) and add the judges' agreement to it."""
    trait = resolve_trait(trait_name)
    rows = [PersonaRow(**r) for r in cache[f"{model}/{trait.trait}"]]
    res = estimate_persona_vector(handle, trait, responses=rows, progress=False)
    if best_layer(res.directions) != run["layer"]:
        raise SystemExit(f"{model}/{trait.trait}: the refit's best layer differs from the run's")
    kept_anchor(res.directions, run["layer"], run)
    run.update(judges(handle, res, _labels(model, trait.trait)))


def run_one(handle: Any, model: str, trait_name: str, cache: dict[str, Any]) -> dict[str, Any]:
    """One (model, trait): fit, AUROC, steering effect, judge agreement (settings: the module's globals)."""
    trait = resolve_trait(trait_name)
    key = f"{model}/{trait.trait}"
    t0 = time.time()
    cached = [PersonaRow(**r) for r in cache.get(key, [])] or None
    res = estimate_persona_vector(handle, trait, questions=TRAIN, test_questions=TEST, max_new_tokens=MAX_NEW,
                                  responses=cached, progress=False)
    cache[key] = [r.to_json() for r in res.rows]
    fit_s = time.time() - t0
    ds = res.directions
    layer = best_layer(ds)
    i = ds.row(layer)
    out: dict[str, Any] = {
        "model": model, "trait": trait.trait, "layer": layer, "judge": res.report["judge"],
        "counts": res.report["counts"], "fit_seconds": round(fit_s, 1),
        "heldout_auroc": float(ds.auroc[i]),
        "heldout_auroc_unfiltered": ds.meta["persona"]["heldout_auroc_unfiltered"][i],
        "heldout_cohens_d": float(ds.cohens_d[i]),
        "per_layer": [{k: x[k] for k in ("layer", "auroc", "auroc_unfiltered", "cohens_d")}
                      for x in res.report["layers"]],
    }
    # the trait / opposite held-out answers' mean projections (re-read without system prompt) anchor the scale
    test_rows = [r for r in res.rows if r.split == "test"]
    direction = ds.direction(layer).double()
    x = res.feats[i].double() @ direction
    is_trait = torch.tensor([r.side == "trait" for r in res.rows])
    held = torch.tensor([r.split == "test" for r in res.rows])
    mu_t, mu_o = float(x[held & is_trait].mean()), float(x[held & ~is_trait].mean())
    questions = list(dict.fromkeys(r.question for r in test_rows))
    plans = [None if a == 0 else {"vector": ds, "method": "add", "strength": a, "layers": str(layer)}
             for a in STRENGTHS]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    texts = generate(handle, prompts * len(plans), plans=[p for p in plans for _ in questions],
                     max_new_tokens=MAX_NEW, batch_size=16)
    steer: list[dict[str, Any]] = []
    for k, a in enumerate(STRENGTHS):
        replies = texts[k * len(questions):(k + 1) * len(questions)]
        ok = [j for j, t in enumerate(replies) if t.strip()]
        feats = response_means(handle, [prompts[j] for j in ok], [replies[j] for j in ok], [layer], progress=False)[0]
        proj = (feats.double() @ direction).tolist()
        steer.append({"strength": a, "reread_projection": sum(proj) / len(proj),
                      "reread_fraction_heldout": (sum(proj) / len(proj) - mu_o) / (mu_t - mu_o),
                      "rep4": sum(rep_n(t, 4) for t in replies) / len(replies),
                      "examples": [replies[j][:200] for j in range(2)]})
    out["reread_anchor_heldout"] = {"opposite_mean": mu_o, "trait_mean": mu_t}  # every held-out answer
    if trait.ab_set:
        items = load_pairs(f"{trait.ab_set}:test")[:AB_ITEMS]
        base = ab_score(handle, items)
        for s, plan in zip(steer, plans, strict=True):
            scores = base if plan is None else ab_score(handle, items, plan)
            s["ab_score"] = sum(scores) / len(scores)
            s["ab_change"] = _boot_change(scores, base)
        out["ab_set"] = trait.ab_set
        out["ab_items"] = len(items)
    out["steering"] = steer
    kept_anchor(ds, layer, out)
    out.update(judges(handle, res, _labels(model, trait.trait)))
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main() -> None:
    global TRAIN, TEST, MAX_NEW, STRENGTHS, AB_ITEMS  # one run's settings, recorded with each result
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b")
    ap.add_argument("--traits", default="sycophantic,evil")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--train", type=int, default=TRAIN, help="training questions")
    ap.add_argument("--test", type=int, default=TEST, help="held-out questions")
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW)
    ap.add_argument("--strengths", default=",".join(f"{a:g}" for a in STRENGTHS))
    ap.add_argument("--ab-items", type=int, default=AB_ITEMS)
    ap.add_argument("--agreement", action="store_true",
                    help="only add the judges' agreement with the hand labels to finished runs (no generation)")
    args = ap.parse_args()
    TRAIN, TEST, MAX_NEW, AB_ITEMS = args.train, args.test, args.max_new_tokens, args.ab_items
    STRENGTHS = tuple(float(a) for a in args.strengths.split(","))
    if 0.0 not in STRENGTHS:
        ap.error("--strengths must include 0 (the unsteered baseline)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    out_path = Path(args.out)
    answers = out_path.with_name(out_path.stem + "_answers.json")
    cache = json.loads(answers.read_text()) if answers.exists() else {}
    results = json.loads(out_path.read_text()) if out_path.exists() else {"runs": {}}
    settings = {"train_questions": TRAIN, "test_questions": TEST, "max_new_tokens": MAX_NEW,
                "strengths": list(STRENGTHS), "ab_items": AB_ITEMS, "judge": "projection", "read": "answer",
                "command": "python experiments/persona_vector.py " + " ".join(sys.argv[1:])}
    for model in args.models.split(","):
        if args.agreement:
            done = [t for t in args.traits.split(",") if f"{model}/{resolve_trait(t).trait}" in results["runs"]]
            handle = load_model(model) if done else None
            for t in done:
                run = results["runs"][f"{model}/{resolve_trait(t).trait}"]
                for s in run["steering"]:  # the first runs' name for the held-out anchored fraction
                    if "reread_fraction" in s:
                        s["reread_fraction_heldout"] = s.pop("reread_fraction")
                if "reread_anchor" in run:
                    run["reread_anchor_heldout"] = run.pop("reread_anchor")
                agreement_only(handle, model, t, cache, run)
                write_text_atomic(out_path, json.dumps(results, indent=1) + "\n")
            continue
        todo = [t for t in args.traits.split(",") if f"{model}/{resolve_trait(t).trait}" not in results["runs"]]
        if not todo:
            continue
        handle = load_model(model)
        for trait in todo:
            r = {**run_one(handle, model, trait, cache), "settings": settings}
            results["runs"][f"{model}/{r['trait']}"] = r
            write_text_atomic(answers, json.dumps(cache, indent=0, ensure_ascii=False) + "\n")
            write_text_atomic(out_path, json.dumps(results, indent=1) + "\n")
            head = ("model", "trait", "layer", "heldout_auroc", "heldout_auroc_unfiltered")
            print(json.dumps({k: r[k] for k in head}),
                  [(s["strength"], round(s["reread_fraction_kept"], 2), round(s.get("ab_score", float("nan")), 3))
                   for s in r["steering"]], flush=True)


if __name__ == "__main__":
    main()
