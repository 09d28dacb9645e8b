"""Find the decoder blocks and their norm modules: by family where known, by structure otherwise."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from torch import nn

from steerable.errors import SteerableError

# Norm whose output feeds the MLP. Gemma3's post_attention_layernorm normalises the attention
# *output* before the residual add, so its MLP input norm is pre_feedforward_layernorm.
_MLP_IN_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")
_ATTN_IN_NORMS = ("input_layernorm", "ln_1")

CONFIG_HASH_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "vocab_size",
)


@dataclass(frozen=True)
class Layout:
    """Where a decoder-only model's sites live. Layer indices are 0-based decoder-block indices."""

    layers: nn.ModuleList
    attn_in: tuple[nn.Module, ...] | None
    mlp_in: tuple[nn.Module, ...] | None
    family: str

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def _find_layer_list(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "model.model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj: object = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    # By structure: the longest ModuleList of identical blocks.
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise SteerableError(
            f"unsupported model {type(model).__name__}: no list of decoder blocks found "
            "(supported: Llama, Qwen2, Gemma3 and decoder-only models with a ModuleList of blocks)"
        )
    return best


def _norms(layers: nn.ModuleList, names: tuple[str, ...]) -> tuple[nn.Module, ...] | None:
    for name in names:
        found = [getattr(layer, name, None) for layer in layers]
        if all(isinstance(m, nn.Module) for m in found):
            return tuple(found)  # type: ignore[arg-type]
    return None


def find_layout(model: nn.Module) -> Layout:
    layers = _find_layer_list(model)
    family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return Layout(layers, _norms(layers, _ATTN_IN_NORMS), _norms(layers, _MLP_IN_NORMS), str(family))


def config_hash(config: object) -> str:
    """A short hash of the architecture fields that decide whether a direction fits a model."""
    fields = {k: getattr(config, k, None) for k in CONFIG_HASH_KEYS}
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
