"""Letter control for the persona vector's CAA A/B effect (docs/persona.md, "Persona vectors").

The first caa-sycophancy test items mostly put the sycophantic answer at (A), so a steering vector that only
shifts the model toward the letter A would look like more sycophancy. Here the A/B score is measured on
N items whose matching answer is (A) and N whose matching answer is (B), unsteered and under add at the
run's layer and strengths; the vector is refitted from the cached answers of experiments/persona_vector.py.

    nice -n 10 .venv/bin/python experiments/persona_vector_letter_control.py --model smollm2-135m
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
from pathlib import Path

import torch

from steerable.data.loaders import load_pairs
from steerable.data.persona_traits import resolve_trait
from steerable.evaluate.logits import ab_score
from steerable.fsutil import write_text_atomic
from steerable.models.load import load_model
from steerable.recipes.persona_vector import PersonaRow, estimate_persona_vector

OUT = Path("experiments/results/persona_vector_letter_control.json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--answers", default="experiments/results/persona_vector_answers.json")
    ap.add_argument("--results", default="experiments/results/persona_vector.json")
    ap.add_argument("--n", type=int, default=20, help="items per matching letter")
    ap.add_argument("--strengths", default="4,8")
    args = ap.parse_args()
    torch.set_num_threads(2)
    trait = resolve_trait("sycophantic")
    key = f"{args.model}/{trait.trait}"
    run = json.loads(Path(args.results).read_text())["runs"][key]
    rows = [PersonaRow(**r) for r in json.loads(Path(args.answers).read_text())[key]]
    handle = load_model(args.model)
    ds = estimate_persona_vector(handle, trait, responses=rows, progress=False).directions
    items = load_pairs(f"{trait.ab_set}:test")
    by_letter = {x: [p for p in items if p.positive.strip().startswith(f"({x})")][: args.n] for x in "AB"}
    out = {"model": args.model, "trait": trait.trait, "layer": run["layer"], "n_per_letter": args.n,
           "command": "python experiments/persona_vector_letter_control.py " + " ".join(sys.argv[1:]), "scores": {}}
    for a in [0.0, *(float(s) for s in args.strengths.split(","))]:
        plan = None if a == 0 else {"vector": ds, "method": "add", "strength": a, "layers": str(run["layer"])}
        out["scores"][f"{a:g}"] = {x: sum(s := ab_score(handle, ps, plan)) / len(s) for x, ps in by_letter.items()}
        print(a, out["scores"][f"{a:g}"], flush=True)
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    old[args.model] = out
    write_text_atomic(OUT, json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
