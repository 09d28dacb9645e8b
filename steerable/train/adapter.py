"""Put a `steerable train` adapter on a loaded model, after checking it was trained for that model.

peft injects the LoRA layers into the handle's model in place (the decoder blocks stay the same objects), so
everything that takes the handle — generate, steering plans, capture — runs the adapted model unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steerable.errors import ArtifactError, ModelMismatchError
from steerable.models.load import ModelHandle, load_model
from steerable.train.artifact import ADAPTER_FILES, file_sha256, read_steering


def model_record(handle: ModelHandle) -> dict[str, Any]:
    return {"name": handle.name, "config_hash": handle.config_hash, "hidden_size": handle.hidden_size,
            "n_layers": handle.n_layers, "family": handle.layout.family}


def check_adapter(record: dict[str, Any], handle: ModelHandle, where: str) -> None:
    """ModelMismatchError naming the first difference between the model an adapter was trained on and `handle`."""
    m = record["model"]
    for key, mine in (("hidden_size", handle.hidden_size), ("n_layers", handle.n_layers),
                      ("config_hash", handle.config_hash)):
        if m.get(key) is not None and m[key] != mine:
            raise ModelMismatchError(
                f"{where}: adapter was trained on {m.get('name')!r} ({key} {m[key]}), but model {handle.name!r} has "
                f"{key} {mine}")


def load_adapter(handle: ModelHandle, adapter_dir: str | Path) -> Any:
    """Load the adapter in `adapter_dir` onto `handle.model` (in place; inference only). Returns the PeftModel.
    An adapter trained for another model is refused (ModelMismatchError) before peft touches the model."""
    from peft import PeftModel

    where = str(adapter_dir)
    record = read_steering(adapter_dir)
    check_adapter(record, handle, where)
    missing = [f for f in ADAPTER_FILES if not (Path(adapter_dir) / f).is_file()]
    if missing:
        raise ArtifactError(f"{where}: missing adapter file(s) {missing}")
    if hasattr(handle.model, "peft_config"):
        raise ArtifactError(f"model {handle.name!r} already carries an adapter; load a fresh model for {where}")
    try:
        peft_model = PeftModel.from_pretrained(handle.model, where, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ArtifactError(f"{where}: cannot load the adapter ({str(e)[:300]})") from None
    handle.model.eval()
    return peft_model


def load_adapted(model: str, adapter: str | Path | None = None, **load_kw: Any) -> ModelHandle:
    """`load_model(model, **load_kw)` with the adapter in `adapter` (if any) on it: the one way every command that
    takes `--adapter` (generate, sweep, tune, drift, users eval, serve and its Ray replicas) gets its model. The
    adapter directory's record is read before the model loads, so a directory that is no training run costs nothing;
    the model check (ModelMismatchError naming the field) needs the loaded model."""
    if adapter is not None:
        read_steering(adapter)
    handle = load_model(model, **load_kw)
    if adapter is not None:
        load_adapter(handle, adapter)
    return handle


def adapter_info(adapter_dir: str | Path) -> dict[str, Any]:
    """What a result made with an adapter records about it: the directory, the weights' sha256 (the adapter's
    identity: a retrained adapter in the same directory is another one), the method and the base model."""
    record = read_steering(adapter_dir)
    weights = Path(adapter_dir) / ADAPTER_FILES[1]
    return {"dir": str(adapter_dir), "sha256": file_sha256(weights) if weights.is_file() else None,
            "method": record.get("method"), "model": record["model"].get("name")}


__all__ = ["adapter_info", "check_adapter", "load_adapted", "load_adapter", "model_record"]
