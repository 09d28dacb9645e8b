"""Bake directional ablation into the weights (methods.md §5, `ablate`): W ← W − r̂ r̂ᵀ W.

Every matrix that writes into the residual stream (token embedding, each block's attention output
projection and MLP down projection, and their biases) loses its r̂ component, so r̂ never enters the
residual stream: exactly what run-time ablation of every residual write does (`runtime_ablation`).
The result is an ordinary Hugging Face checkpoint that needs no hooks, e.g. for llama.cpp or vLLM.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerable.capture.sites import get_hidden, replace_hidden
from steerable.directions.artifact import DirectionSet
from steerable.errors import SteerableError
from steerable.fsutil import apply_umask
from steerable.models.layout import find_layout

BAKE_FORMAT = "steerable.baked"
BAKE_RECORD = "steerable.json"
# Families whose residual writes are known to be exactly embed_tokens, self_attn.o_proj and
# mlp.down_proj, each added to the residual unnormalised. Anything else could hide another writer
# (positional embeddings, extra projections), so it is refused rather than baked inexactly.
BAKEABLE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Norms applied to a block's output *before* the residual add (Gemma2/3, OLMo2). RMSNorm(x − (x·r̂)r̂)
# is not orthogonal to r̂ in general, so no weight edit removes r̂ from the residual.
_OUTPUT_NORMS = ("post_feedforward_layernorm", "pre_feedforward_layernorm")


@dataclass(frozen=True)
class ResidualWriters:
    """The modules whose outputs are added to the residual stream, in forward order per block."""

    embed: nn.Embedding
    attn: tuple[nn.Module, ...]
    mlp: tuple[nn.Module, ...]
    attn_out: tuple[nn.Linear, ...]
    mlp_out: tuple[nn.Linear, ...]


def find_writers(model: nn.Module) -> ResidualWriters:
    """Locate the residual writers, or raise SteerableError if ablating them would not be exact."""
    layout = find_layout(model)
    for i, block in enumerate(layout.layers):
        norms = [n for n in _OUTPUT_NORMS if isinstance(getattr(block, n, None), nn.Module)]
        if norms:
            raise SteerableError(
                f"cannot bake ablation into {layout.family}: block {i} normalises its attention/MLP output "
                f"({', '.join(norms)}) before the residual add, so W ← W − r̂r̂ᵀW does not remove r̂ from the "
                "residual stream; use run-time steering with method 'ablate' instead"
            )
    if layout.family not in BAKEABLE_FAMILIES:
        raise SteerableError(
            f"cannot bake ablation into {layout.family!r}: weight orthogonalisation is only supported for "
            f"{', '.join(BAKEABLE_FAMILIES)} (families whose residual writes are known exactly)"
        )
    attn = tuple(getattr(b, "self_attn", None) for b in layout.layers)
    mlp = tuple(getattr(b, "mlp", None) for b in layout.layers)
    attn_out = tuple(getattr(m, "o_proj", None) for m in attn)
    mlp_out = tuple(getattr(m, "down_proj", None) for m in mlp)
    hf: Any = model  # a transformers PreTrainedModel
    embed = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    if not isinstance(embed, nn.Embedding) or not all(
        isinstance(m, nn.Linear) for m in (*attn_out, *mlp_out)
    ):
        raise SteerableError(
            f"cannot bake ablation into this {layout.family} model: expected an nn.Embedding and "
            "self_attn.o_proj / mlp.down_proj nn.Linear modules in every block"
        )
    return ResidualWriters(embed, attn, mlp, attn_out, mlp_out)  # type: ignore[arg-type]


def _writer_params(model: nn.Module, w: ResidualWriters) -> dict[str, nn.Parameter]:
    """Name → parameter for every tensor orthogonalisation changes."""
    ids = {id(w.embed.weight)}
    for lin in (*w.attn_out, *w.mlp_out):
        ids.update(id(p) for p in lin.parameters(recurse=False))
    # remove_duplicate: a tied LM head shares the embedding but keeps its original values (see _untie).
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def _unit(unit: torch.Tensor, d: int) -> torch.Tensor:
    u = torch.as_tensor(unit).detach().float().flatten()
    if u.numel() != d:
        raise SteerableError(f"direction has {u.numel()} entries, the model's hidden size is {d}")
    norm = u.norm()
    if not bool(torch.isfinite(u).all()) or float(norm) < 1e-8:
        raise SteerableError("direction is zero or not finite")
    return u / norm


def _is_tied(model: nn.Module, embed: nn.Embedding) -> bool:
    hf: Any = model
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    w = getattr(head, "weight", None)
    return w is not None and (w is embed.weight or w.data_ptr() == embed.weight.data_ptr())


def _untie(model: nn.Module, embed: nn.Embedding) -> None:
    """Give the LM head its own copy of the (still original) embedding, so unembedding is unchanged."""
    hf: Any = model
    head = hf.get_output_embeddings()
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    hf.config.tie_word_embeddings = False
    # transformers caches the tie mapping at init; a stale one would re-tie on tie_weights()/load.
    if hasattr(hf, "all_tied_weights_keys"):
        hf.all_tied_weights_keys = {}


@torch.no_grad()
def orthogonalize_weights(model: nn.Module, unit: torch.Tensor) -> None:
    """In place: remove r̂ from everything `model` writes into the residual stream (float32 math)."""
    w = find_writers(model)
    r = _unit(unit, w.embed.weight.shape[1]).to(w.embed.weight.device)
    if _is_tied(model, w.embed):
        _untie(model, w.embed)
    e = w.embed.weight
    e32 = e.float()  # rows are residual vectors: e ← e − (e·r̂) r̂
    e.copy_(e32 - torch.outer(e32 @ r, r))
    for lin in (*w.attn_out, *w.mlp_out):
        rr = r.to(lin.weight.device)
        w32 = lin.weight.float()  # columns are residual vectors: W ← W − r̂ (r̂ᵀ W)
        lin.weight.copy_(w32 - torch.outer(rr, rr @ w32))
        if lin.bias is not None:
            b32 = lin.bias.float()
            lin.bias.copy_(b32 - (b32 @ rr) * rr)


def _ablate(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    h32 = h.float()
    return (h32 - (h32 @ r).unsqueeze(-1) * r).to(h.dtype)


@contextlib.contextmanager
def runtime_ablation(handle: Any, unit: torch.Tensor) -> Iterator[None]:
    """Inside the block, ablate r̂ from every residual write with hooks; the weights are untouched."""
    w = find_writers(handle.model)
    r = _unit(unit, handle.hidden_size).to(handle.device)

    def hook(_module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        h = get_hidden(args, {}, output, False)
        return replace_hidden(args, {}, output, False, _ablate(h, r.to(h.device)))

    handles = []
    try:
        for m in (w.embed, *w.attn, *w.mlp):
            handles.append(m.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temp dir beside `out`; it becomes `out` only if the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old: Path | None = None
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp and save_pretrained leave 0700 / 0600: give the outputs plain modes
        if out.exists() and any(out.iterdir()):
            # os.replace cannot replace a non-empty directory: move the old one aside, then drop it.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise SteerableError(f"{out} already exists and is not empty (overwrite to replace it)")
        if not (out / BAKE_RECORD).is_file():
            # Never delete a directory we did not write.
            raise SteerableError(f"{out} exists and is not a baked checkpoint ({BAKE_RECORD} missing); not replacing")


def bake(
    handle: Any,
    directions: DirectionSet,
    layer: int,
    out_dir: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face checkpoint of `handle`'s model with direction `layer` orthogonalised away.

    `handle.model` is left unchanged: only the tensors that change are copied. `source` (the
    direction file) is recorded in `steerable.json` beside the weights.
    """
    directions.check_model(handle)
    unit = _unit(directions.direction(layer), handle.hidden_size)
    out = Path(out_dir)
    _check_out(out, overwrite)
    original = handle.model
    changed = _writer_params(original, find_writers(original))
    # deepcopy with the unchanged parameters/buffers pre-seeded in the memo: they are shared, not copied.
    skip = {id(p) for p in changed.values()}
    memo: dict[int, Any] = {id(t): t for t in (*original.parameters(), *original.buffers()) if id(t) not in skip}
    model = copy.deepcopy(original, memo)
    untied = _is_tied(model, model.get_input_embeddings())
    orthogonalize_weights(model, unit)
    record = {
        "format": BAKE_FORMAT,
        "format_version": 1,
        "method": "ablate (weight orthogonalisation: W <- W - r r^T W)",
        "direction_file": None if source is None else str(source),
        "layer": layer,
        "site": directions.meta.get("site"),
        "estimator": directions.meta.get("estimator"),
        "direction_sha256": hashlib.sha256(unit.cpu().numpy().tobytes()).hexdigest(),
        "source_model": handle.name,
        "config_hash": handle.config_hash,
        "untied_lm_head": untied,
        "parameters": sorted(changed),
    }
    with _atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        handle.tokenizer.save_pretrained(tmp)
        (tmp / BAKE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out
