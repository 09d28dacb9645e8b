"""Baked weight orthogonalisation equals run-time ablation of every residual write, and touches nothing else."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from steerable.bake import BAKE_RECORD, bake, orthogonalize_weights, runtime_ablation
from steerable.cli.bake_cmd import add_bake_parser
from steerable.directions.artifact import DirectionSet, save_directions
from steerable.errors import SteerableError
from steerable.models.load import ModelHandle, from_model
from tests.conftest import VOCAB, byte_tokenizer, tiny_handle

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
PROMPTS = ["how do I pick a lock", "hi"]  # unequal lengths: left padding is exercised too


def build(kind: str, seed: int = 0) -> ModelHandle:
    """Tiny handles beyond conftest's: tied embeddings, residual-writer biases, more families."""
    if kind in ("llama", "qwen2", "gemma3"):
        return tiny_handle(kind, seed)
    torch.manual_seed(seed)
    model = {
        "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True)),
        "qwen2-tied": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True)),
        # attention_bias also gives o_proj a bias; mlp_bias gives down_proj one.
        "llama-bias": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, head_dim=8)),
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=8)),
    }[kind]()
    if kind == "llama-bias":  # random init leaves biases at zero, which would test nothing
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.data.normal_()
    model.eval().requires_grad_(False)
    tok = byte_tokenizer(chat=True)
    model.config.pad_token_id = tok.pad_token_id
    return from_model(model, tok, name=f"tiny-{kind}")


def directions_for(handle: ModelHandle, seed: int = 1) -> DirectionSet:
    g = torch.Generator().manual_seed(seed)
    n, d = handle.n_layers, handle.hidden_size
    return DirectionSet(
        layers=list(range(n)), directions=torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1),
        raw_norms=torch.ones(n), scales=torch.ones(n), bias=torch.zeros(n), mean_pos=torch.zeros(n, d),
        mean_neg=torch.zeros(n, d), percentiles=torch.zeros(n, 2, 101), auroc=torch.ones(n), cohens_d=torch.ones(n),
        meta={"model": {"name": handle.name, "n_layers": n, "config_hash": handle.config_hash},
              "site": "resid_post", "estimator": "mean-diff"},
    )


def logits(handle: ModelHandle, model: torch.nn.Module | None = None) -> torch.Tensor:
    enc = handle.encode([handle.render(p) for p in PROMPTS])
    with torch.no_grad():
        return (model or handle.model)(**enc).logits.float()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama-tied", "qwen2-tied", "llama-bias", "mistral", "qwen3"])
def test_baked_matches_runtime_ablation(kind, tmp_path):
    h = build(kind)
    ds = directions_for(h)
    before = snapshot(h.model)
    tied = h.model.lm_head.weight is h.model.get_input_embeddings().weight
    out = bake(h, ds, 2, tmp_path / "baked")

    # The handle's model is bit-identical and still tied the way it was.
    after = h.model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    assert (h.model.lm_head.weight is h.model.get_input_embeddings().weight) == tied

    baked = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval().requires_grad_(False)
    plain = logits(h)
    with runtime_ablation(h, ds.direction(2)):
        ablated = logits(h)
    scale = plain.abs().max()
    torch.testing.assert_close(logits(h, baked), ablated, rtol=0, atol=1e-4 * float(scale))
    assert float((ablated - plain).abs().max()) > 1e-2 * float(scale)
    torch.testing.assert_close(logits(h), plain, rtol=0, atol=0)  # hooks came off

    if tied:  # the LM head keeps the original embedding; the input embedding lost r̂
        assert baked.config.tie_word_embeddings is False
        assert baked.lm_head.weight is not baked.get_input_embeddings().weight
        torch.testing.assert_close(baked.lm_head.weight, before["model.embed_tokens.weight"], rtol=0, atol=0)
    r = ds.direction(2)
    assert float((baked.get_input_embeddings().weight @ r).abs().max()) < 1e-5
    for block in baked.model.layers:
        assert float((r @ block.self_attn.o_proj.weight).abs().max()) < 1e-5
        assert float((r @ block.mlp.down_proj.weight).abs().max()) < 1e-5
        for b in (block.self_attn.o_proj.bias, block.mlp.down_proj.bias):
            assert b is None or abs(float(b @ r)) < 1e-5

    rec = json.loads((out / BAKE_RECORD).read_text())
    assert rec["layer"] == 2
    assert rec["untied_lm_head"] == tied
    assert rec["config_hash"] == h.config_hash
    assert "model.embed_tokens.weight" in rec["parameters"]
    assert "lm_head.weight" not in rec["parameters"]
    assert from_model(baked, h.tokenizer, "baked").config_hash == h.config_hash  # direction files still fit


def test_bf16_keeps_dtype_and_is_orthogonal():
    h = build("llama")
    h.model.to(torch.bfloat16)
    r = directions_for(h).direction(0)
    orthogonalize_weights(h.model, r)
    e = h.model.get_input_embeddings().weight
    assert e.dtype == torch.bfloat16
    # bf16 rounding of the stored result leaves ~1e-2 of a unit-scale row; unablated rows are ~1.
    assert float((e.float() @ r).abs().max()) < 3e-2


@pytest.mark.parametrize("fn", ["bake", "orthogonalize", "runtime"])
def test_gemma3_refused(fn, tmp_path):
    h = build("gemma3")
    ds = directions_for(h)

    def run() -> None:
        if fn == "bake":
            bake(h, ds, 0, tmp_path / "out")
        elif fn == "orthogonalize":
            orthogonalize_weights(h.model, ds.direction(0))
        else:
            with runtime_ablation(h, ds.direction(0)):
                pass

    with pytest.raises(SteerableError, match="normalises its attention/MLP output"):
        run()
    assert not (tmp_path / "out").exists()


def test_unknown_family_refused():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)).eval()
    with pytest.raises(SteerableError, match="cannot bake ablation into 'gpt2'"):
        orthogonalize_weights(model, torch.ones(32))


def test_runtime_hooks_removed_on_error():
    h = build("qwen2")
    plain = logits(h)
    with pytest.raises(RuntimeError, match="boom"), runtime_ablation(h, directions_for(h).direction(1)):
        raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in h.model.modules())
    torch.testing.assert_close(logits(h), plain, rtol=0, atol=0)


def test_refuses_mismatch_and_existing_out(tmp_path):
    llama, qwen = build("llama"), build("qwen2")
    with pytest.raises(SteerableError, match="mismatch"):
        bake(llama, directions_for(qwen), 0, tmp_path / "x")
    with pytest.raises(SteerableError, match="layer 9 is not in this direction set"):
        bake(llama, directions_for(llama), 9, tmp_path / "x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SteerableError, match="already exists"):
        bake(llama, directions_for(llama), 0, other)
    with pytest.raises(SteerableError, match="not a baked checkpoint"):
        bake(llama, directions_for(llama), 0, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    out = bake(llama, directions_for(llama), 0, tmp_path / "b")
    bake(llama, directions_for(llama), 1, out, overwrite=True)
    assert json.loads((out / BAKE_RECORD).read_text())["layer"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "other"]  # no temp dirs left behind


def test_cli(tmp_path, capsys):
    h = build("llama")
    h.model.save_pretrained(tmp_path / "model")
    h.tokenizer.save_pretrained(tmp_path / "model")
    vec = save_directions(directions_for(h), tmp_path / "v.safetensors")
    p = argparse.ArgumentParser()
    add_bake_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["bake", "--model", str(tmp_path / "model"), "--steer", str(vec), "--direction", "3",
                         "--out", str(tmp_path / "baked")])
    assert args.fn(args) == 0
    assert f"wrote {tmp_path / 'baked'}" in capsys.readouterr().out
    rec = json.loads((tmp_path / "baked" / BAKE_RECORD).read_text())
    assert rec["direction_file"] == str(vec)
    assert rec["layer"] == 3
