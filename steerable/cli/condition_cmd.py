"""`steerable calibrate-condition`: a CAST condition fitted on several sources per class, chosen by leaving
each source out (directions/multi_source.py)."""

from __future__ import annotations

import argparse
from typing import Any

from steerable.models.builtin import DEFAULT_MODEL


def add_condition_parser(sub: Any) -> None:
    from steerable.data.condition_sources import BENIGN_SOURCES, HARMFUL_SOURCES

    s = sub.add_parser("calibrate-condition",
                       help="a condition (CAST) from several sources per class, validated by leaving each source out")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--harmful", default=",".join(HARMFUL_SOURCES),
                   help="sources the condition must fire on, joined with commas (built-in names with :split, or JSONL)")
    s.add_argument("--benign", default=",".join(BENIGN_SOURCES), help="sources it must not fire on")
    s.add_argument("--out", required=True)
    s.add_argument("--recall", type=float, default=0.9, help="recall target on every held-out harmful source")
    s.add_argument("--max-fpr", type=float, default=0.1, help="false-positive budget on every held-out benign source")
    s.add_argument("--layers", help="layers to consider (default all), e.g. 4-20")
    s.add_argument("--estimator", default="mean-diff", choices=["mean-diff", "logistic"],
                   help="the condition direction: source-balanced mean difference, or an L2 logistic probe")
    s.add_argument("--rule", default="fpr", choices=["fpr", "margin"],
                   help="threshold: the false-positive budget on every fitted benign source (fpr), or max-margin")
    s.add_argument("--batch-size", type=int, default=16)
    s.set_defaults(fn=cmd_calibrate_condition)


def cmd_calibrate_condition(args: argparse.Namespace) -> int:
    from steerable.data.condition_sources import condition_source
    from steerable.directions.artifact import save_directions
    from steerable.directions.multi_source import Source, calibrate_condition
    from steerable.models.load import load_model
    from steerable.steering.layer_spec import parse_layers
    from steerable.tables import table

    handle = load_model(args.model)
    sources = []
    for label, specs in ((1, args.harmful), (0, args.benign)):
        for spec in (x.strip() for x in specs.split(",") if x.strip()):
            name, prompts = condition_source(spec)
            sources.append(Source(name, label, prompts))
    layers = None if args.layers is None else parse_layers(args.layers, handle.n_layers, range(handle.n_layers))
    ds = calibrate_condition(handle, sources, layers=layers, recall=args.recall, max_fpr=args.max_fpr,
                             rule=args.rule, estimator=args.estimator, batch_size=args.batch_size)
    save_directions(ds, args.out)
    c = ds.meta["condition"]
    rows = [[s.name, "harmful" if s.label else "benign", "recall" if s.label else "FPR", len(s.prompts),
             f"{c['loso'][s.name]:.1%}", f"{c['fires_per_source'][s.name]['heldout_fires']:.1%}",
             f"{c['fires_per_source'][s.name]['fires']:.1%}"] for s in sources]
    print(table(["source", "class", "rate is", "n", "fires when left out", "held-out fold", "all prompts"], rows))
    verdict = "meets" if c["meets_targets"] else "does NOT meet"
    print(f"\nchosen: layer {c['layer']}, score {c['score']} ({c['estimator']}), "
          f"steer when score {c['compare']} {c['threshold']:.4f}; "
          f"{verdict} the targets (recall ≥ {args.recall:.0%} and FPR ≤ {args.max_fpr:.0%} on every held-out source)")
    print(f"wrote {args.out}")
    return 0
