"""`steerable users eval`: held-out choice accuracy of per-user steering (report.json, index.html, PNGs).

Registered by `users_cmd.py` through `add_parser(users_subparsers)`; the work is `recipes.users_eval`."""

from __future__ import annotations

import argparse
from typing import Any

from steerable.cli.main import MAX_STRENGTH, batch_size, float_flag, int_flag, new_tokens, positive
from steerable.cli.train_cmd import adapter_record, add_adapter_flag, load_model_for
from steerable.models.builtin import DEFAULT_MODEL
from steerable.tables import table

strength = float_flag(-MAX_STRENGTH, MAX_STRENGTH)


def _grid(text: str) -> tuple[float, ...]:
    """--sweep-composed / --sweep-population: comma-separated strengths."""
    out = []
    for part in text.split(","):
        out.append(strength(part.strip()))
    if not out or len(out) > 64:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: give 1 to 64 comma-separated strengths")
    return tuple(out)


def _gates(text: str) -> tuple[str, ...]:
    """--gates: comma-separated gate specs (steering/gates.py), checked here so a typo fails before any work."""
    from steerable.errors import PlanError
    from steerable.steering.gates import parse_gate

    out = tuple(g.strip() for g in text.split(",") if g.strip())
    if not out or len(out) > 8:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: give 1 to 8 comma-separated gates")
    for g in out:
        try:
            parse_gate(g.replace("{K}", "1"))
        except PlanError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return out


def add_parser(users_subparsers: Any) -> argparse.ArgumentParser:
    from steerable.recipes.users_eval import SWEEP_POPULATION

    s = users_subparsers.add_parser(
        "eval", help="held-out choice accuracy of per-user steering: unsteered, population, personalised, "
                     "dislike-weighted, the BT model, chance; α sweep, gating, capability, a generation check")
    s.add_argument("--model", default=DEFAULT_MODEL)
    add_adapter_flag(s)
    s.add_argument("--profiles", required=True, help="PROFILES.safetensors written by `steerable users fit`")
    s.add_argument("--preferences", required=True,
                   help="a JSONL of preference rows (used whole), users-caa[:SPLIT] or prism:DIR (default: the "
                        "held-out test pairs)")
    s.add_argument("--out", required=True, help="output folder: report.json, index.html, *.png")
    s.add_argument("--strength", type=strength,
                   help="α of the personalised (and, unless --dislike-strength, dislike-weighted) vectors; default: "
                        "the best of the sweep on the tuning pairs")
    s.add_argument("--population-strength", type=strength, help="α of the population vector (default: the sweep's)")
    s.add_argument("--dislike-strength", type=strength, help="α of the dislike-weighted vectors")
    s.add_argument("--layers", help="steered layers, a subset of the library's, e.g. 9-15 (default: all of them)")
    s.add_argument("--limit", type=positive, help="evaluate at most N pairs (taken round-robin over users)")
    s.add_argument("--tune-preferences",
                   help="pairs that choose the strengths (default: the source's training pairs; a JSONL source "
                        "has none, so the evaluation pairs are used and the report says so)")
    s.add_argument("--tune-limit", type=positive, default=120, help="at most N tuning pairs (round-robin over users)")
    s.add_argument("--no-sweep", action="store_true", help="skip the α sweep (strengths as given or defaults)")
    s.add_argument("--sweep-composed", type=_grid,
                   help="α grid of the composed vectors (default: the population grid × ‖v_pop‖/‖v_u‖, equal added "
                        "norms; seed 002's range is 2.5,5,7.5,10,12.5,17.5,25)")
    s.add_argument("--sweep-population", type=_grid, default=SWEEP_POPULATION, help="α grid of the population vector")
    s.add_argument("--gate-first", type=int_flag(0, 4096), default=4, help="K of the prompt+first:K gating comparison")
    s.add_argument("--gates", type=_gates, default=("prompt", "prompt+first:{K}"),
                   help="token gates compared with steering every token, comma-separated ({K}: --gate-first); "
                        "default prompt,prompt+first:{K}")
    s.add_argument("--capability", default="auto", choices=["auto", "mmlu", "analogies", "none"],
                   help="capability measure at the operating point (auto: analogies/choice-loglik for smollm2, "
                        "MMLU cue+cal otherwise)")
    s.add_argument("--capability-per-subject", type=int_flag(1, 10**4), default=2,
                   help="items per MMLU subject / analogy section")
    s.add_argument("--gen-prompts", type=int_flag(0, 10**5), default=24,
                   help="held-out prompts of the generation check, one per user (0: off)")
    s.add_argument("--max-new-tokens", type=new_tokens, default=32)
    s.add_argument("--batch-size", type=batch_size, default=16)
    s.add_argument("--seed", type=int_flag(0, 2**32 - 1), default=0)
    s.set_defaults(fn=run)
    return s


def _round_robin(rows: list[Any], limit: int | None) -> list[Any]:
    """At most `limit` rows, taken one per user in turn (each user's rows in file order), so a cap keeps users."""
    if limit is None or len(rows) <= limit:
        return rows
    by_user: dict[str, list[Any]] = {}
    for r in rows:
        by_user.setdefault(r.user, []).append(r)
    out: list[Any] = []
    depth = 0
    while len(out) < limit:
        level = [rs[depth] for rs in by_user.values() if depth < len(rs)]
        if not level:
            break
        out += level[: limit - len(out)]
        depth += 1
    return out


def _is_file(spec: str) -> bool:
    return not spec.startswith(("users-caa", "prism:"))


def _without_split(spec: str) -> str:
    head, sep, tail = spec.rpartition(":")
    return head if sep and tail in ("train", "test", "all") and head not in ("", "prism") else spec


def eval_rows(spec: str) -> list[Any]:
    """The evaluation pairs: a JSONL file whole, a built-in source's test pairs (a split in the spec wins)."""
    from steerable.data.preferences import load_preferences

    return load_preferences(spec, split="all" if _is_file(spec) else "test")


def tune_rows(spec: str, tune: str | None) -> tuple[list[Any] | None, str | None]:
    """The pairs that choose the strengths, and where they came from: --tune-preferences (whole, unless its spec
    names a split), else a built-in source's training pairs; a JSONL source has none (None)."""
    from steerable.data.preferences import load_preferences

    if tune is not None:
        return load_preferences(tune, split="all"), tune
    if _is_file(spec):
        return None, None
    base = _without_split(spec)
    return load_preferences(base, split="train"), f"{base}:train"


def run(args: argparse.Namespace) -> int:
    from steerable.directions.profiles import load_profiles
    from steerable.recipes.users_eval import CONDITIONS, EvalConfig, evaluate_users
    from steerable.recipes.users_eval_report import write_report

    rows = _round_robin(eval_rows(args.preferences), args.limit)
    tune, tune_from = (None, None) if args.no_sweep else tune_rows(args.preferences, args.tune_preferences)
    if tune is not None:
        tune = _round_robin(tune, args.tune_limit)
    handle = load_model_for(args)
    library = load_profiles(args.profiles, handle)
    cfg = EvalConfig(strength=args.strength, population_strength=args.population_strength,
                     dislike_strength=args.dislike_strength, layers=args.layers,
                     sweep_composed=args.sweep_composed, sweep_population=args.sweep_population,
                     sweep=not args.no_sweep, gate_first=args.gate_first, gates=args.gates, capability=args.capability,
                     capability_per_subject=args.capability_per_subject, gen_prompts=args.gen_prompts,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    provenance = {"preferences": args.preferences, "limit": args.limit, "tune_preferences": tune_from,
                  "tune_limit": args.tune_limit if tune is not None else None}
    adapter = adapter_record(args)
    if adapter is not None:
        provenance["adapter"] = adapter
    report = evaluate_users(handle, library, rows, cfg, tune_rows=tune, provenance=provenance)
    write_report(args.out, report)
    acc = report["accuracy"]
    print(table(["condition", "accuracy", "95% CI", "n", "α"],
                [[c, f"{acc[c]['value']:.1%}", f"[{acc[c]['ci95'][0]:.1%}, {acc[c]['ci95'][1]:.1%}]", acc[c]["n"],
                  report["strengths"].get(c, "")] for c in CONDITIONS]))
    fb = report["fallback"]
    print(f"{fb['pairs']} pairs of {fb['users']} users not in the library fell back to the population vector")
    print(f"wrote {args.out}/report.json, index.html and PNGs")
    return 0
