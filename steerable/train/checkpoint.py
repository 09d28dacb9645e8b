"""Checkpoints of a training run, for `--resume`: the LoRA weights, the optimiser's state, the RNG state and the step.

Two files in the run directory, no pickle anywhere:
- `checkpoint-STEP.safetensors`: every tensor — the trainable (LoRA) parameters by name (`param.NAME`), the
  optimiser's per-parameter state (`optim.INDEX.KEY`, AdamW's `exp_avg`, `exp_avg_sq` and `step`), and the RNG
  states (`rng.torch`, `rng.cuda.I`);
- `checkpoint.json`: everything else — the step, the run's identity (config, data, model: a resume under other
  settings is refused naming the field), the parameter names in optimiser order, the optimiser's param groups and
  non-tensor state, the seconds spent so far, and the state file's name and sha256.

Atomic: the state file is written under a new name (temporary file, then renamed), then `checkpoint.json` is
replaced atomically to point at it, and only then is the previous state file deleted. A crash at any moment leaves
`checkpoint.json` naming a complete state file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerable.errors import ArtifactError, SteerableError
from steerable.fsutil import write_text_atomic
from steerable.train.artifact import LOG_FILE, STEERING_FILE, file_sha256, read_record

FORMAT = "steerable.train-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.json"
STATE_GLOB = "checkpoint-*.safetensors"


@dataclass
class Checkpoint:
    step: int
    identity: dict[str, Any]
    params: dict[str, torch.Tensor]  # trainable parameter name -> value
    optimizer: dict[str, Any]  # a torch optimiser state_dict (state keyed by int index, param_groups)
    param_names: list[str]  # in optimiser order
    rng: dict[str, torch.Tensor]
    seconds: float  # spent before this checkpoint (all earlier sessions of the run)


def _state_name(step: int) -> str:
    return f"checkpoint-{step:08d}.safetensors"


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple):
        return list(x)
    if isinstance(x, float | int | str | bool) or x is None:
        return x
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    raise ArtifactError(f"internal: optimiser state value of type {type(x).__name__} cannot be stored as JSON")


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def set_rng_state(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["rng.torch"])
    cuda = [rng[f"rng.cuda.{i}"] for i in range(len(rng)) if f"rng.cuda.{i}" in rng]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def write_checkpoint(out: Path, ck: Checkpoint) -> Path:
    """Write `ck` into the run directory `out` (atomically, see the module docstring); returns the state file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {f"param.{n}": p.detach().to("cpu", copy=True).contiguous()
                                        for n, p in ck.params.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in ck.optimizer["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = _jsonable(value)
    tensors.update({k: v.contiguous() for k, v in ck.rng.items()})
    name = _state_name(ck.step)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT, "step": str(ck.step)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out / name)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": ck.step, "state_file": name,
              "sha256": file_sha256(out / name), "identity": ck.identity, "param_names": ck.param_names,
              "optimizer": {"param_groups": _jsonable(ck.optimizer["param_groups"]), "scalars": scalars},
              "seconds": round(ck.seconds, 3)}
    write_text_atomic(out / CHECKPOINT_FILE, json.dumps(record, indent=1) + "\n")
    for old in out.glob(STATE_GLOB):  # earlier checkpoints: checkpoint.json no longer names them
        if old.name != name:
            old.unlink(missing_ok=True)
    return out / name


def remove_checkpoint(out: Path) -> None:
    """A finished run keeps its adapter, not its checkpoint (steering.json marks it finished)."""
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    for p in out.glob(STATE_GLOB):
        p.unlink(missing_ok=True)


def read_checkpoint(out: Path) -> Checkpoint:
    """The checkpoint of the unfinished run in `out`; ArtifactError naming what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = out / CHECKPOINT_FILE
    record = read_record(path, FORMAT, FORMAT_VERSION, "training checkpoint",
                         unreadable=f"--resume {out}: {CHECKPOINT_FILE}")
    name = record.get("state_file")
    if not isinstance(name, str) or Path(name).name != name or not (out / name).is_file():
        raise ArtifactError(f"{path}: its state file {name!r} is missing")
    if file_sha256(out / name) != record.get("sha256"):
        raise ArtifactError(f"{out / name}: sha256 differs from the one {CHECKPOINT_FILE} records (a damaged file)")
    try:
        tensors = load_file(str(out / name))
    except (OSError, SafetensorError) as e:
        raise ArtifactError(f"{out / name}: cannot read ({e})") from None
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    for idx, values in record["optimizer"].get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    if "rng.torch" not in rng:
        raise ArtifactError(f"{out / name}: no RNG state")
    return Checkpoint(int(record["step"]), record["identity"], params,
                      {"state": state, "param_groups": record["optimizer"]["param_groups"]},
                      list(record["param_names"]), rng, float(record.get("seconds", 0.0)))


def prepare_resume(out: str | Path) -> Path:
    """The directory of an unfinished run that has a checkpoint; ArtifactError saying why it cannot be resumed."""
    out = Path(out)
    if not out.is_dir():
        raise ArtifactError(f"--resume {out}: no such directory (start the run without --resume)")
    if (out / STEERING_FILE).exists():
        raise ArtifactError(f"--resume {out}: the run is finished ({STEERING_FILE}); nothing to resume")
    if not (out / CHECKPOINT_FILE).is_file():
        what = f"{LOG_FILE} but no checkpoint yet" if (out / LOG_FILE).exists() else "no checkpoint"
        raise ArtifactError(f"--resume {out}: {what} (checkpoints are written every --checkpoint-every steps); "
                            "start it again in a new directory")
    return out


def check_identity(stored: dict[str, Any], mine: dict[str, Any], flags: dict[str, str], where: Path) -> None:
    """SteerableError naming the first setting that differs between the checkpointed run and this one."""
    for key in [*flags, *sorted((set(stored) | set(mine)) - set(flags))]:  # the flags' order: --method first
        if stored.get(key) != mine.get(key):
            flag = f" ({flags[key]})" if key in flags else ""
            raise SteerableError(f"--resume {where}: the run was started with {key}{flag} = {stored.get(key)!r}, "
                                 f"this one has {mine.get(key)!r}; resume with the same settings")


def read_log_prefix(out: Path, step: int) -> list[dict[str, Any]]:
    """The first `step` lines of the run's train_log.jsonl (the steps the checkpoint includes); later lines are
    steps the interrupted session ran past its last checkpoint, which the resumed session runs again."""
    path = out / LOG_FILE
    lines: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, text in enumerate(f, 1):
                if len(lines) == step:
                    break
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    raise ArtifactError(f"{path}:{i}: not JSON (the log the checkpoint at step {step} continues)"
                                        ) from None
                if not isinstance(line, dict) or line.get("step") != i:
                    raise ArtifactError(f"{path}:{i}: expected the line of step {i}")
                lines.append(line)
    except OSError as e:
        raise ArtifactError(f"--resume {out}: cannot read {LOG_FILE} ({e})") from None
    if len(lines) < step:
        raise ArtifactError(f"{path}: {len(lines)} lines, but the checkpoint is at step {step}")
    return lines


__all__ = ["CHECKPOINT_FILE", "Checkpoint", "check_identity", "prepare_resume", "read_checkpoint",
           "read_log_prefix", "remove_checkpoint", "rng_state", "set_rng_state", "write_checkpoint"]
