"""`steerable users fit` (preference rows → one profile library file), `steerable users show` (what a library
holds, or one user's row) and `steerable users eval` (cli/users_eval_cmd.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from steerable.cli.main import batch_size, int_flag
from steerable.models.builtin import DEFAULT_MODEL
from steerable.tables import table


def _basis(text: str) -> str | int:
    """--basis: auto, category, or a number K of singular vectors."""
    if text in ("auto", "category"):
        return text
    try:
        return int_flag(1, 4096)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: use auto, category or a number K (1–4096)") from None


def add_users_parsers(sub: Any) -> None:
    from steerable.cli.users_eval_cmd import add_parser as add_eval_parser
    from steerable.recipes.users_fit import FIT_POSITIONS, LAYER_RULE

    users = sub.add_parser("users", help="per-user steering: fit a profile library, show it, evaluate it")
    users_sub = users.add_subparsers(dest="users_command", required=True)

    s = users_sub.add_parser("fit", help="preference rows → a profile library (population vector, basis, per-user "
                                         "ideal points and dislike weights) in one safetensors file")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--preferences", required=True,
                   help="a JSONL of preference rows, users-caa[:SPLIT] or prism:DIR[:SPLIT] (default: the training "
                        "pairs)")
    s.add_argument("--out", required=True, help="PROFILES.safetensors")
    s.add_argument("--basis", type=_basis, default="auto",
                   help="auto (one direction per category when every row has one, else the SVD of the pair "
                        "differences with K chosen by their energy), category, or K singular vectors")
    s.add_argument("--layers", help=f"layers to fit, e.g. 12-18 (default {LAYER_RULE})")
    s.add_argument("--position", default="response-mean", choices=list(FIT_POSITIONS),
                   help="where a response is read: the mean over its tokens, or the A/B answer letter")
    s.add_argument("--features", default="auto", choices=["auto", "category-masked", "prompt-centred", "raw"],
                   help="prompt-centred: φ of a response measured from the mean of its prompt's responses (the "
                        "prompt's own content cancels); category-masked: also each response read on its own "
                        "category's axis only; raw: φ = Bᵀh; auto (default): category-masked on a per-category "
                        "basis, else prompt-centred")
    s.add_argument("--tau", type=float, help="the prior's τ (default: chosen per layer by held-out likelihood)")
    s.add_argument("--folds", type=int_flag(2, 100), default=5, help="folds of the held-out choice of τ")
    s.add_argument("--tau-per-axis", action="store_true",
                   help="choose τ per layer and basis axis (category-masked features only; measured: better held-out "
                        "likelihood, worse recovery on users-caa — docs/personalisation.md)")
    s.add_argument("--batch-size", type=batch_size, default=16)
    s.add_argument("--seed", type=int_flag(0, 2**32 - 1), default=0, help="fold assignment and SVD sample")
    s.set_defaults(fn=cmd_users_fit)

    s = users_sub.add_parser("show", help="what a profile library holds; with --user, that user's row")
    s.add_argument("profiles", help="PROFILES.safetensors")
    s.add_argument("--user", help="one user's pair count, ideal point and composed vector norms")
    s.add_argument("--json", action="store_true", help="print JSON instead of tables")
    s.set_defaults(fn=cmd_users_show)

    add_eval_parser(users_sub)


def cmd_users_fit(args: argparse.Namespace) -> int:
    import math

    from steerable.data.preferences import load_preferences
    from steerable.errors import SteerableError
    from steerable.models.load import load_model
    from steerable.recipes.users_fit import fit_users
    from steerable.steering.plan import parse_layers

    if args.tau is not None and not (math.isfinite(args.tau) and args.tau > 0):
        raise SteerableError(f"--tau must be a positive number, got {args.tau}")
    rows = load_preferences(args.preferences, split="train")  # before the model: data errors are cheap
    # every user the source names gets a row, also one whose pairs are all held out (the prior mean)
    users = list(dict.fromkeys(r.user for r in load_preferences(args.preferences, split="all")))
    handle = load_model(args.model)
    layers = None if args.layers is None else parse_layers(args.layers, handle.n_layers, range(handle.n_layers))
    result = fit_users(handle, rows, layers=layers, position=args.position, basis=args.basis, users=users,
                       tau=args.tau, folds=args.folds, seed=args.seed, batch_size=args.batch_size,
                       feature_kind=args.features, tau_per_axis=args.tau_per_axis,
                       data={"preferences": args.preferences, "split": "train"})
    lib = result.library
    lib.save(args.out)
    print(_summary_table(lib.summary()))
    print(f"\n{len(result.texts)} distinct texts captured in {result.timings['capture_s']:.1f} s; ideal points "
          f"of {len(lib)} users in {result.timings['ideal_points_s']:.2f} s")
    print(f"wrote {args.out}")
    return 0


def _taus(taus: list[Any]) -> str:
    """τ per layer, or, where it is chosen per layer and axis, each layer's range over its axes."""
    def one(t: Any) -> str:
        return f"{min(t):.3g}–{max(t):.3g}" if isinstance(t, list) else f"{t:.3g}"
    return ", ".join(one(t) for t in taus)


def _summary_table(s: dict[str, Any]) -> str:
    model = s["model"]
    prior = s["prior"]
    taus = prior.get("tau", [])
    rows = [
        ["model", f"{model.get('name')} (config {model.get('config_hash')})"],
        ["site / position", f"{s['site']} / {s['position']}"],
        ["features", str(s.get("features", "raw"))],
        ["layers", s["layers"]],
        ["basis", f"K={s['k']} {s['basis'].get('kind', '?')}: {', '.join(s['basis'].get('labels', []))}"],
        ["basis chosen by", s["basis"].get("how", "?")],
        ["prior τ", _taus(taus) + f" ({prior.get('how', '?')})"],
        ["users", f"{s['users']} ({s['pairs']['users_without_pairs']} without pairs: population ideal point)"],
        ["pairs", f"{s['pairs']['total']} (per user {s['pairs']['min']}–{s['pairs']['max']})"],
        ["data", json.dumps(s["data"], ensure_ascii=False)[:200]],
    ]
    return table(["field", "value"], rows)


def cmd_users_show(args: argparse.Namespace) -> int:
    from steerable.directions.profiles import COMPOSITIONS, load_profiles

    lib = load_profiles(args.profiles)
    if args.user is None:
        summary = lib.summary()
        print(json.dumps(summary, indent=1, ensure_ascii=False) if args.json else _summary_table(summary))
        return 0
    known = args.user in lib
    theta, _ = lib.theta(args.user)
    out: dict[str, Any] = {"user": args.user, "in_library": known, "pair_count": lib.pair_count(args.user),
                           "seen": lib.seen(args.user), "layers": lib.layers,
                           "theta_minus_phi_mean": (theta - lib.phi_mean).tolist(), "norms": {}}
    for comp in COMPOSITIONS:
        v, fallback = lib.vectors(args.user, comp)
        out["norms"][comp] = [round(float(x), 4) for x in v.norm(dim=1)]
        out.setdefault("fallback", fallback)
    if args.json:
        print(json.dumps(out, indent=1, ensure_ascii=False))
        return 0
    labels = lib.meta.get("basis", {}).get("labels") or [f"b{i + 1}" for i in range(lib.k)]
    head = f"user {args.user!r}: " + (f"{out['pair_count']} training pairs" + (
        "" if out["seen"] is None else (", seen user" if out["seen"] else ", held-out user"))
        if known else "not in the library (falls back to the population vector)")
    print(head)
    rows = [[layer, *(f"{x:+.3f}" for x in w), *(f"{out['norms'][c][j]:.3g}" for c in COMPOSITIONS)]
            for j, (layer, w) in enumerate(zip(lib.layers, out["theta_minus_phi_mean"], strict=True))]
    print(table(["layer", *(f"w:{lab}" for lab in labels), *(f"‖v‖ {c}" for c in COMPOSITIONS)], rows))
    return 0
