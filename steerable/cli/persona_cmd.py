"""`steerable axis` (estimate the Assistant Axis from the role data), `steerable persona-vector` (a trait's
persona vector from answers under trait / opposite system prompts) and `steerable drift` (persona drift over
scripted conversations, optionally under plans)."""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from steerable.cli.main import MAX_SEED, batch_size, float_flag, int_flag, layer_index, new_tokens, positive
from steerable.cli.train_cmd import adapter_record, add_adapter_flag, load_model_for
from steerable.data.messages import MAX_MESSAGES
from steerable.errors import PlanError, SteerableError
from steerable.models.builtin import DEFAULT_MODEL
from steerable.tables import table


def _band(text: str) -> str:
    """--band LO,HI: two finite percentiles 0 ≤ LO < HI ≤ 100 (cmd_drift reads the text)."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not two percentiles LO,HI") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi <= 100):
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: need 0 ≤ LO < HI ≤ 100")
    return f"{lo:g},{hi:g}"


def _plan_file(text: str) -> str:
    """--plan FILE: refuse a FIFO, socket or device before anything opens it (opening a FIFO would wait);
    a missing file or a directory is left to the plan reader's PlanError."""
    try:
        mode = os.stat(text).st_mode
    except (OSError, ValueError):
        return text
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise argparse.ArgumentTypeError(f"{text[:80]}: not a regular file (a pipe, socket or device)")
    return text


def _responses_file(text: str) -> str:
    """--responses FILE: a regular UTF-8 JSONL file of objects (read once here, so a FIFO, non-UTF-8 text or a
    line json cannot parse is an argparse error naming the file and line; the recipe checks each row's keys)."""
    from steerable.data.jsonl import read_jsonl
    from steerable.errors import DataError

    try:
        read_jsonl(text, "responses file")
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _questions(text: str) -> int | str:
    """--questions: N (the first N training questions of the role data) or a questions JSONL file."""
    return text if text.endswith(".jsonl") else positive(text)


def add_persona_parsers(sub: Any) -> None:
    from steerable.directions.axis import AXIS_ESTIMATORS, FILTERS
    from steerable.recipes.persona_vector import JUDGES, READS

    s = sub.add_parser("axis", help="estimate the Assistant Axis (default Assistant answers − mean of role vectors)")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--out", required=True, help="AXIS.safetensors; answers and the report go beside it")
    s.add_argument("--estimator", default="assistant-axis", choices=list(AXIS_ESTIMATORS),
                   help="which estimator the file holds (the report compares all four)")
    s.add_argument("--personas", type=positive, help="use the first N training personas (default all)")
    s.add_argument("--questions", type=positive, help="use the first N training questions (default all)")
    s.add_argument("--per-persona", type=int_flag(1, 10**4), default=4, help="questions each persona answers")
    s.add_argument("--responses", type=_responses_file,
                   help="reuse the answers of an earlier run (its .responses.jsonl): no generation")
    s.add_argument("--max-new-tokens", type=new_tokens, default=48)
    s.add_argument("--batch-size", type=batch_size, default=16)
    s.add_argument("--bootstrap", type=int_flag(0, 10**4), default=20,
                   help="bootstrap resamples for the stability report (0: off)")
    s.add_argument("--filter", default="none", choices=list(FILTERS),
                   help="drop role answers that stay in the Assistant's character before fitting (projection: "
                        "below the midpoint of the classes' medians on a first-pass axis; default none)")
    s.add_argument("--filter-layer", type=layer_index, help="layer the filter reads (default: the middle one)")
    s.add_argument("--filter-margin", type=float_flag(0, 100), default=0.0,
                   help="keep a role answer only this many pooled standard deviations below the midpoint")
    s.set_defaults(fn=cmd_axis)

    s = sub.add_parser("persona-vector",
                       help="a trait's persona vector: answers under trait vs opposite system prompts, judged, "
                            "mean-diff of response-means")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--trait", help="a built-in trait (sycophantic, evil, hallucinating, myopic), a trait of "
                                   "--prompts, or a description in words")
    s.add_argument("--opposite", help="the opposite described in words (replaces the opposite system prompts)")
    s.add_argument("--prompts", help="JSONL of {trait, positive: [system prompts], negative: [...]} to use instead "
                                     "of the built-in prompts")
    s.add_argument("--out", required=True, help="VECTOR.safetensors; answers and the report go beside it")
    s.add_argument("--questions", type=_questions,
                   help="N: the first N training questions of the role data (default all); or a JSONL of "
                        "{question, split?}")
    s.add_argument("--test-questions", type=positive, help="at most N held-out questions (default all)")
    s.add_argument("--judge", default="projection", choices=list(JUDGES),
                   help="which answers are kept: projection on a first-pass direction (default), the model's "
                        "own A/B answer to the trait's question, or none")
    s.add_argument("--judge-layer", type=layer_index, help="layer the projection judge reads (default: middle)")
    s.add_argument("--judge-margin", type=float_flag(0, 100), default=0.0,
                   help="keep an answer only this many pooled standard deviations past the midpoint")
    s.add_argument("--read", default="answer", choices=list(READS),
                   help="read answers back without the system prompt (answer, default) or with it (prompted)")
    s.add_argument("--layers", help="layers to fit (default all), e.g. 4-20")
    s.add_argument("--responses", type=_responses_file,
                   help="reuse the answers of an earlier run (its .responses.jsonl): no generation")
    s.add_argument("--max-new-tokens", type=new_tokens, default=48)
    s.add_argument("--batch-size", type=batch_size, default=16)
    s.set_defaults(fn=cmd_persona_vector)

    s = sub.add_parser("drift", help="persona drift: each assistant turn's projection on the axis, turn by turn")
    s.add_argument("--model", default=DEFAULT_MODEL)
    add_adapter_flag(s)
    s.add_argument("--axis", required=True, help="file written by `steerable axis`")
    s.add_argument("--conversations", default="roles:test",
                   help="roles[:train|test|all] (built-in scripts) or JSONL of {id, system?, turns: [user messages]}")
    s.add_argument("--out", required=True, help="directory: drift.jsonl, summary.json, drift.png, index.html")
    s.add_argument("--plan", action="append", default=[], type=_plan_file,
                   help="plan JSON to run the conversations under; repeat to compare several in one batch")
    s.add_argument("--baseline", action="store_true", help="also run the conversations unsteered (with --plan)")
    s.add_argument("--layer", type=layer_index, help="layer to monitor (default: the axis file's monitor layer)")
    s.add_argument("--band", default="5,95", type=_band,
                   help="Assistant band: percentiles LO,HI of its own projections")
    s.add_argument("--limit", type=positive, help="first N conversations")
    s.add_argument("--max-turns", type=int_flag(1, MAX_MESSAGES), help="at most N turns per conversation")
    s.add_argument("--max-new-tokens", type=new_tokens, default=64)
    s.add_argument("--batch-size", type=batch_size, default=16)
    s.add_argument("--no-rescore", action="store_true",
                   help="skip text_projection (each reply re-read by the unsteered model: one prefill per reply)")
    s.set_defaults(fn=cmd_drift)

    s = sub.add_parser("sim", help="synthetic lab: estimator alignment vs noise and sample size, capping trade-off")
    s.add_argument("--out", required=True, help="directory: sim.json, sim_alignment.png, sim_capping.png")
    s.add_argument("--quick", action="store_true", help="small grid (seconds)")
    s.add_argument("--seed", type=int_flag(0, MAX_SEED), default=0)
    s.set_defaults(fn=cmd_sim)


def cmd_sim(args: argparse.Namespace) -> int:
    from steerable import sim

    print(sim.summary_text(sim.run_lab(args.out, quick=args.quick, seed=args.seed)))
    return 0


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from steerable.fsutil import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def cmd_axis(args: argparse.Namespace) -> int:
    from steerable.directions.artifact import save_directions
    from steerable.fsutil import write_text_atomic
    from steerable.models.load import load_model
    from steerable.recipes.axis import estimate_axis

    out = Path(args.out)
    stem = out.with_suffix("")
    handle = load_model(args.model)
    result = estimate_axis(
        handle, estimator=args.estimator, personas=args.personas, questions=args.questions,
        per_persona=args.per_persona, responses=args.responses, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, bootstrap=args.bootstrap, filter=args.filter, filter_layer=args.filter_layer,
        filter_margin=args.filter_margin,
        info={"responses": args.responses or f"{stem.name}.responses.jsonl"},
        on_answers=lambda rows: _write_jsonl(Path(f"{stem}.responses.jsonl"), [r.to_json() for r in rows]))
    ds, report = result.directions, result.report
    save_directions(ds, out)
    write_text_atomic(Path(f"{stem}.report.json"), json.dumps(report, indent=1) + "\n")
    print(_axis_table(ds, report["layers"]))
    if "stability" in report:
        print(_stability_table(report["stability"]))
    print(f"\nmonitor layer {result.monitor_layer}; suggested cap layers {ds.meta['axis']['cap_layers']} "
          f"(e.g. {{\"vector\": \"{out}\", \"method\": \"cap\", \"cap_floor\": \"p25\", "
          f"\"layers\": \"{ds.meta['axis']['cap_layers']}\"}})")
    print(f"wrote {out}, {stem}.report.json" + ("" if args.responses else f", {stem}.responses.jsonl"))
    return 0


def cmd_persona_vector(args: argparse.Namespace) -> int:
    from steerable.data.persona_traits import resolve_trait
    from steerable.directions.artifact import save_directions
    from steerable.fsutil import write_text_atomic
    from steerable.models.load import load_model
    from steerable.recipes.persona_vector import best_layer, estimate_persona_vector
    from steerable.steering.plan import parse_layers

    trait = resolve_trait(args.trait, args.opposite, args.prompts)  # before loading the model: errors are cheap
    out = Path(args.out)
    stem = out.with_suffix("")
    handle = load_model(args.model)
    layers = None if args.layers is None else parse_layers(args.layers, handle.n_layers, range(handle.n_layers))
    result = estimate_persona_vector(
        handle, trait, questions=args.questions, test_questions=args.test_questions, judge=args.judge,
        judge_layer=args.judge_layer, margin=args.judge_margin, read=args.read, layers=layers,
        responses=args.responses, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        info={"responses": args.responses or f"{stem.name}.responses.jsonl"},
        on_answers=lambda rows: _write_jsonl(Path(f"{stem}.responses.jsonl"), [r.to_json() for r in rows]))
    ds, report = result.directions, result.report
    if result.scores is not None:
        keep = result.keep.tolist()
        report["answers"] = [{"side": r.side, "question_id": r.question_id, "split": r.split, "score": s, "kept": k}
                             for r, s, k in zip(result.rows, result.scores.tolist(), keep, strict=True)]
    save_directions(ds, out)
    write_text_atomic(Path(f"{stem}.report.json"), json.dumps(report, indent=1) + "\n")
    best = best_layer(ds)
    rows = [[f"{x['layer']}{'*' if x['layer'] == best else ''}", x["auroc"], x["auroc_unfiltered"], x["cohens_d"],
             x["raw_norm"]] for x in report["layers"]]
    c = report["counts"]
    print(f"persona vector {trait.trait!r}: judge {args.judge}, kept trait {c['train_trait_kept']}/{c['train_trait']}"
          f", opposite {c['train_opposite_kept']}/{c['train_opposite']} training answers; held-out "
          f"{c['test_trait_kept']}/{c['test_trait']}, {c['test_opposite_kept']}/{c['test_opposite']}")
    print("per layer (held-out questions; * = best middle layer)\n"
          + table(["layer", "AUROC kept", "AUROC all", "cohen_d", "raw norm"], rows))
    print(f"\nsteer toward the trait: steerable generate --prompts P.jsonl --out O.jsonl --steer {out} "
          f"--method add --strength 2 --layers {best}")
    print(f"wrote {out}, {stem}.report.json" + ("" if args.responses else f", {stem}.responses.jsonl"))
    return 0


def _axis_table(ds: Any, agreement: list[dict[str, Any]]) -> str:
    pairs = [k for k in agreement[0]["cosine"] if k.startswith("assistant-axis|")] if agreement else []
    rows = []
    for i, (layer, a) in enumerate(zip(ds.layers, agreement, strict=True)):
        mark = "*" if layer == ds.meta["axis"]["monitor_layer"] else ""
        rows.append([f"{layer}{mark}", float(ds.auroc[i]), float(ds.cohens_d[i]),
                     f"{ds.percentiles[i, 0, 25]:.2f}/{ds.percentiles[i, 1, 50]:.2f}",
                     *[a["cosine"][k] for k in pairs]])
    heads = ["layer", "AUROC", "cohen_d", "asst p25/role p50", *[f"cos {k.split('|')[1]}" for k in pairs]]
    return ("Assistant Axis per layer (held-out questions; * = monitor layer; cos = with assistant-axis)\n"
            + table(heads, rows))


def _stability_table(st: dict[str, Any]) -> str:
    sizes = list(next(iter(st["sizes"].values())))
    rows = [[e, b["mean"], b["p5"], *[st["sizes"][e][k]["mean"] for k in sizes]] for e, b in st["bootstrap"].items()]
    return (f"\nstability at layer {st['layer']}: cosine with the full-data direction "
            f"({st['n_personas']} personas, {st['n_assistant']} Assistant answers)\n"
            + table(["estimator", "bootstrap mean", "bootstrap p5", *[f"{k} personas" for k in sizes]], rows))


def cmd_drift(args: argparse.Namespace) -> int:
    from steerable.data.roles import load_conversations
    from steerable.directions.artifact import load_directions
    from steerable.evaluate.drift import DriftArm, assistant_band, run_conversations
    from steerable.evaluate.drift_report import write_drift
    from steerable.steering.plan import read_plan_file

    try:
        lo, hi = (float(x) for x in args.band.split(","))
    except ValueError:
        raise SteerableError(f"--band must be two percentiles LO,HI, got {args.band!r}") from None
    convs = load_conversations(args.conversations)[: args.limit]
    if args.max_turns:
        from dataclasses import replace
        convs = [replace(c, turns=c.turns[: args.max_turns]) for c in convs]
    handle = load_model_for(args)  # with --adapter, "unsteered" (and the text re-read) is the adapted model
    axis = load_directions(args.axis, handle)
    band = assistant_band(axis, args.layer, lo, hi)
    arms = [DriftArm(Path(p).stem, read_plan_file(p)) for p in args.plan]
    if len({a.name for a in arms}) != len(arms):
        raise PlanError("plan files must have different names (each names a condition)")
    if not arms or args.baseline:
        arms.insert(0, DriftArm("unsteered"))
    records = run_conversations(handle, convs, axis, arms, band=band, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, rescore=not args.no_rescore)
    info = {"model": handle.name, "axis": str(args.axis), "conversations": args.conversations,
            "band": band.to_json(), "max_new_tokens": args.max_new_tokens,
            "plans": {a.name: a.plan for a in arms}}
    adapter = adapter_record(args)
    if adapter is not None:
        info["adapter"] = adapter
    summary = write_drift(args.out, records, info)
    rows = []
    for name, s in summary["conditions"].items():
        by_turn = s["mean_projection_by_turn"]
        text = [s["mean_text_projection"], f"{s['text_below_band']:.1%}"] if "mean_text_projection" in s else ["-", "-"]
        rows.append([name, s["replies"], s["mean_projection"], f"{s['left_band']:.1%}", s["mean_drift"],
                     f"{s['conversations_leaving_band']}/{s['conversations']}", *text,
                     " ".join(f"{v:.1f}" for v in by_turn.values())])
    print(f"layer {band.layer}, Assistant band [{band.lo:.3f}, {band.hi:.3f}] (p{lo:g}-p{hi:g}); "
          "text = the replies re-read by the unsteered model"
          + (f" (with the adapter {args.adapter}, as every condition)" if args.adapter else ""))
    print(table(["condition", "replies", "mean proj", "below band", "mean drift", "convs leaving", "text proj",
                 "text below", "mean projection by turn"], rows))
    print(f"wrote {args.out}/drift.jsonl, drift.png, summary.json, index.html")
    return 0
