"""`steerable train --resume` on tiny random models: a run interrupted after step k and resumed from its checkpoint
writes the same train_log.jsonl (and adapter) as a run never interrupted; a re-seeded run reproduces its log;
checkpoints are safetensors + JSON, written atomically; a resume under other settings is refused, naming the
setting."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_handle

from steerable.cli.main import main
from steerable.data.loaders import Example
from steerable.data.sft import SFTExample, SFTSet
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.errors import ArtifactError, SteerableError
from steerable.train import TrainConfig, train
from steerable.train.checkpoint import CHECKPOINT_FILE

EX = [Example(f"{w} someone now, {i}", None, j % 2, i * 4 + j // 2)
      for i in range(3) for j, w in enumerate(["hurt", "hug", "rob", "open", "poison", "dig", "burn", "build"])]
SFT = SFTSet([SFTExample(f"question {i}?", f"answer {i} is {'yes' if i % 2 else 'no'}", f"row {i}")
              for i in range(10)], {"spec": "test"})


class Interrupt(Exception):
    """Stands for a killed process: raised from the step callback once step `k` is logged."""


def _config(**kw) -> TrainConfig:
    base = {"steps": 7, "batch_size": 4, "max_length": 64, "lr": 1e-2, "seed": 0}
    return TrainConfig(**{**base, **kw})


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _same_log(a: list[dict], b: list[dict]) -> None:
    assert [x["step"] for x in a] == [x["step"] for x in b]
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for key, v in x.items():
            if key != "seconds":
                assert v == pytest.approx(y[key], rel=1e-6, abs=1e-9), (x["step"], key)


def _interrupted(config: TrainConfig, out: Path, at: int, every: int, family: str = "llama") -> None:
    def stop(line: dict) -> None:
        if line["step"] == at:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(tiny_handle(family), SFT, config, out, on_step=stop, checkpoint_every=every)


@pytest.fixture(scope="module")
def ds():
    return calibrate(tiny_handle("llama"), EX, position="last", progress=False)


def _lora_weights(handle) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in handle.model.named_parameters() if "lora_" in n}


# dropout consumes the RNG every step, so these runs also check that the RNG state is restored
@pytest.mark.parametrize(("method", "extra"), [("none", {"lora_dropout": 0.1}), ("aux", {}), ("contrastive", {}),
                                               ("preventative", {"strength": 2.0})])
def test_resumed_run_reproduces_the_uninterrupted_log(ds, tmp_path, method, extra):
    vector = {} if method == "none" else {"vector": ds, "layers": "1-2"}
    config = _config(method=method, **vector, **extra)
    whole = tiny_handle("llama")
    train(whole, SFT, config, tmp_path / "whole", checkpoint_every=2)
    # killed after step 5: the last checkpoint is step 4, so step 5 is in the log but is run again
    _interrupted(config, tmp_path / "cut", at=5, every=2)
    assert len(_log(tmp_path / "cut")) == 5
    assert not (tmp_path / "cut" / "steering.json").exists()
    ck = json.loads((tmp_path / "cut" / CHECKPOINT_FILE).read_text())
    assert ck["step"] == 4
    resumed = tiny_handle("llama")
    result = train(resumed, SFT, config, tmp_path / "cut", resume=True, checkpoint_every=2)
    _same_log(_log(tmp_path / "cut"), _log(tmp_path / "whole"))
    _same_log(result.log, _log(tmp_path / "whole"))
    assert result.record["resumed_from_step"] == 4
    assert result.record["final"] == pytest.approx(json.loads((tmp_path / "whole" / "steering.json").read_text()
                                                              )["final"], rel=1e-6)
    a, b = _lora_weights(whole), _lora_weights(resumed)
    assert a
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-8)
    # finished: the checkpoint is gone, the adapter and steering.json are there
    assert not (tmp_path / "cut" / CHECKPOINT_FILE).exists()
    assert not list((tmp_path / "cut").glob("checkpoint-*.safetensors"))
    assert (tmp_path / "cut" / "adapter_model.safetensors").is_file()


def test_resume_twice_and_at_a_checkpoint_step(tmp_path):
    config = _config(steps=6)
    train(tiny_handle("llama"), SFT, config, tmp_path / "whole", checkpoint_every=1)
    out = tmp_path / "cut"
    _interrupted(config, out, at=2, every=1)  # killed right after the checkpoint of step 2
    assert len(_log(out)) == 2

    def stop(line: dict) -> None:
        if line["step"] == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(tiny_handle("llama"), SFT, config, out, resume=True, on_step=stop, checkpoint_every=1)
    train(tiny_handle("llama"), SFT, config, out, resume=True, checkpoint_every=1)
    _same_log(_log(out), _log(tmp_path / "whole"))


def test_reseeded_run_reproduces_its_log_with_checkpoints(tmp_path):
    config = _config(lora_dropout=0.2, seed=5)
    train(tiny_handle("llama"), SFT, config, tmp_path / "a", checkpoint_every=3)
    train(tiny_handle("llama"), SFT, config, tmp_path / "b", checkpoint_every=0)
    train(tiny_handle("llama"), SFT, _config(lora_dropout=0.2, seed=6), tmp_path / "c", checkpoint_every=3)
    drop = [{k: v for k, v in x.items() if k != "seconds"} for x in _log(tmp_path / "a")]
    assert drop == [{k: v for k, v in x.items() if k != "seconds"} for x in _log(tmp_path / "b")]
    assert drop != [{k: v for k, v in x.items() if k != "seconds"} for x in _log(tmp_path / "c")]


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    out = tmp_path / "run"
    _interrupted(_config(), out, at=5, every=2)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint-00000004.safetensors", CHECKPOINT_FILE, "train_log.jsonl"]  # older ones removed
    from safetensors.torch import load_file

    tensors = load_file(str(out / "checkpoint-00000004.safetensors"))
    assert any(k.startswith("param.") and "lora_A" in k for k in tensors)
    assert any(k.endswith(".exp_avg_sq") for k in tensors)
    assert "rng.torch" in tensors
    record = json.loads((out / CHECKPOINT_FILE).read_text())
    assert record["state_file"] == "checkpoint-00000004.safetensors"
    assert record["identity"]["lr"] == 1e-2
    assert record["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]
    for p in out.iterdir():  # no pickle anywhere: JSON or safetensors only
        assert p.suffix in (".json", ".jsonl", ".safetensors"), p
    # a damaged state file is refused, not half-loaded
    state = out / record["state_file"]
    state.write_bytes(state.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ArtifactError, match="sha256 differs"):
        train(tiny_handle("llama"), SFT, _config(), out, resume=True)


@pytest.mark.parametrize(("change", "field"), [
    ({"lr": 2e-2}, "lr (--lr)"), ({"seed": 1}, "seed (--seed)"), ({"steps": 8}, "steps (--steps)"),
    ({"lora_r": 4}, "lora_r (--lora-r)"), ({"method": "caft"}, "method (--method)")])
def test_resume_under_other_settings_is_refused_naming_the_field(ds, tmp_path, change, field):
    out = tmp_path / "run"
    _interrupted(_config(), out, at=3, every=2)
    kw = {"vector": ds, "layers": "1"} if change.get("method") == "caft" else {}
    with pytest.raises(SteerableError, match=re.escape(f"started with {field} = ")):
        train(tiny_handle("llama"), SFT, _config(**change, **kw), out, resume=True)


def test_resume_with_other_data_or_model_or_nothing_to_resume_is_refused(tmp_path):
    out = tmp_path / "run"
    _interrupted(_config(), out, at=3, every=2)
    other = SFTSet([SFTExample(e.prompt, e.response + "!", e.where) for e in SFT.examples], SFT.provenance)
    with pytest.raises(SteerableError, match=r"data \(--data\)"):
        train(tiny_handle("llama"), other, _config(), out, resume=True)
    with pytest.raises(SteerableError, match=r"model \(--model\)"):
        train(tiny_handle("qwen2"), SFT, _config(), out, resume=True)
    with pytest.raises(ArtifactError, match="no such directory"):
        train(tiny_handle("llama"), SFT, _config(), tmp_path / "nope", resume=True)
    early = tmp_path / "early"
    _interrupted(_config(), early, at=1, every=2)
    with pytest.raises(ArtifactError, match="no checkpoint yet"):
        train(tiny_handle("llama"), SFT, _config(), early, resume=True)
    done = tmp_path / "done"
    train(tiny_handle("llama"), SFT, _config(steps=2), done)
    with pytest.raises(ArtifactError, match="the run is finished"):
        train(tiny_handle("llama"), SFT, _config(steps=2), done, resume=True)
    with pytest.raises(ArtifactError, match="already holds a training run"):  # and without --resume, as before
        train(tiny_handle("llama"), SFT, _config(), out)


def test_cli_resume_reproduces_the_uninterrupted_cli_run(model_dir, tmp_path, capsys):
    from steerable.models.load import load_model

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in SFT.examples))
    vector = tmp_path / "v.safetensors"
    save_directions(calibrate(load_model(model_dir), EX, position="last", progress=False), vector)
    flags = ["--model", model_dir, "--data", str(data), "--steps", "5", "--lr", "0.05", "--batch-size", "4",
             "--seed", "1", "--method", "aux", "--vector", str(vector), "--layers", "1-2", "--checkpoint-every", "2"]
    assert main(["train", *flags, "--out", str(tmp_path / "whole")]) == 0
    # the interrupted part: the same settings through the library (the CLI's config), killed after step 3
    from steerable.data.sft import load_sft

    config = TrainConfig(method="aux", vector=str(vector), layers="1-2", steps=5, lr=0.05, batch_size=4, seed=1)

    def stop(line: dict) -> None:
        if line["step"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(load_model(model_dir), load_sft(str(data)), config, tmp_path / "cut", on_step=stop, checkpoint_every=2)
    capsys.readouterr()
    assert main(["train", *flags, "--lr", "0.02", "--out", str(tmp_path / "cut"), "--resume"]) == 2
    assert "started with lr (--lr) = 0.05, this one has 0.02" in capsys.readouterr().err
    assert main(["train", *flags, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert "resumed at step 2" in capsys.readouterr().err
    _same_log(_log(tmp_path / "cut"), _log(tmp_path / "whole"))
    assert main(["train", *flags, "--out", str(tmp_path / "cut"), "--resume"]) == 2
    assert "the run is finished" in capsys.readouterr().err


@pytest.mark.integration
def test_resume_on_the_bundled_model(tmp_path):
    """smollm2-135m, LoRA r 8 on every linear layer, 4 steps of sycophancy-sft: killed after step 3 (checkpoint at
    step 2), resumed: the log equals the uninterrupted run's."""
    from steerable.data.sft import load_sft
    from steerable.models.load import load_model

    sft = load_sft("sycophancy-sft")
    config = TrainConfig(steps=4, batch_size=2, max_length=320, lr=1e-3, seed=0)
    train(load_model("smollm2-135m"), sft, config, tmp_path / "whole", checkpoint_every=2)

    def stop(line: dict) -> None:
        if line["step"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(load_model("smollm2-135m"), sft, config, tmp_path / "cut", on_step=stop, checkpoint_every=2)
    state = next((tmp_path / "cut").glob("checkpoint-*.safetensors"))
    print(f"checkpoint: {state.stat().st_size / 2**20:.1f} MiB")
    train(load_model("smollm2-135m"), sft, config, tmp_path / "cut", resume=True, checkpoint_every=2)
    _same_log(_log(tmp_path / "cut"), _log(tmp_path / "whole"))
