"""Tiny random-weight models (Llama, Qwen2, Gemma3 shapes) with an in-memory byte-level tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import settings
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging

from steerable.models.load import ModelHandle, from_model

hf_logging.set_verbosity_error()

# CI (and anyone who sets CI=1) replays the same examples every run: a fuzz failure there is a real one, found
# again by rerunning; local runs keep exploring new examples (and remember failures in .hypothesis/).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<pad>", "<bos>"]


def byte_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>",
                                  bos_token="<bos>")
    if chat:
        tok.chat_template = CHATML
    return tok


VOCAB = 256 + len(SPECIALS)


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "gemma3":
        cfg = Gemma3TextConfig(**common, head_dim=8, sliding_window=16, query_pre_attn_scalar=8)
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval().requires_grad_(False)


def tiny_handle(family: str = "llama", seed: int = 0) -> ModelHandle:
    model = tiny_model(family, seed)
    tok = byte_tokenizer(chat=family != "gemma3")
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return from_model(model, tok, name=f"tiny-{family}")


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def handle(request) -> ModelHandle:
    return tiny_handle(request.param)


@pytest.fixture
def llama() -> ModelHandle:
    return tiny_handle("llama")


@pytest.fixture
def model_dir(tmp_path) -> str:
    """The tiny Llama saved as a Hugging Face directory, for the CLI."""
    h = tiny_handle("llama")
    d = tmp_path / "tiny"
    h.model.save_pretrained(d)
    h.tokenizer.save_pretrained(d)
    return str(d)
