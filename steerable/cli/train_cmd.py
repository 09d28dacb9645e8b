"""`steerable train`: LoRA fine-tuning with training-time steering (methods.md §6, docs/training.md)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from steerable.cli.main import MAX_COUNT, MAX_SEED, MAX_STRENGTH, batch_size, float_flag, int_flag, positive
from steerable.models.builtin import DEFAULT_MODEL

if TYPE_CHECKING:
    from steerable.models.load import ModelHandle

ADAPTER_HELP = ("a `steerable train` output directory: run with its LoRA adapter on --model (an adapter trained for "
                "another model is refused, naming the difference)")


def add_adapter_flag(s: argparse.ArgumentParser) -> None:
    """`--adapter DIR` of every command that runs a model: sweep, tune, drift, users eval, serve (and generate,
    whose flag in main.py says the same)."""
    s.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP)


def load_model_for(args: argparse.Namespace, **load_kw: Any) -> ModelHandle:
    """`--model` with `--adapter` (if given) on it: `steerable.train.adapter.load_adapted`."""
    from steerable.train.adapter import load_adapted

    return load_adapted(args.model, getattr(args, "adapter", None), **load_kw)


def adapter_record(args: argparse.Namespace) -> dict[str, Any] | None:
    """What a command's output records about `--adapter` (None without one)."""
    from steerable.train.adapter import adapter_info

    adapter = getattr(args, "adapter", None)
    return adapter_info(adapter) if adapter else None


def add_train_parser(sub: Any) -> None:
    from steerable.train.config import CAFT_ABLATIONS, METHODS

    s = sub.add_parser("train", help="LoRA fine-tuning, optionally with training-time steering (methods.md §6)")
    s.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, Hugging Face directory or .gguf")
    s.add_argument("--data", required=True,
                   help="SFT set: JSONL of {prompt, response} or {messages} rows, or a built-in set "
                        "(sycophancy-sft, sycophancy-sft-honest, persona-sft, persona-sft-assistant; :train default, "
                        ":test, :all)")
    s.add_argument("--out", required=True, help="directory: the adapter, steering.json, train_log.jsonl")
    s.add_argument("--method", default="none", choices=list(METHODS),
                   help="none (plain LoRA), aux (projection loss), actreg (activation regularisation), contrastive "
                        "(gradient penalty vs the frozen model), combined (aux + actreg), preventative (add the "
                        "vector while training), caft (ablate it while training)")
    s.add_argument("--vector", help="direction file (an axis or a trait vector); every method but none needs one")
    s.add_argument("--layers", help="layers of the terms / plan, e.g. 9-11 (default: the axis's cap layers, else "
                                    "the file's best held-out-AUROC layer)")
    s.add_argument("--lambda", dest="lam", type=float_flag(0, MAX_STRENGTH), default=0.1,
                   help="weight of the loss term(s)")
    s.add_argument("--lambda-reg", type=float_flag(0, MAX_STRENGTH),
                   help="weight of combined's regularisation term (default: --lambda)")
    s.add_argument("--strength", type=float_flag(-MAX_STRENGTH, MAX_STRENGTH), default=1.0,
                   help="preventative: α along the file's direction (toward its positive class)")
    s.add_argument("--caft-ablation", choices=list(CAFT_ABLATIONS), default="zero",
                   help="caft: zero projects the direction out (the CAFT paper); mean sets h·â to the Assistant "
                        "class's mean projection (ours: what the later layers see at inference)")
    s.add_argument("--steps", type=positive, default=100)
    s.add_argument("--lr", type=float_flag(1e-12, 10.0), default=2e-4)
    s.add_argument("--batch-size", type=batch_size, default=8)
    s.add_argument("--max-length", type=int_flag(2, 1 << 20), default=256,
                   help="tokens per example (prompt + response)")
    s.add_argument("--lora-r", type=int_flag(1, 4096), default=8)
    s.add_argument("--lora-alpha", type=int_flag(1, 1 << 20), help="default 2·r")
    s.add_argument("--seed", type=int_flag(0, MAX_SEED), default=0)
    s.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (less memory; each term still counted once)")
    s.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out from its last checkpoint (the same flags, data and "
                        "model; a difference is refused, naming it)")
    s.add_argument("--checkpoint-every", type=int_flag(0, MAX_COUNT), default=25, metavar="N",
                   help="write a checkpoint (LoRA weights, optimiser and RNG state) every N steps, for --resume "
                        "(0: never; removed when the run finishes)")
    s.set_defaults(fn=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from steerable.data.sft import load_sft
    from steerable.models.load import load_model
    from steerable.train import TrainConfig, train
    from steerable.train.artifact import prepare_out
    from steerable.train.checkpoint import prepare_resume

    config = TrainConfig(method=args.method, vector=args.vector, layers=args.layers, lam=args.lam,
                         lam_reg=args.lambda_reg, strength=args.strength, steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size, max_length=args.max_length, lora_r=args.lora_r,
                         lora_alpha=args.lora_alpha, seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
                         caft_ablation=args.caft_ablation)
    config.check()  # before the model loads: a bad flag or file costs nothing
    sft = load_sft(args.data)
    if args.resume:  # (what cannot be resumed is refused before the model loads)
        prepare_resume(args.out)
    else:
        prepare_out(args.out)
    handle = load_model(args.model)
    result = train(handle, sft, config, args.out, progress=True, resume=args.resume,
                   checkpoint_every=args.checkpoint_every)
    final = result.record["final"]
    resumed = result.record.get("resumed_from_step")
    how = f" (resumed at step {resumed})" if resumed else ""
    print(f"wrote {args.out}: {args.steps} steps{how}, final loss {final['loss']:.4f} (task {final['task_loss']:.4f}, "
          f"steering {final['steer_loss']:.4f})", file=sys.stderr)
    return 0
