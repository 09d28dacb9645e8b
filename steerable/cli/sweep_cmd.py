"""`steerable sweep`, `steerable tune` and `steerable report`: measure a grid, pick a point, show it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerable.cli.main import _direction, add_ray_flags, batch_size, float_flag, int_flag, new_tokens, positive
from steerable.cli.table import table
from steerable.cli.train_cmd import adapter_record, add_adapter_flag, load_model_for
from steerable.errors import DataError, SteerableError
from steerable.evaluate.capability import DEFAULT_FORMAT, DEFAULT_PER_SUBJECT, parse_format
from steerable.evaluate.capability_tasks import DEFAULT_TASK, TASKS
from steerable.models.builtin import DEFAULT_MODEL
from steerable.steering.methods.add import COMPOSITIONS
from steerable.sweeps.records import BEHAVIOURS
from steerable.sweeps.select import CRITERIA

if TYPE_CHECKING:
    from steerable.sweeps.records import SweepRecord
    from steerable.sweeps.run import SweepSpec
    from steerable.sweeps.select import Budget

TUNE_LAYERS = "discriminative;top:4;all"
_budget_flag = float_flag(0.0, 1e6)  # a KL or perplexity budget
_fraction = float_flag(0.0, 1.0)  # a rate budget


def _capability_format(name: str) -> str:
    try:
        parse_format(name)
    except SteerableError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return name


def _grid_args(s: argparse.ArgumentParser, layers_default: str | None) -> None:
    s.add_argument("--model", default=DEFAULT_MODEL)
    add_adapter_flag(s)
    s.add_argument("--vector", help="direction file (or --profiles)")
    s.add_argument("--profiles", dest="profile", metavar="PROFILES",
                   help="profile library (steerable users fit): sweep one user's vector instead of --vector (add)")
    s.add_argument("--user", help="with --profiles: whose vector (absent or not in the library: the population's)")
    s.add_argument("--composition", choices=COMPOSITIONS,
                   help="with --profiles: how the user's vector is composed (default personalised)")
    s.add_argument("--method", default="add", help="a method, or several joined with commas")
    s.add_argument("--strengths", help="e.g. 0,0.5,1,2 (add: default 0.5,1,2,4; others 1)")
    s.add_argument("--angles", help="degrees for rotate / angular / angular-adaptive (default 90,180,270)")
    s.add_argument("--cap-floors", help="cap floors: numbers or pNN/nNN percentiles (default p10,p25,p50)")
    s.add_argument("--cap-bands", help="cap bands LO:HI (seed 000's band), e.g. p10:p90,p25:p75")
    s.add_argument("--layers", default=layers_default,
                   help='layer choices joined with commas, e.g. "8-16,discriminative" (use ";" between choices '
                        'that are themselves comma lists)')
    s.add_argument("--gate", help="gate for every configuration")
    s.add_argument("--direction", type=_direction, help="per-layer, global or a layer index, for every configuration")
    s.add_argument("--site", help="override the artifact's site")
    s.add_argument("--prompts", required=True,
                   help="prompt set (test split by default) or JSONL of {prompt, category?}")
    s.add_argument("--benign", help="benign prompts: over-refusal, KL and coherence are measured on them")
    s.add_argument("--behaviour", default="refusal", choices=BEHAVIOURS,
                   help="success on --prompts: refusal (steer to refuse) or compliance (remove refusal)")
    s.add_argument("--limit", type=positive, help="use the first N prompts of each set")
    s.add_argument("--mmlu", type=int_flag(0, 10**5), default=0, nargs="?", const=DEFAULT_PER_SUBJECT, metavar="N",
                   help=f"MMLU items per subject for capability (0: off; --mmlu alone: {DEFAULT_PER_SUBJECT}, "
                        "the default item set; tune's --max-capability-drop turns it on)")
    s.add_argument("--capability-format", type=_capability_format, default=DEFAULT_FORMAT,
                   help=f"MMLU answer format (default {DEFAULT_FORMAT}; docs/results.md, \"Capability measure\")")
    s.add_argument("--capability-task", choices=TASKS, default=DEFAULT_TASK,
                   help="items --mmlu draws: MMLU, or the word analogies for a model at chance on MMLU "
                        "(then N is per analogy section)")
    s.add_argument("--max-new-tokens", type=new_tokens, default=64)
    s.add_argument("--batch-size", type=batch_size, default=64,
                   help="rows per generation batch (many configs share one)")
    s.add_argument("--group-rows", type=int_flag(1, 10**7), default=256,
                   help="rows per group; results are written when a group finishes")
    s.add_argument("--examples", type=int_flag(0, 10**4), default=4, help="completions kept per config for the report")


def add_sweep_parsers(sub: Any) -> None:
    """The `sweep`, `tune` and `report` subcommands."""
    s = sub.add_parser("sweep", help="measure many steering configurations in shared batches (JSONL, resumable)")
    _grid_args(s, None)
    s.add_argument("--out", required=True, help="results JSONL: one line per finished configuration")
    add_ray_flags(s)
    s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser("tune", help="pick the configuration with the most behaviour within a side-effect budget")
    _grid_args(s, TUNE_LAYERS)
    s.add_argument("--criterion", default="budget", choices=CRITERIA)
    s.add_argument("--max-kl", type=_budget_flag, help="mean KL(unsteered ‖ steered) on benign prompts")
    s.add_argument("--max-ppl-increase", type=_budget_flag, help="increase of the median completion perplexity")
    s.add_argument("--max-capability-drop", type=_fraction, help="MMLU accuracy drop, e.g. 0.02 (needs --mmlu)")
    s.add_argument("--max-over-refusal", type=_fraction, help="increase of the benign refusal rate, e.g. 0.05")
    s.add_argument("--ppl-threshold", type=float_flag(1.0, 1e12),
                   help="perplexity of a violating completion (default 2× unsteered)")
    s.add_argument("--out", required=True, help="plan JSON to write (usable by generate --plan)")
    s.add_argument("--results", help="sweep JSONL (default: beside --out, resumable)")
    s.set_defaults(fn=cmd_tune)

    s = sub.add_parser("report", help="HTML report and PNG plots of a sweep's results")
    s.add_argument("results", help="sweep results JSONL")
    s.add_argument("--out", required=True, help="directory for index.html and the plots")
    s.add_argument("--criterion", default="budget", choices=CRITERIA, help="how the marked point is chosen")
    s.add_argument("--max-kl", type=_budget_flag)
    s.add_argument("--max-ppl-increase", type=_budget_flag)
    s.add_argument("--max-over-refusal", type=_fraction)
    s.set_defaults(fn=cmd_report)


def _spec(args: argparse.Namespace) -> SweepSpec:
    from steerable.data.loaders import load_prompt_rows
    from steerable.sweeps import grid
    from steerable.sweeps.run import SweepSpec

    configs = grid.expand(grid.split_list(args.method), grid.layer_choices(args.layers),
                          grid.numbers("strengths", args.strengths), grid.numbers("angles", args.angles),
                          grid.thresholds(args.cap_floors), grid.bands(args.cap_bands))
    prompts = load_prompt_rows(args.prompts)[: args.limit]
    benign = load_prompt_rows(args.benign)[: args.limit] if args.benign else []
    if not prompts:
        raise DataError(f"no prompts in {args.prompts}")
    extra: dict[str, Any] = {}
    if bool(args.vector) == bool(args.profile):
        raise SteerableError("give --vector (a direction file) or --profiles (a profile library), not "
                             f"{'both' if args.vector else 'neither'}")
    if args.profile:  # one user's vector swept like any direction file's; the library's path names the sweep
        extra.update({"profile": args.profile, "user": args.user, "composition": args.composition})
        extra = {k: v for k, v in extra.items() if v is not None}
    elif args.user is not None or args.composition is not None:
        raise SteerableError("--user and --composition need --profiles (the profile library to steer with)")
    if args.gate:
        extra["gate"] = args.gate
    if args.direction:
        extra["direction"] = args.direction
    if args.site:
        extra["site"] = args.site
    names: dict[str, Any] = {"prompts": args.prompts, "benign": args.benign, "limit": args.limit}
    adapter = adapter_record(args)
    if adapter is not None:  # recorded on every line, and part of its key: a resumed sweep never mixes models
        names["adapter"] = adapter
    return SweepSpec(vector=args.vector or args.profile, configs=configs, prompts=prompts, benign=benign,
                     behaviour=args.behaviour,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, group_rows=args.group_rows,
                     mmlu_per_subject=args.mmlu or (DEFAULT_PER_SUBJECT if getattr(args, "max_capability_drop", None)
                                                    is not None else 0),
                     capability_format=args.capability_format, capability_task=args.capability_task,
                     examples=args.examples, plan_extra=extra,
                     names=names)


def summary_table(records: list[SweepRecord]) -> str:
    """The terminal table `sweep` and `tune` print: one row per line; refusal and coherent compliance (not
    refused and coherent, "-" for lines written before it was measured) are on `--prompts`."""
    from steerable.sweeps.select import median_ppl

    rows = []
    for r in records:
        b = r.behaviour
        cap = r.capability.change if r.capability is not None else None
        cc = r.prompts.coherent_compliance
        rows.append([
            r.label, f"{b.rate:.0%} [{b.ci95[0]:.0%},{b.ci95[1]:.0%}]", f"{r.prompts.refusal.rate:.0%}",
            f"{cc.rate:.0%} [{cc.ci95[0]:.0%},{cc.ci95[1]:.0%}]" if cc is not None else "-",
            f"{r.benign.refusal.rate:.0%}" if r.benign is not None else "-",
            f"{r.kl:.3f}" if r.kl is not None else "-", f"{median_ppl(r):.2f}",
            f"{r.prompts.language_consistency:.3f}", f"{r.prompts.compression_ratio:.3f}",
            f"{r.prompts.rep4:.3f}", f"{cap.change:+.1%}" if cap else "-",
        ])
    b0 = records[0].behaviour.name if records else "behaviour"
    return table(["config", f"{b0} (n={records[0].behaviour.n if records else 0})", "refusal", "coherent compl.",
                  "benign refusal", "KL",
                  "ppl (median)", "lang", "compress", "rep-4", "capability Δ"], rows)


def cmd_sweep(args: argparse.Namespace) -> int:
    """`steerable sweep`: run the grid (resuming), print the summary table."""
    from steerable.sweeps.run import run_sweep

    spec = _spec(args)
    if args.ray:
        from steerable.scale.ray_env import WorkerOptions
        from steerable.scale.ray_sweep import run_sweep_ray

        records = run_sweep_ray(args.model, spec, args.out, address=args.ray, options=WorkerOptions(
            args.workers, args.worker_threads, args.worker_gpus), adapter=args.adapter)
    else:
        records = run_sweep(load_model_for(args), spec, args.out)
    print(summary_table(records))
    print(f"{len(records)} configurations in {args.out}", file=sys.stderr)
    return 0


def _budget(args: argparse.Namespace) -> Budget:
    from steerable.sweeps.select import Budget

    return Budget(max_kl=args.max_kl, max_ppl_increase=args.max_ppl_increase,
                  max_capability_drop=getattr(args, "max_capability_drop", None),
                  max_over_refusal=args.max_over_refusal, ppl_threshold=getattr(args, "ppl_threshold", None))


def cmd_tune(args: argparse.Namespace) -> int:
    """`steerable tune`: KL pre-pass (with --max-kl), sweep, choose by --criterion, write the plan."""
    import dataclasses

    from steerable.fsutil import write_text_atomic
    from steerable.sweeps.run import run_sweep
    from steerable.sweeps.select import select
    from steerable.sweeps.tune import prefilter_kl

    spec = _spec(args)
    handle = load_model_for(args)
    results = args.results or str(Path(args.out).with_suffix(".sweep.jsonl"))
    if args.max_kl is not None:
        keep, dropped, kls = prefilter_kl(handle, spec, args.max_kl)
        spec = dataclasses.replace(spec, configs=keep, known_kl={**spec.known_kl, **kls})
        if dropped:
            print(f"KL pre-pass: {len(dropped)} of {len(dropped) + len(spec.configs) - 1} configurations exceed "
                  f"KL {args.max_kl:g} on the benign prompts and are not generated", file=sys.stderr)
    records = run_sweep(handle, spec, results)
    print(summary_table(records))
    choice = select(records, args.criterion, _budget(args))
    write_text_atomic(args.out, json.dumps(choice.record.plan, indent=2) + "\n")
    print(f"chosen ({args.criterion}, {choice.admissible} of {choice.considered} admissible): {choice.record.label}")
    print(f"  {choice.why}")
    print(f"wrote {args.out}; all results in {results}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """`steerable report`: index.html and the PNGs of a results file."""
    from steerable.sweeps.records import read_records
    from steerable.sweeps.report import write_report

    records = read_records(args.results, repair=False)
    if not records:
        raise DataError(f"{args.results}: no sweep results")
    index = write_report(records, args.out, criterion=args.criterion, budget=_budget(args))
    print(f"wrote {index}")
    return 0
