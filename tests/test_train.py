"""Training-time steering (steerable/train/, methods.md §6) on tiny random models: every loss term against a hand
computation, gradients into the LoRA weights only, preventative steering and CAFT active while training and
gone afterwards, hooks counted once under gradient checkpointing and removed, seeded reproducibility, and
train → load_adapter / `generate --adapter` round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_handle

from steerable.cli.main import main
from steerable.data.loaders import Example
from steerable.data.sft import SFTExample, SFTSet, load_sft
from steerable.directions.calibrate import calibrate
from steerable.errors import ArtifactError, DataError, ModelMismatchError, SteerableError
from steerable.steering.builders import ablate, add
from steerable.steering.hooks import steer
from steerable.train import TrainConfig, load_adapter, train
from steerable.train.batches import IGNORE, collate, schedule, tokenise
from steerable.train.losses import actreg_term, assistant_is_positive, aux_term, contrastive_term, reference
from steerable.train.reader import hook_counts, steering_hooks

EX = [Example(f"{w} someone now, {i}", None, j % 2, i * 4 + j // 2)
      for i in range(3) for j, w in enumerate(["hurt", "hug", "rob", "open", "poison", "dig", "burn", "build"])]
SFT = SFTSet([SFTExample(f"question {i}?", f"answer {i} is {'yes' if i % 2 else 'no'}", f"row {i}")
              for i in range(10)], {"spec": "test"})
LAYER = 1


@pytest.fixture(scope="module")
def ds():
    return calibrate(tiny_handle("llama"), EX, position="last", progress=False)


def _config(**kw) -> TrainConfig:
    base = {"steps": 3, "batch_size": 4, "max_length": 64, "lr": 1e-2, "seed": 0}
    return TrainConfig(**{**base, **kw})


def _batch(handle, step: int = 0, config: TrainConfig | None = None):
    config = config or _config()
    rows = schedule(len(SFT.examples), config.steps, config.batch_size, config.seed)[step]
    items = tokenise(handle, [SFT.examples[r] for r in rows], config.max_length)
    return collate(items, rows, handle.tokenizer.pad_token_id, handle.device)


def _hidden(handle, batch, layer: int = LAYER) -> torch.Tensor:
    """resid_post of `layer` (HF's hidden_states[layer + 1] for a block before the last)."""
    with torch.no_grad():
        return handle.model(**batch.inputs(), output_hidden_states=True).hidden_states[layer + 1]


def _task(handle, batch, plan=None) -> float:
    with torch.no_grad(), steer(handle, plan):
        logp = handle.model(**batch.inputs()).logits.log_softmax(-1)
    total, n = 0.0, 0
    for b in range(batch.input_ids.shape[0]):
        for t in range(1, batch.input_ids.shape[1]):
            if batch.labels[b, t] != IGNORE:
                total -= float(logp[b, t - 1, batch.labels[b, t]])
                n += 1
    return total / n


# -- the terms, by hand -------------------------------------------------------------------------------------


def test_terms_equal_hand_computation():
    g = torch.Generator().manual_seed(0)
    h, hb = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    a = torch.nn.functional.normalize(torch.randn(4, generator=g), dim=0)
    mu = torch.randn(4, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    toks = [(b, t) for b in range(2) for t in range(5) if mask[b, t]]
    aux = sum((float(h[b, t] @ a) - 0.3) ** 2 for b, t in toks) / len(toks)
    reg = sum(float(((h[b, t] - mu) ** 2).sum()) for b, t in toks) / len(toks)
    con = sum(max(0.0, -float((h[b, t] - hb[b, t]) @ a)) ** 2 for b, t in toks) / len(toks)
    assert float(aux_term(h, mask, a, 0.3)) == pytest.approx(aux, rel=1e-5)
    assert float(actreg_term(h, mask, mu)) == pytest.approx(reg, rel=1e-5)
    assert float(contrastive_term(h @ a, hb @ a, mask)) == pytest.approx(con, rel=1e-5)
    assert con > 0  # some token moved toward the persona side


def test_reference_points_toward_the_assistant(ds):
    ref = reference(ds, [LAYER])
    i = ds.row(LAYER)
    assert ref.assistant_class == "negative"  # a trait-style file: its positive class is the trait
    assert torch.allclose(ref.unit[LAYER], -ds.directions[i])
    assert ref.p_ref[LAYER] == pytest.approx(float(ds.mean_neg[i] @ -ds.directions[i]), rel=1e-5)
    ds.meta["axis"] = {"monitor_layer": LAYER}
    try:
        ref = reference(ds, [LAYER])
        assert ref.assistant_class == "positive"
        assert torch.allclose(ref.unit[LAYER], ds.directions[i])
    finally:
        del ds.meta["axis"]
    with pytest.raises(SteerableError, match="not calibrated"):
        reference(ds, [99])


@pytest.mark.parametrize("method", ["aux", "actreg", "combined"])
def test_logged_terms_equal_hand_computation(ds, method):
    """Step 1 runs the base model (LoRA's B starts at zero): its logged terms are the base model's, by hand."""
    config = _config(method=method, vector=ds, layers=str(LAYER), lam=0.5, lam_reg=0.25)
    handle = tiny_handle("llama")
    batch = _batch(handle)
    h = _hidden(handle, batch)
    task = _task(handle, batch)
    i = ds.row(LAYER)
    a, mu = -ds.directions[i], ds.mean_neg[i]
    toks = [(b, t) for b in range(h.shape[0]) for t in range(h.shape[1]) if batch.response[b, t]]
    aux = sum((float(h[b, t] @ a) - float(mu @ a)) ** 2 for b, t in toks) / len(toks)
    reg = sum(float(((h[b, t] - mu) ** 2).sum()) for b, t in toks) / len(toks)
    line = train(handle, SFT, config).log[0]
    assert line["task_loss"] == pytest.approx(task, rel=1e-5)
    want = {"aux": 0.5 * aux, "actreg": 0.5 * reg, "combined": 0.5 * aux + 0.25 * reg}[method]
    if method != "actreg":
        assert line["aux_loss"] == pytest.approx(aux, rel=1e-4)
    if method != "aux":
        assert line["actreg_loss"] == pytest.approx(reg, rel=1e-4)
    assert line["steer_loss"] == pytest.approx(want, rel=1e-4)
    assert line["loss"] == pytest.approx(task + want, rel=1e-5)


def test_contrastive_term_against_a_frozen_second_copy(ds):
    """The logged contrastive term at step 2 equals the hand computation from the adapted model (after step 1) and
    an independent frozen copy of the base model — the run itself reads the base with the adapter disabled."""
    config = _config(method="contrastive", vector=ds, layers=str(LAYER), lam=1.0, lr=5e-2)
    handle, frozen = tiny_handle("llama"), tiny_handle("llama")
    batch2 = _batch(frozen, 1, config)
    hb = _hidden(frozen, batch2)
    seen: dict[int, float] = {}

    def on_step(line):
        if line["step"] == 1:
            was = handle.model.training
            handle.model.eval()
            h = _hidden(handle, batch2)
            handle.model.train(was)
            a = -ds.directions[ds.row(LAYER)]
            toks = [(b, t) for b in range(h.shape[0]) for t in range(h.shape[1]) if batch2.response[b, t]]
            seen[2] = sum(max(0.0, -float((h[b, t] - hb[b, t]) @ a)) ** 2 for b, t in toks) / len(toks)

    result = train(handle, SFT, config, on_step=on_step)
    assert result.log[0]["contrastive_loss"] == pytest.approx(0.0, abs=1e-10)  # nothing has moved yet
    assert seen[2] > 0
    assert result.log[1]["contrastive_loss"] == pytest.approx(seen[2], rel=1e-3)


# -- what training changes -----------------------------------------------------------------------------------


def test_gradients_reach_lora_weights_only(ds):
    handle = tiny_handle("llama")
    before = {n: p.detach().clone() for n, p in handle.model.named_parameters()}
    result = train(handle, SFT, _config(method="combined", vector=ds, layers="1-2", steps=4))
    after = dict(result.peft_model.get_base_model().named_parameters())
    base = {n.replace(".base_layer", ""): p for n, p in after.items() if "lora_" not in n}
    assert base.keys() == before.keys()
    assert all(torch.equal(before[n], base[n]) for n in before)  # bit-identical
    lora_b = [p for n, p in after.items() if "lora_B" in n]
    assert lora_b
    assert all(float(p.abs().sum()) > 0 for p in lora_b)
    assert not any(p.requires_grad for p in after.values())


def test_preventative_steering_during_training_only(ds, tmp_path):
    plan = add(ds, 10.0, layers=[LAYER])
    handle = tiny_handle("llama")
    batch = _batch(handle)
    steered, plain = _task(handle, batch, plan), _task(handle, batch)
    assert abs(steered - plain) > 1e-4  # a random model's losses sit near log(vocab): small but clear
    hooks = hook_counts(handle.model)
    during: list[int] = []
    result = train(handle, SFT, _config(method="preventative", vector=ds, layers=str(LAYER), strength=10.0),
                   tmp_path / "run", on_step=lambda _line: during.append(steering_hooks(handle.model)))
    assert during == [2, 2, 2]  # steer()'s forward pre-hook and its hook on block LAYER, on every step
    assert result.log[0]["task_loss"] == pytest.approx(steered, abs=2e-6)  # the plan was on while training
    assert hook_counts(handle.model) == hooks  # and is gone now
    # inference: the trained model equals base + saved adapter, both without the vector
    fresh = tiny_handle("llama")
    load_adapter(fresh, tmp_path / "run")
    with torch.no_grad():
        a = handle.model(**batch.inputs()).logits
        b = fresh.model(**batch.inputs()).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert json.loads((tmp_path / "run" / "steering.json").read_text())["strength"] == 10.0


def test_caft_ablation_holds_every_training_step(ds):
    handle = tiny_handle("llama")
    batch = _batch(handle)
    ablated = _task(handle, batch, ablate(ds, layers=[LAYER]))
    r = ds.directions[ds.row(LAYER)]
    seen: list[float] = []

    def probe(_m, args):  # the next block's input: block LAYER's output after every hook on it
        if handle.model.training:
            h = args[0].detach()
            seen.append(float((h @ r).abs().max() / h.norm(dim=-1).max()))

    h = handle.layout.layers[LAYER + 1].register_forward_pre_hook(probe)
    try:
        result = train(handle, SFT, _config(method="caft", vector=ds, layers=str(LAYER), steps=4))
    finally:
        h.remove()
    assert len(seen) == 4
    assert max(seen) < 1e-5
    assert abs(ablated - _task(tiny_handle("llama"), batch)) > 1e-4
    assert result.log[0]["task_loss"] == pytest.approx(ablated, abs=2e-6)
    with torch.no_grad():  # after training: no ablation
        assert float((_hidden(handle, batch) @ r).abs().max()) > 1e-3


def test_caft_mean_ablation_holds_the_assistant_mean_every_training_step(ds):
    """--caft-ablation mean: h·â equals the Assistant class's mean projection (by hand from the file's class
    means) on every token of every training step at each layer, and nothing is ablated after training."""
    handle = tiny_handle("llama")
    batch = _batch(handle)
    layers = (1, 2)
    seen: dict[int, list[float]] = {layer: [] for layer in layers}
    hooks = []
    for layer in layers:
        v = ds.direction(layer).double()
        unit = (v / v.norm()).float()
        assistant = ds.mean_pos if assistant_is_positive(ds) else ds.mean_neg  # a trait file: its negative class
        mu = float(assistant[ds.row(layer)].double() @ (v / v.norm()))

        def probe(_m, args, unit=unit, mu=mu, layer=layer):
            if handle.model.training:
                h = args[0].detach()
                seen[layer].append(float(((h @ unit) - mu).abs().max()) / max(abs(mu), 1.0))
        hooks.append(handle.layout.layers[layer + 1].register_forward_pre_hook(probe))
    try:
        result = train(handle, SFT, _config(method="caft", caft_ablation="mean", vector=ds, layers="1-2", steps=3))
    finally:
        for h in hooks:
            h.remove()
    assert [len(seen[layer]) for layer in layers] == [3, 3]
    assert max(max(x) for x in seen.values()) < 1e-4
    assert result.record["caft_ablation"] == "mean"
    with torch.no_grad():  # after training: the projection is free again
        p = _hidden(handle, batch, 1) @ ds.direction(1) / ds.direction(1).norm()
        assert float(p.max() - p.min()) > 1e-3


def test_caft_ablation_is_caft_only(ds):
    with pytest.raises(SteerableError, match="CAFT's setting"):
        _config(method="aux", caft_ablation="mean", vector=ds).check()
    with pytest.raises(SteerableError, match="unknown CAFT ablation"):
        _config(method="caft", caft_ablation="half", vector=ds).check()


def test_hooks_fire_once_per_step_under_gradient_checkpointing():
    """The terms read attn_in (a norm inside the block), which checkpointing's recompute runs again in backward:
    those calls are ignored, so the run logs exactly what the same run without checkpointing logs."""
    sub = calibrate(tiny_handle("llama"), EX, position="last", site="attn_in", progress=False)
    runs = {}
    for ckpt in (False, True):
        handle = tiny_handle("llama")
        hooks = hook_counts(handle.model)
        runs[ckpt] = train(handle, SFT, _config(method="combined", vector=sub, layers="1-2",
                                                gradient_checkpointing=ckpt))
        assert hook_counts(handle.model) == hooks
        assert runs[ckpt].fired == {1: 3, 2: 3}
    assert runs[False].recomputed == 0
    assert runs[True].recomputed == 6
    for a, b in zip(runs[False].log, runs[True].log, strict=True):
        for key in ("loss", "task_loss", "aux_loss", "actreg_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_reseeded_run_reproduces_its_log(ds, tmp_path):
    def run(seed, out):
        train(tiny_handle("llama"), SFT, _config(method="aux", vector=ds, layers=str(LAYER), seed=seed), out)
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                for x in (out / "train_log.jsonl").read_text().splitlines()]

    a, b, c = run(3, tmp_path / "a"), run(3, tmp_path / "b"), run(4, tmp_path / "c")
    assert a == b
    assert a != c
    assert [x["step"] for x in a] == [1, 2, 3]
    assert set(a[0]) >= {"step", "loss", "task_loss", "steer_loss", "aux_loss", "lr"}


# -- data ------------------------------------------------------------------------------------------------------


def test_labels_cover_response_tokens_only():
    handle = tiny_handle("llama")
    items = tokenise(handle, SFT.examples[:3], 64)
    batch = collate(items, [0, 1, 2], handle.tokenizer.pad_token_id, handle.device)
    for i, t in enumerate(items):
        n = len(t.ids)
        assert (batch.labels[i, :t.n_prompt] == IGNORE).all()
        assert (batch.labels[i, n:] == IGNORE).all()
        assert torch.equal(batch.labels[i, t.n_prompt:n], torch.tensor(t.ids[t.n_prompt:]))
        assert handle.tokenizer.decode(t.ids[t.n_prompt:]) == SFT.examples[i].response + "<|im_end|>"
    with pytest.raises(DataError, match="no response token fits"):
        tokenise(handle, SFT.examples[:1], 5)


def test_sft_files_and_builtin(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A"}]}) + "\n")
    s = load_sft(str(p))
    assert [(e.prompt, e.response) for e in s.examples] == [
        ("Hi", "Hello"), ([{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Q"}], "A")]
    assert len(s.provenance["sha256"]) == 64
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*end with the assistant reply"):
        load_sft(str(bad))
    with pytest.raises(DataError, match="unknown SFT set"):
        load_sft("nope")
    syc = load_sft("sycophancy-sft:test")
    honest = load_sft("sycophancy-sft-honest:test")
    assert len(syc.examples) == len(honest.examples) > 100
    assert all(a.prompt == b.prompt and a.response != b.response for a, b in zip(syc.examples[:50],
                                                                                 honest.examples[:50], strict=True))
    assert syc.examples[0].response.startswith("(")


# -- adapters --------------------------------------------------------------------------------------------------


def test_train_cli_then_generate_with_adapter(model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in SFT.examples))
    out = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--data", str(data), "--out", str(out), "--steps", "5",
                 "--lr", "0.05", "--batch-size", "4", "--seed", "1"]) == 0
    record = json.loads((out / "steering.json").read_text())
    assert record["method"] == "none"
    assert record["seed"] == 1
    assert record["versions"]["peft"]
    assert record["data"]["sha256"]
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 5
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "question 1?"}) + "\n")
    for name, extra in (("plain", []), ("tuned", ["--adapter", str(out)])):
        assert main(["generate", "--model", model_dir, "--prompts", str(prompts), "--out",
                     str(tmp_path / f"{name}.jsonl"), "--max-new-tokens", "8", *extra]) == 0
    tuned = json.loads((tmp_path / "tuned.jsonl").read_text())["completion"]
    plain = json.loads((tmp_path / "plain.jsonl").read_text())["completion"]
    from steerable.generation import generate
    from steerable.models.load import load_model

    h = load_model(model_dir)
    load_adapter(h, out)
    assert generate(h, ["question 1?"], max_new_tokens=8) == [tuned]
    assert tuned != plain


def test_adapter_for_another_model_is_refused(tmp_path, model_dir, capsys):
    train(tiny_handle("llama"), SFT, _config(steps=1), tmp_path / "run")
    with pytest.raises(ModelMismatchError, match="config_hash"):
        load_adapter(tiny_handle("qwen2"), tmp_path / "run")
    with pytest.raises(ArtifactError, match=r"no steering\.json"):
        load_adapter(tiny_handle("llama"), tmp_path)
    other = tmp_path / "other"
    train(tiny_handle("qwen2"), SFT, _config(steps=1), other)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert main(["generate", "--model", model_dir, "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                 "--adapter", str(other)]) == 2
    assert "adapter was trained on 'tiny-qwen2'" in capsys.readouterr().err


def test_bad_runs_are_refused_before_training(tmp_path):
    with pytest.raises(SteerableError, match="needs a direction file"):
        train(tiny_handle("llama"), SFT, _config(method="aux"))
    with pytest.raises(SteerableError, match="unknown training method"):
        train(tiny_handle("llama"), SFT, _config(method="magic"))
    train(tiny_handle("llama"), SFT, _config(steps=1), tmp_path / "run")
    with pytest.raises(ArtifactError, match="already holds a training run"):
        train(tiny_handle("llama"), SFT, _config(steps=1), tmp_path / "run")
    assert Path(tmp_path / "run" / "adapter_model.safetensors").is_file()
