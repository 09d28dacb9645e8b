"""Decoder blocks and norms are found per family, by structure otherwise, or a clear error."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from steerable.capture.sites import site_module
from steerable.errors import SteerableError
from steerable.models.layout import find_layout
from tests.conftest import tiny_model


@pytest.mark.parametrize(("family", "mlp_norm"), [("llama", "post_attention_layernorm"),
                                                  ("qwen2", "post_attention_layernorm"),
                                                  ("gemma3", "pre_feedforward_layernorm")])
def test_families(family, mlp_norm):
    model = tiny_model(family)
    layout = find_layout(model)
    assert layout.n_layers == 4
    assert layout.attn_in[2] is model.model.layers[2].input_layernorm
    assert layout.mlp_in[2] is getattr(model.model.layers[2], mlp_norm)


def test_structural_fallback_gpt2():
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50))
    layout = find_layout(model)
    assert layout.n_layers == 3
    assert layout.attn_in[0] is model.transformer.h[0].ln_1


def test_unsupported_model_error():
    with pytest.raises(SteerableError, match="unsupported model Linear"):
        find_layout(torch.nn.Linear(3, 3))


def test_site_errors():
    layout = find_layout(tiny_model("llama"))
    with pytest.raises(SteerableError, match="layer 9 out of range"):
        site_module(layout, "resid_post", 9)
    with pytest.raises(SteerableError, match="unknown hook site"):
        site_module(layout, "resid_mid", 1)
