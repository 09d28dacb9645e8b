"""Implementations of the CLI subcommands: parse flags → call the library → print/write results."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from steerable.cli.train_cmd import load_model_for
from steerable.data.loaders import PAIR_SETS, PROMPT_SETS, contrastive_examples, load_prompt_rows_located
from steerable.data.sources import DATA_FILES, data_file
from steerable.directions.artifact import load_directions, save_directions
from steerable.directions.calibrate import calibrate
from steerable.directions.gguf_cv import export_control_vector, import_control_vector
from steerable.directions.summary import condition_sources, inspect_table, printable, safe_json, selection_summary
from steerable.errors import DataError, PlanError, SteerableError
from steerable.fsutil import atomic_path, check_regular
from steerable.models.builtin import BUILTIN_MODELS
from steerable.models.load import ModelHandle, builtin_checkpoint, load_model
from steerable.steering.plan import (
    SteeringPlan,
    build_plan,
    build_row_plans,
    caching_profile_resolver,
    caching_resolver,
    parse_layers,
    read_plan_file,
    with_user,
)
from steerable.steering.plan import plan_from_flags as steering_flags_plan
from steerable.tables import table


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
    _check_out(args.out)
    examples = contrastive_examples(positive=args.positive, negative=args.negative, pairs=args.pairs,
                                    limit=args.limit)
    if not examples:
        raise DataError("no calibration examples")
    data = {"positive": args.positive, "negative": args.negative, "pairs": args.pairs, "limit": args.limit}
    how = {"estimator": args.estimator, "site": args.site, "position": args.position, "batch_size": args.batch_size,
           "data": {k: v for k, v in data.items() if v is not None}}
    if args.ray:  # the actors load the model; the driver never does
        from steerable.scale.ray_calibrate import calibrate_ray
        from steerable.scale.ray_env import WorkerOptions

        ds = calibrate_ray(args.model, examples, layers=args.layers, address=args.ray, **how,
                           options=WorkerOptions(args.workers, args.worker_threads, args.worker_gpus))
    else:
        handle = load_model(args.model)
        layers = None if args.layers is None else parse_layers(args.layers, handle.n_layers, range(handle.n_layers))
        ds = calibrate(handle, examples, layers=layers, **how)
    save_directions(ds, args.out)
    print(inspect_table(ds))
    print(f"\nwrote {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    ds = load_directions(args.file)
    if args.json:
        sel, cond = selection_summary(ds)
        # safe_json: every string from the file reaches the terminal as a JSON escape, never raw
        print(safe_json({"meta": ds.meta, "layers": ds.layers, "auroc": ds.auroc.tolist(),
                         "cohens_d": ds.cohens_d.tolist(), "raw_norms": ds.raw_norms.tolist(),
                         "selection": sel, "condition": cond, "condition_sources": condition_sources(ds)}))
    else:
        print(inspect_table(ds))
    return 0


def plan_from_flags(args: argparse.Namespace) -> Any:
    """The plan `--plan FILE`, the `--steer ...` flags or the `--profiles P --user U ...` flags describe (None:
    unsteered). `--user` with `--plan` sets the user of the plan's profile entries."""
    profile = getattr(args, "profile", None)
    if profile and (args.steer or args.plan):
        raise SteerableError(f"give --profiles or {'--plan' if args.plan else '--steer'}, not both (a plan file names "
                             "its profile library in \"profile\")")
    if args.plan:
        if args.steer:
            raise SteerableError("give --plan or --steer, not both")
        check_regular(args.plan, "plan file", PlanError)  # a FIFO is refused before anything opens it
        spec = read_plan_file(args.plan)
        user = getattr(args, "user", None)
        if user is not None:
            try:
                spec = with_user(spec, user)
            except PlanError as e:
                raise PlanError(f"--plan {args.plan} --user: {e}") from None
        return spec
    if not args.steer and not profile:
        if getattr(args, "user", None) is not None or getattr(args, "composition", None) is not None:
            raise PlanError("--user and --composition need --profiles (the profile library to steer with)")
        return None
    return steering_flags_plan(vars(args), args.steer or None)


def _check_out(path: str) -> None:
    if os.path.isdir(path):
        raise SteerableError(f"--out {path}: is a directory; give a file name")


def _checked(spec: Any, handle: ModelHandle, resolve: Any, where: str, profiles: Any = None) -> SteeringPlan | None:
    """One plan checked by the validator; its error is prefixed with where the plan came from."""
    try:
        plan = build_plan(spec, handle, resolve, profiles=profiles or caching_profile_resolver())
    except SteerableError as e:
        raise type(e)(f"{where}: {e}") from None
    return plan or None


def _print_conditions(handle: ModelHandle, plans: list[Any]) -> None:
    """Say which layer and threshold each conditional plan decides with, and how well it held out."""
    seen: set[int] = set()
    for checked in build_row_plans(handle, plans):
        for iv in checked.interventions if checked else ():
            for c in iv.conditions:
                if id(c) not in seen:
                    seen.add(id(c))
                    print(f"condition: {json.dumps(c.report())}", file=sys.stderr)


def _source_classes(plans: list[SteeringPlan | None]) -> dict[str, str]:
    """Source name → "positive"/"negative": the built-in condition sources, then what the conditions'
    artifacts record about the sources they were fitted on."""
    from steerable.data.condition_sources import BENIGN_SOURCES, HARMFUL_SOURCES

    classes = {**dict.fromkeys(HARMFUL_SOURCES, "positive"), **dict.fromkeys(BENIGN_SOURCES, "negative")}
    for checked in plans:
        for iv in checked.interventions if checked else ():
            for c in iv.conditions:
                fixed = c.vectors.meta.get("condition")
                per = fixed.get("fires_per_source") if isinstance(fixed, dict) else None
                for name, v in (per or {}).items():
                    if isinstance(v, dict) and v.get("class") in ("positive", "negative"):
                        classes[str(name)] = v["class"]
    return classes


def _condition_report(handle: ModelHandle, args: argparse.Namespace, rows: list[dict[str, Any]],
                      plans: list[SteeringPlan | None]) -> list[bool | None]:
    """Per row, whether its plan's (first) condition fires; prints, per source of the prompts (a row's
    "source", or the built-in set --prompts names), how often it fired: recall on a source the condition
    should fire on, false-positive rate on one it should not."""
    from steerable.evaluate.cast_hits import fired_by_source, rows_fired

    if not any(p is not None and any(iv.conditions for iv in p.interventions) for p in plans):
        return [None] * len(rows)
    fired = rows_fired(handle, plans, [r["prompt"] for r in rows], batch_size=args.batch_size)
    builtin = None if args.prompts.endswith(".jsonl") else args.prompts.split(":")[0]
    sources = [r["source"] if isinstance(r.get("source"), str) else builtin for r in rows]
    summary = fired_by_source(fired, sources, _source_classes(plans))
    out = [[printable(name), v.get("class", "—"), v.get("measures", "fires"), v["n"], v["fired"], f"{v['rate']:.1%}"]
           for name, v in summary.items()]
    print("condition fired (first condition of each row's plan), per source of the prompts:", file=sys.stderr)
    print(table(["source", "class", "rate is", "n", "fired", "rate"], out), file=sys.stderr)
    print(f"condition per source: {json.dumps(summary, ensure_ascii=True)}", file=sys.stderr)
    return fired


def cmd_generate(args: argparse.Namespace) -> int:
    from steerable.generation import generate

    # everything read from files is checked before the model loads; each error names the file (and line)
    located = load_prompt_rows_located(args.prompts)
    if not located:
        raise DataError(f"no prompts in {args.prompts}")
    _check_out(args.out)
    flags_plan = plan_from_flags(args)
    for where, row in located:  # a row's "user" is checked before the model loads
        if "user" in row and (not isinstance(row["user"], str) or not row["user"]):
            raise DataError(f'{where}: "user" must be a non-empty string (a user id of the profile library)')
    handle = load_model_for(args)  # with `--adapter` (issue 16), checked against the model
    resolve, profiles = caching_resolver(), caching_profile_resolver()
    source = f"--plan {args.plan}" if args.plan else "--profiles flags" if args.profile else "--steer flags"
    shared = None if flags_plan is None else _checked(flags_plan, handle, resolve, source, profiles)
    # a row's own "plan" (an object, a list, or null for unsteered) wins over the flags for that row; a row's
    # "user" picks that user's vector from the profile entries of its plan; errors name the prompts file's line
    plans: list[SteeringPlan | None] = []
    for where, row in located:
        if "user" in row:
            base = row.get("plan", flags_plan)
            what = f'{where}: "user"'
            if base is None:
                raise PlanError(f"{what}: the row's plan steers with no profile library (give --profiles, or a "
                                "\"plan\" with \"profile\")")
            try:
                spec = with_user(base, row["user"])
            except PlanError as e:
                raise PlanError(f"{what}: {e}") from None
            plans.append(_checked(spec, handle, resolve, what, profiles))
        else:
            plans.append(_checked(row["plan"], handle, resolve, f'{where}: "plan"', profiles) if "plan" in row
                         else shared)
        try:
            handle.render(row["prompt"])
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    _print_conditions(handle, plans)
    rows = [r for _, r in located]
    fired = _condition_report(handle, args, rows, plans)
    completions = generate(handle, [r["prompt"] for r in rows], plans=plans, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, progress=True)
    with atomic_path(args.out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row, plan, text, hit in zip(rows, plans, completions, fired, strict=True):
            extra: dict[str, Any] = {} if hit is None else {"condition_fired": hit}
            extra.update(profile_fields(plan))
            f.write(json.dumps({**row, **extra, "completion": text}, ensure_ascii=False) + "\n")
    fell_back = sum(1 for p in plans if p is not None and p.profile_fallback)
    if fell_back:
        print(f"profile: {fell_back} of {len(rows)} rows steered a user the library does not hold, with the "
              "population vector (\"profile_fallback\": true)", file=sys.stderr)
    print(f"wrote {len(rows)} completions to {args.out}", file=sys.stderr)
    return 0


def profile_fields(plan: SteeringPlan | None) -> dict[str, Any]:
    """The output row's report of per-user steering: which user (a list if the plan steers several) and
    whether one fell back to the population vector. Empty when the plan uses no profile library."""
    uses = plan.profile_uses if plan is not None else ()
    if not uses:
        return {}
    users = list(dict.fromkeys(u.user for u in uses))
    return {"profile_user": users[0] if len(users) == 1 else users,
            "profile_fallback": any(u.fallback for u in uses)}


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


def cmd_list(_args: argparse.Namespace) -> int:
    print(table(["model", "description"], [[k, v.description] for k, v in BUILTIN_MODELS.items()]))
    print()
    print("prompt sets:", ", ".join(PROMPT_SETS), " (suffix :train, :test or :all)")
    print("pair sets:  ", ", ".join(PAIR_SETS))
    return 0
