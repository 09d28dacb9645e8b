"""Implementations of the CLI subcommands: parse flags → call the library → print/write results."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

from steerable.cli.table import fmt, table
from steerable.data.loaders import PAIR_SETS, PROMPT_SETS, contrastive_examples, load_prompt_rows
from steerable.data.sources import DATA_FILES, data_file
from steerable.directions.artifact import DirectionSet, layer_ranges, load_directions, save_directions
from steerable.directions.calibrate import calibrate
from steerable.directions.condition import choose_condition
from steerable.directions.gguf_cv import export_control_vector, import_control_vector
from steerable.directions.layers import cosine_matrix, discriminative_layers, global_direction, top_layers
from steerable.errors import SteerableError
from steerable.fsutil import atomic_path
from steerable.models.builtin import BUILTIN_MODELS
from steerable.models.load import builtin_checkpoint, load_model
from steerable.steering.plan import parse_layers, read_plan_file


def cmd_fetch(args: argparse.Namespace) -> int:
    for name in args.models:
        if name not in BUILTIN_MODELS:
            raise SteerableError(f"unknown built-in model {name!r}: use one of {', '.join(BUILTIN_MODELS)}")
        print(f"{name}: {builtin_checkpoint(name)}")
    if args.data:
        for name in DATA_FILES:
            data_file(name)
        print(f"data: {len(DATA_FILES)} files cached")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    handle = load_model(args.model)
    examples = contrastive_examples(positive=args.positive, negative=args.negative, pairs=args.pairs,
                                    limit=args.limit)
    if not examples:
        raise SteerableError("no calibration examples")
    layers = None if args.layers is None else parse_layers(args.layers, handle.n_layers, range(handle.n_layers))
    data = {"positive": args.positive, "negative": args.negative, "pairs": args.pairs, "limit": args.limit}
    ds = calibrate(handle, examples, estimator=args.estimator, layers=layers, site=args.site,
                   position=args.position, batch_size=args.batch_size,
                   data={k: v for k, v in data.items() if v is not None})
    save_directions(ds, args.out)
    print(inspect_table(ds))
    print(f"\nwrote {args.out}")
    return 0


def inspect_table(ds: DirectionSet) -> str:
    cos = cosine_matrix(ds)
    _, b1_layer = global_direction(ds)
    b1 = ds.direction(b1_layer)
    rows = []
    for i, layer in enumerate(ds.layers):
        p = ds.percentiles[i]
        rows.append([
            layer, float(ds.auroc[i]), float(ds.cohens_d[i]), float(ds.raw_norms[i]), float(ds.scales[i]),
            float(cos[i, i - 1]) if i > 0 else float("nan"), float(ds.directions[i] @ b1),
            f"{p[0, 25]:.2f}/{p[0, 50]:.2f}/{p[0, 75]:.2f}", f"{p[1, 25]:.2f}/{p[1, 50]:.2f}/{p[1, 75]:.2f}",
        ])
    m = ds.meta
    head = (f"model {m.get('model', {}).get('name')}  site {m.get('site')}  position {m.get('position')}  "
            f"estimator {m.get('estimator')}  counts {m.get('counts')}\n"
            f"global direction b1 = layer {b1_layer}; AUROC and Cohen's d on the held-out 20 %\n")
    sel, cond = _selection(ds)

    def show(layers: list[int] | None, unavailable: str) -> str:
        if layers is None:
            return f"— ({unavailable})"
        return layer_ranges(layers) if layers else "none"
    no_stat = "no finite held-out statistic below the skip cutoff"
    lines = [
        "layer selection:",
        f"  discriminative (μP·μN < 0 along b1): {show(sel['discriminative'], 'no mean_unit_*: recalibrate')}",
        f"  top-5 by AUROC (last 20 % skipped):  {show(sel['top_auroc'], no_stat)}",
        f"  top-5 by Cohen's d (same skip):      {show(sel['top_cohens_d'], no_stat)}",
        f"  plane: b1 = layer {sel['plane_b1_layer']} (global direction), b2 = PC1 of the directions ⟂ b1",
    ]
    if cond is not None:
        lines.append(
            f"CAST condition (auto): layer {cond['layer']}, steer when score {cond['compare']} "
            f"{cond['threshold']:.4f}; held-out precision {fmt(cond['precision'])} recall {fmt(cond['recall'])} "
            f"FPR {fmt(cond['fpr'])} (train recall {fmt(cond['train_recall'])} FPR {fmt(cond['train_fpr'])})"
        )
    return head + table(
        ["layer", "AUROC", "cohen_d", "‖μP−μN‖", "scale", "cos(prev)", "cos(b1)", "pos p25/50/75",
         "neg p25/50/75"], rows) + "\n\n" + "\n".join(lines)


def _selection(ds: DirectionSet) -> tuple[dict, dict | None]:
    """What each layer criterion picks; None where the artifact lacks what a criterion needs."""
    def attempt(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except SteerableError:  # an older or imported artifact: report the criterion as unavailable
            return None

    sel = {
        "discriminative": attempt(lambda: discriminative_layers(ds)),
        "top_auroc": attempt(lambda: top_layers(ds, 5, "auroc")),
        "top_cohens_d": attempt(lambda: top_layers(ds, 5, "cohens_d")),
        "plane_b1_layer": global_direction(ds)[1],
        "skip_last": 0.2,
    }
    choice = attempt(lambda: choose_condition(ds)) if ds.cast_percentiles is not None else None
    return sel, dataclasses.asdict(choice) if choice is not None else None


def cmd_inspect(args: argparse.Namespace) -> int:
    ds = load_directions(args.file)
    if args.json:
        sel, cond = _selection(ds)
        print(json.dumps({"meta": ds.meta, "layers": ds.layers, "auroc": ds.auroc.tolist(),
                          "cohens_d": ds.cohens_d.tolist(), "raw_norms": ds.raw_norms.tolist(),
                          "selection": sel, "condition": cond}, indent=2))
    else:
        print(inspect_table(ds))
    return 0


def plan_from_flags(args: argparse.Namespace):
    if args.plan:
        if args.steer:
            raise SteerableError("give --plan or --steer, not both")
        return read_plan_file(args.plan)
    if not args.steer:
        return None
    spec = {"vector": args.steer, "method": args.method, "strength": args.strength, "direction": args.direction,
            "angle": args.angle, "cap_floor": args.cap_floor, "cap_ceiling": args.cap_ceiling,
            "threshold": args.threshold, "target": args.target, "layers": args.layers, "gate": args.gate,
            "site": args.site}
    return {k: v for k, v in spec.items() if v is not None}


def _print_conditions(handle, plans: list) -> None:
    """Say which layer and threshold each conditional plan decides with, and how well it held out."""
    from steerable.steering.plan import build_row_plans

    seen: set[int] = set()
    for checked in build_row_plans(handle, plans):
        for iv in checked.interventions if checked else ():
            for c in iv.conditions:
                if id(c) not in seen:
                    seen.add(id(c))
                    print(f"condition: {json.dumps(c.report())}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from steerable.generation import generate

    handle = load_model(args.model)
    rows = load_prompt_rows(args.prompts)
    plan = plan_from_flags(args)
    # a row's own "plan" (an object, a list, or null for unsteered) wins over the flags for that row
    plans = [r.get("plan", plan) for r in rows]
    _print_conditions(handle, plans)
    completions = generate(handle, [r["prompt"] for r in rows], plans=plans, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, progress=True)
    with atomic_path(args.out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row, text in zip(rows, completions, strict=True):
            f.write(json.dumps({**row, "completion": text}, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} completions to {args.out}", file=sys.stderr)
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    ds = load_directions(args.file)
    layers = None if args.layers is None else parse_layers(args.layers, max(ds.layers) + 1, ds.layers)
    export_control_vector(ds, args.out, strength=args.strength, layers=layers)
    print(f"wrote {args.out}")
    return 0


def cmd_import_gguf(args: argparse.Namespace) -> int:
    meta = None
    if args.model:
        h = load_model(args.model)
        meta = {"name": h.name, "config_hash": h.config_hash, "hidden_size": h.hidden_size,
                "n_layers": h.n_layers, "family": h.layout.family}
    ds = import_control_vector(args.file, model_meta=meta)
    save_directions(ds, args.out)
    print(f"wrote {args.out} ({len(ds.layers)} layers)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    print(table(["model", "description"], [[k, v.description] for k, v in BUILTIN_MODELS.items()]))
    print()
    print("prompt sets:", ", ".join(PROMPT_SETS), " (suffix :train, :test or :all)")
    print("pair sets:  ", ", ".join(PAIR_SETS))
    return 0
