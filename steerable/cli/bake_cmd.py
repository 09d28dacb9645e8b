"""`steerable bake`: write a checkpoint with a direction orthogonalised out of its weights."""

from __future__ import annotations

import argparse
import json
from typing import Any

from steerable.cli.main import layer_index
from steerable.models.builtin import DEFAULT_MODEL


def add_bake_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `bake` on an argparse subparsers object."""
    s = sub.add_parser("bake", help="bake directional ablation into the weights (a new HF checkpoint)")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--steer", required=True, help="direction file (.safetensors)")
    s.add_argument("--direction", type=layer_index, required=True, help="calibrated layer whose direction is removed")
    s.add_argument("--out", required=True, help="output directory (a Hugging Face checkpoint)")
    s.add_argument("--force", action="store_true", help="replace an earlier baked checkpoint at --out")
    s.set_defaults(fn=cmd_bake)
    return s


def cmd_bake(args: argparse.Namespace) -> int:
    # Imported here so `steerable --help` does not pay for torch/transformers.
    from steerable.bake import BAKE_RECORD, bake
    from steerable.directions.artifact import load_directions
    from steerable.models.load import load_model

    handle = load_model(args.model)
    ds = load_directions(args.steer, handle)
    out = bake(handle, ds, args.direction, args.out, source=args.steer, overwrite=args.force)
    record = json.loads((out / BAKE_RECORD).read_text(encoding="utf-8"))
    print(f"baked direction of layer {args.direction} from {args.steer} out of {len(record['parameters'])} "
          f"weight tensors of {args.model}" + (" (LM head untied)" if record["untied_lm_head"] else ""))
    for f in sorted(p.name for p in out.iterdir()):
        print(f"  {out / f}")
    print(f"wrote {out}")
    return 0
