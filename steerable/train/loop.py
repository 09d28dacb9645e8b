"""LoRA fine-tuning with training-time steering (methods.md §6): `train(handle, sft, config, out)`.

- the loss terms read activations through hooks on the PEFT-wrapped model's blocks (reader.py), once per step;
- the contrastive term's frozen activations are read with the adapter disabled (no second copy of the model), in
  one pass before training over the examples the run will visit: the base model is frozen, so they do not change,
  and only their projections on â are kept;
- preventative steering and CAFT are ordinary plans (`add`, `ablate`) applied with `steer()` around the training
  forward passes only: the saved adapter carries no hook, inference runs without them.

Reproducible from the seed: the LoRA initialisation and the example order both come from it. Resumable: with a run
directory, a checkpoint (checkpoint.py: LoRA weights, optimiser state, RNG state, step) is written every
`checkpoint_every` steps, and `resume=True` continues the run from it — the same log as a run never interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from steerable.capture.run import StopForward
from steerable.data.sft import SFTSet
from steerable.directions.artifact import DirectionSet, load_directions
from steerable.errors import ArtifactError, SteerableError
from steerable.fsutil import write_text_atomic
from steerable.models.load import ModelHandle
from steerable.steering.builders import Plan, ablate, add, cap
from steerable.steering.hooks import steer
from steerable.steering.layer_spec import parse_layers
from steerable.train.adapter import model_record
from steerable.train.artifact import LOG_FILE, file_sha256, prepare_out, save_adapter, versions, write_steering
from steerable.train.batches import Batch, Tokenised, collate, schedule, tokenise
from steerable.train.checkpoint import (
    Checkpoint,
    check_identity,
    prepare_resume,
    read_checkpoint,
    read_log_prefix,
    remove_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from steerable.train.config import RESUME_FLAGS, STEERED, TrainConfig
from steerable.train.losses import Reference, reference, steering_terms, task_loss
from steerable.train.reader import ActivationReader, steering_hooks

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    peft_model: Any
    log: list[dict[str, Any]]
    record: dict[str, Any]  # what steering.json holds
    out: Path | None
    fired: dict[int, int] = field(default_factory=dict)  # reader hook calls per layer (armed)
    recomputed: int = 0  # reader hook calls ignored (gradient checkpointing's recompute)


def _vector(config: TrainConfig, handle: ModelHandle) -> tuple[DirectionSet | None, dict[str, Any] | None]:
    if config.vector is None:
        return None, None
    if isinstance(config.vector, DirectionSet):
        ds = config.vector
        ds.check_model(handle)
        return ds, {"file": ds.path, "sha256": None, "label": ds.label, "site": ds.meta.get("site")}
    ds = load_directions(config.vector, handle)
    return ds, {"file": str(config.vector), "sha256": file_sha256(config.vector), "site": ds.meta.get("site"),
                "name": ds.meta.get("name")}


def _layers(config: TrainConfig, ds: DirectionSet | None, handle: ModelHandle) -> tuple[int, ...]:
    if ds is None:
        return ()
    if config.layers is not None:
        return parse_layers(config.layers, handle.n_layers, ds.layers)
    axis = ds.meta.get("axis", {})
    if axis.get("cap_layers"):
        return parse_layers(axis["cap_layers"], handle.n_layers, ds.layers)
    return (ds.layers[int(torch.nan_to_num(ds.auroc, nan=-1.0).argmax())],)  # the best held-out AUROC


def _plan(config: TrainConfig, ds: DirectionSet, layers: tuple[int, ...]) -> Plan:
    if config.method == "preventative":
        return add(ds, config.strength, layers=list(layers))
    if config.caft_ablation == "mean":
        return mean_ablation(ds, layers)
    return ablate(ds, layers=list(layers))


def mean_ablation(ds: DirectionSet, layers: tuple[int, ...]) -> Plan:
    """h − (h·â − μ)â at each layer, μ the Assistant-class mean projection of `ds` there: a cap whose floor and
    ceiling are both μ (one entry per layer, since μ differs by layer)."""
    ref = reference(ds, layers)
    plan = Plan(())
    for layer in layers:
        v = ds.direction(layer).double()
        mu = float(ref.mean[layer].double() @ (v / v.norm()))
        plan = plan + cap(ds, floor=mu, ceiling=mu, layers=[layer])
    return plan


@torch.no_grad()
def base_projections(peft_model: Any, handle: ModelHandle, items: dict[int, Tokenised], ref: Reference, site: str,
                     batch_size: int) -> dict[int, dict[int, torch.Tensor]]:
    """Per example, per layer: the frozen model's projection h^base·â on every token ([len], float32, CPU), read
    with the adapter disabled and the forward pass stopped after the last layer needed."""
    reader = ActivationReader(handle, site, ref.layers, stop_after_last=True)
    unit = ref.to(next(handle.model.parameters())).unit
    out: dict[int, dict[int, torch.Tensor]] = {}
    rows = list(items)
    with peft_model.disable_adapter(), reader.attached():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            batch = collate([items[r] for r in chunk], chunk, handle.tokenizer.pad_token_id, handle.device)
            with reader.armed() as hidden, contextlib.suppress(StopForward):
                handle.model(**batch.inputs(), use_cache=False)
            for j, r in enumerate(chunk):
                n = len(items[r].ids)
                out[r] = {layer: (hidden[layer][j, :n].float() @ unit[layer].float()).cpu() for layer in ref.layers}
    return out


def _base_batch(base: dict[int, dict[int, torch.Tensor]], batch: Batch, layers: tuple[int, ...]
                ) -> dict[int, torch.Tensor]:
    width = batch.input_ids.shape[1]
    out = {}
    for layer in layers:
        t = torch.zeros(len(batch.rows), width)
        for j, r in enumerate(batch.rows):
            p = base[r][layer]
            t[j, :len(p)] = p
        out[layer] = t.to(batch.input_ids.device)
    return out


def _lora(handle: ModelHandle, config: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r,
                     lora_dropout=config.lora_dropout, target_modules="all-linear", bias="none",
                     task_type="CAUSAL_LM")
    return get_peft_model(handle.model, cfg)


@contextlib.contextmanager
def _training_mode(handle: ModelHandle, checkpointing: bool) -> Iterator[None]:
    model = handle.model
    try:
        model.train()
        if checkpointing:
            # non-reentrant: the checkpointed blocks run with autograd on, so the activations the reader keeps
            # are in the graph (the reentrant form runs them under no_grad)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        yield
    finally:
        if checkpointing:
            model.activation_checkpointing_disable()
            # enabling also hooked the input embeddings (make their output require grad); disabling leaves that
            # hook unless peft loaded the adapter through transformers, so take it off here
            if getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"):
                model.disable_input_require_grads()
        model.eval()


class _Log:
    """train_log.jsonl, one line per step, flushed as it goes (None: keep the lines in memory only). A resumed run
    starts from the lines its checkpoint includes: the file is cut back to them (atomically) first."""

    def __init__(self, path: Path | None, kept: list[dict[str, Any]] | None = None):
        self.lines: list[dict[str, Any]] = list(kept or [])
        if path is not None and kept is not None:
            write_text_atomic(path, "".join(json.dumps(line) + "\n" for line in kept))
        self._f = open(path, "a", encoding="utf-8") if path is not None else None  # noqa: SIM115

    def write(self, line: dict[str, Any]) -> None:
        self.lines.append(line)
        if self._f is not None:
            self._f.write(json.dumps(line) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _fingerprint(ds: DirectionSet | None, vector_record: dict[str, Any] | None) -> str | None:
    """The direction a run trains with: its file's sha256, or (an in-memory set) a hash of its directions."""
    if ds is None or vector_record is None:
        return None
    if vector_record.get("sha256"):
        return str(vector_record["sha256"])
    h = hashlib.sha256(json.dumps(list(ds.layers)).encode())
    h.update(ds.directions.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def data_sha256(sft: SFTSet) -> str:
    """The examples themselves (prompt, response), hashed: a resume must see the same data, whatever it is called."""
    blob = json.dumps([[ex.prompt, ex.response] for ex in sft.examples], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _restore(ck: Checkpoint, named: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
             where: Path) -> None:
    """The checkpoint's LoRA weights and optimiser state into this run's (fresh) ones."""
    names = [n for n, _ in named]
    if names != ck.param_names or set(ck.params) != set(names):
        raise ArtifactError(f"--resume {where}: the checkpoint's LoRA parameters ({len(ck.param_names)}) are not this "
                            f"run's ({len(names)})")
    with torch.no_grad():
        for n, p in named:
            if ck.params[n].shape != p.shape:
                raise ArtifactError(f"--resume {where}: parameter {n} is {tuple(ck.params[n].shape)} in the "
                                    f"checkpoint, {tuple(p.shape)} here")
            p.copy_(ck.params[n])
    fresh = optimizer.state_dict()["param_groups"]
    groups = []
    for mine, stored in zip(fresh, ck.optimizer["param_groups"], strict=True):
        # JSON has no tuples (AdamW's betas): give each value the type the fresh group has
        groups.append({k: tuple(v) if isinstance(mine.get(k), tuple) else v for k, v in stored.items()})
    optimizer.load_state_dict({"state": ck.optimizer["state"], "param_groups": groups})


def train(handle: ModelHandle, sft: SFTSet, config: TrainConfig, out: str | Path | None = None, *,
          progress: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None, resume: bool = False,
          checkpoint_every: int = 25) -> TrainResult:
    """Fine-tune `handle.model` with LoRA on `sft` under `config`; with `out`, write the adapter, steering.json and
    train_log.jsonl there, and a checkpoint every `checkpoint_every` steps (0: none) until the run finishes.
    `resume=True` continues the unfinished run in `out` from its checkpoint (same config, data and model, else a
    SteerableError naming the setting). The LoRA layers stay on `handle.model` (in place) afterwards, active,
    without hooks."""
    config.check()
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise SteerableError(f"checkpoint_every must be a whole number ≥ 0, got {checkpoint_every!r}")
    if hasattr(handle.model, "peft_config"):
        raise SteerableError(f"model {handle.name!r} already carries an adapter: train on a freshly loaded model")
    ds, vector_record = _vector(config, handle)
    layers = _layers(config, ds, handle)
    site = str(ds.meta.get("site", "resid_post")) if ds is not None else "resid_post"
    ref = reference(ds, layers) if ds is not None and config.terms else None
    identity = {**config.identity(), "vector": _fingerprint(ds, vector_record), "layers": list(layers),
                "data": data_sha256(sft), "model": handle.config_hash}
    ck: Checkpoint | None = None
    if resume:
        if out is None:
            raise SteerableError("resume=True needs the run directory (out) to continue")
        resume_dir = prepare_resume(out)
        ck = read_checkpoint(resume_dir)
        check_identity(ck.identity, identity, RESUME_FLAGS, resume_dir)
        out_dir: Path | None = resume_dir
    else:
        out_dir = prepare_out(out) if out is not None else None

    steps = schedule(len(sft.examples), config.steps, config.batch_size, config.seed)
    visited = sorted({r for s in steps for r in s})
    items = dict(zip(visited, tokenise(handle, [sft.examples[r] for r in visited], config.max_length), strict=True))

    hooks_before = steering_hooks(handle.model)
    torch.manual_seed(config.seed)
    peft_model = _lora(handle, config)
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    done = 0  # steps already run (a resumed run's checkpoint step)
    if ck is not None and out_dir is not None:
        _restore(ck, named, optimizer, out_dir)
        done = ck.step
        log.info("resuming %s from its checkpoint at step %d of %d", out_dir, done, config.steps)

    t0 = time.perf_counter()
    base = None
    if "contrastive" in config.terms and ref is not None:
        base = base_projections(peft_model, handle, items, ref, site, config.batch_size)
    base_seconds = time.perf_counter() - t0

    dev_ref = next(handle.model.parameters())
    ref_dev = ref.to(dev_ref) if ref is not None else None
    reader = ActivationReader(handle, site, ref.layers) if ref is not None else None
    steering = (steer(handle, _plan(config, ds, layers)) if config.method in STEERED and ds is not None
                else contextlib.nullcontext())
    before = ck.seconds if ck is not None else 0.0  # seconds of the sessions this run continues
    logfile = _Log(out_dir / LOG_FILE if out_dir is not None else None,
                   read_log_prefix(out_dir, done) if ck is not None and out_dir is not None else None)
    bar = tqdm(total=config.steps, initial=done, desc=f"train ({config.method})", unit="step", disable=not progress)
    pad = handle.tokenizer.pad_token_id
    if ck is not None:  # last, so that nothing above (LoRA's initialisation) moves it
        set_rng_state(ck.rng)
    try:
        with _training_mode(handle, config.gradient_checkpointing), steering, \
                (reader.attached() if reader is not None else contextlib.nullcontext()):
            for k, rows in enumerate(steps, 1):
                if k <= done:
                    continue
                start = time.perf_counter()
                batch = collate([items[r] for r in rows], rows, pad, handle.device)
                armed: AbstractContextManager[dict[int, torch.Tensor]] = (
                    reader.armed() if reader is not None else contextlib.nullcontext({}))
                with armed as hidden:
                    logits = peft_model(**batch.inputs(), use_cache=False).logits
                task = task_loss(logits, batch.labels)
                terms: dict[str, torch.Tensor] = {}
                if ref_dev is not None:
                    bp = _base_batch(base, batch, ref_dev.layers) if base is not None else None
                    terms = steering_terms(hidden, batch.response, ref_dev, config.terms, bp)
                steer_loss = sum((config.weight(t) * v for t, v in terms.items()), torch.zeros((), device=task.device))
                loss = task + steer_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                line = {"step": k, "loss": loss.item(), "task_loss": task.item(), "steer_loss": steer_loss.item(),
                        **{f"{t}_loss": v.item() for t, v in terms.items()}, "lr": optimizer.param_groups[0]["lr"],
                        "tokens": int(batch.response.sum()), "seconds": round(time.perf_counter() - start, 4)}
                logfile.write(line)
                if out_dir is not None and checkpoint_every and k % checkpoint_every == 0 and k < config.steps:
                    write_checkpoint(out_dir, Checkpoint(k, identity, dict(named), optimizer.state_dict(),
                                                         [n for n, _ in named], rng_state(),
                                                         before + time.perf_counter() - t0))
                if on_step is not None:
                    on_step(line)
                bar.update(1)
                bar.set_postfix(loss=f"{line['loss']:.3f}")
    finally:
        bar.close()
        logfile.close()
    if steering_hooks(handle.model) != hooks_before:  # every hook of this run is gone before anything is saved
        raise SteerableError(f"internal: {steering_hooks(handle.model) - hooks_before} training hook(s) left on the "
                             "model")
    for p in params:
        p.requires_grad_(False)
    last = logfile.lines[-1]
    record = {
        "method": config.method, "lambda": config.lam if config.terms else None,
        "lambda_reg": config.weight("actreg") if "actreg" in config.terms else None,
        "strength": config.strength if config.method == "preventative" else None,
        "caft_ablation": config.caft_ablation if config.method == "caft" else None,
        "terms": list(config.terms), "vector": vector_record, "layers": list(layers), "site": site if ds else None,
        "reference": None if ref is None else {"assistant_class": ref.assistant_class,
                                               "p_ref": {str(k): v for k, v in ref.p_ref.items()}},
        "data": sft.provenance, "seed": config.seed, "steps": config.steps, "lr": config.lr,
        "batch_size": config.batch_size, "max_length": config.max_length, "examples_seen": len(visited),
        "lora": {"r": config.lora_r, "alpha": config.lora_alpha or 2 * config.lora_r, "dropout": config.lora_dropout,
                 "target_modules": "all-linear"},
        "gradient_checkpointing": config.gradient_checkpointing, "model": model_record(handle),
        "final": {k: v for k, v in last.items() if k.endswith("loss")},
        "seconds": round(before + time.perf_counter() - t0, 2), "base_pass_seconds": round(base_seconds, 3),
        "resumed_from_step": ck.step if ck is not None else None,
        "versions": versions(),
    }
    if out_dir is not None:
        save_adapter(peft_model, out_dir)
        write_steering(out_dir, record)
        remove_checkpoint(out_dir)  # finished: steering.json marks it, the adapter is the result
        log.info("wrote the adapter, %s and %s to %s", "steering.json", LOG_FILE, out_dir)
    return TrainResult(peft_model, logfile.lines, record, out_dir, dict(reader.fired) if reader else {},
                       reader.recomputed if reader else 0)


__all__ = ["TrainResult", "base_projections", "data_sha256", "mean_ablation", "train"]
