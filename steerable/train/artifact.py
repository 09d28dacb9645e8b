"""A training run's directory: the peft adapter, `steering.json` (what was trained how) and `train_log.jsonl`.

`steering.json` is written last and atomically, so its presence marks a finished run; the log is appended one
line per step (flushed), so a run that stops early still shows how far it got.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from steerable.errors import ArtifactError
from steerable.fsutil import apply_umask, write_text_atomic

FORMAT = "steerable.training"
FORMAT_VERSION = 1
STEERING_FILE = "steering.json"
LOG_FILE = "train_log.jsonl"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("steerable", "torch", "transformers", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_out(out: str | Path) -> Path:
    """Create the run directory; refuse one that already holds a run (its log would be mixed with this one)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out}: exists and is not a directory")
    for name in (STEERING_FILE, LOG_FILE, *ADAPTER_FILES):
        if (out / name).exists():
            raise ArtifactError(f"--out {out}: already holds a training run ({name}); choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_adapter(peft_model: Any, out: Path) -> None:
    """peft's save_pretrained into a temporary directory beside `out`, then each file renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
    try:
        peft_model.save_pretrained(str(tmp))
        apply_umask(tmp)
        for p in sorted(tmp.iterdir()):
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_steering(out: Path, record: dict[str, Any]) -> None:
    write_text_atomic(out / STEERING_FILE, json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                       **record}, indent=1, ensure_ascii=False) + "\n")


def read_record(path: Path, fmt: str, version: int, what: str, unreadable: str | None = None) -> dict[str, Any]:
    """A JSON record of the given format, no newer than `version`; ArtifactError naming the file otherwise.

    `unreadable` replaces the path in the message for a file that cannot be read or parsed."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{unreadable or path}: cannot read ({e})") from None
    if not isinstance(record, dict) or record.get("format") != fmt:
        raise ArtifactError(f"{path}: not a steerable {what} (format {fmt!r})")
    if not isinstance(record.get("format_version"), int) or record["format_version"] > version:
        raise ArtifactError(f"{path}: format_version {record.get('format_version')!r} is newer than this steerable "
                            f"reads ({version})")
    return record


def read_steering(adapter_dir: str | Path) -> dict[str, Any]:
    """The run record of an adapter directory; ArtifactError naming the directory when it is missing or not ours."""
    path = Path(adapter_dir) / STEERING_FILE
    if not Path(adapter_dir).is_dir():
        raise ArtifactError(f"no such adapter directory: {adapter_dir}")
    if not path.is_file():
        raise ArtifactError(f"{adapter_dir}: no {STEERING_FILE} (not a `steerable train` output, or an unfinished run)")
    record = read_record(path, FORMAT, FORMAT_VERSION, "training record")
    if not isinstance(record.get("model"), dict):
        raise ArtifactError(f"{path}: no \"model\" record")
    return record


__all__ = ["ADAPTER_FILES", "FORMAT", "LOG_FILE", "STEERING_FILE", "file_sha256", "prepare_out", "read_record",
           "read_steering", "save_adapter", "versions", "write_steering"]
