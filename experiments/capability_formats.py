"""Why do the bundled chat models sit near chance on MMLU? Accuracy per answer format (docs/results.md,
"Capability measure").

For each model: accuracy with a bootstrap 95 % interval per format on the fixed stratified subset
(`--per-subject` items of each of the 57 subjects), each format's paired difference from "letter" on the
same items, the half-width a paired change would have at 1 140 items (20 per subject) from the measured
discordance, and the first greedy tokens the model generates for a few items (what it tries to answer).
Results are merged into OUT after each (model, formats) job, so a run cut short keeps what it finished.

    python experiments/capability_formats.py --model smollm2-135m --formats letter,cue choice-loglik
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

from steerable.evaluate.capability import (
    debiased,
    dev_items,
    format_prompt,
    load_mmlu,
    mc_scores_formats,
    paired_change,
    predicted,
    stratified,
)
from steerable.evaluate.refusal import rate
from steerable.fsutil import write_text_atomic
from steerable.generation import generate
from steerable.models.load import load_model

OUT = Path("experiments/results/capability_formats.json")


def projected_half_width(discordant: float, n: int) -> float:
    """Normal-approximation half-width of a paired 95 % interval of a change at n items, when a fraction
    `discordant` of items change their answer's correctness (the worst case for a given discordance)."""
    return 1.96 * math.sqrt(discordant / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("groups", nargs="+", help="comma-separated formats run as one job, e.g. letter,cue")
    ap.add_argument("--per-subject", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--first-tokens", type=int, default=4, help="items whose greedy opening is recorded")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    handle = load_model(args.model)
    items = stratified(load_mmlu(), args.per_subject)
    pool = dev_items(load_mmlu())
    for group in args.groups:
        formats = group.split(",")
        t0 = time.time()
        scores = mc_scores_formats(handle, items, formats, batch_size=args.batch_size, pool=pool)
        picks = {f: predicted(s) for f, s in scores.items()}
        correct = {f: [p == it.answer for p, it in zip(ps, items, strict=True)] for f, ps in picks.items()}
        unbiased = {f: [p == it.answer for p, it in zip(predicted(debiased(s)), items, strict=True)]
                    for f, s in scores.items()}
        seconds = time.time() - t0
        peek = items[:: max(1, len(items) // args.first_tokens)][: args.first_tokens]
        firsts: dict[str, list[dict[str, Any]]] = {}
        for fmt in formats:
            if fmt.startswith("choice-loglik"):
                continue
            prompts = [format_prompt(it, fmt, pool) for it in peek]
            texts = generate(handle, prompts, max_new_tokens=6, batch_size=len(prompts))
            firsts[fmt] = [{"subject": it.subject, "answer": it.answer, "generated": t}
                           for it, t in zip(peek, texts, strict=True)]
        data = json.loads(args.out.read_text()) if args.out.exists() else {}
        model = data.setdefault(args.model, {"per_subject": args.per_subject, "formats": {}})
        if model["per_subject"] != args.per_subject:
            model.update(per_subject=args.per_subject, formats={})
        for fmt, ok in correct.items():
            model["formats"][fmt] = {"accuracy": rate(ok).to_json(), "correct": [int(c) for c in ok],
                                     "seconds_for_job": round(seconds, 1), "job": group,
                                     "first_tokens": firsts.get(fmt, []),
                                     "picked": {c: picks[fmt].count(c) for c in "ABCD"},
                                     "key": {c: sum(it.answer == c for it in items) for c in "ABCD"},
                                     "debiased_accuracy": rate(unbiased[fmt]).to_json()}
        base = model["formats"].get("letter", {}).get("correct")
        for fmt, rec in model["formats"].items():
            if base is not None and fmt != "letter":
                ch = paired_change([bool(c) for c in rec["correct"]], [bool(c) for c in base])
                disc = sum(a != b for a, b in zip(rec["correct"], base, strict=True)) / len(base)
                rec["vs_letter"] = {**ch.to_json(), "discordant": disc,
                                    "half_width_at_1140": projected_half_width(disc, 1140)}
        write_text_atomic(args.out, json.dumps(data, indent=1) + "\n")
        print(args.model, group, f"{seconds:.0f}s",
              {f: str(rate(ok)) for f, ok in correct.items()}, flush=True)


if __name__ == "__main__":
    main()
