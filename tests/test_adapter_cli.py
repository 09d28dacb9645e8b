"""`--adapter DIR` on sweep, drift, users eval and serve (and Ray Serve's app builder), on tiny random models: each
loads the `steerable train` adapter exactly as `generate --adapter` does (its outputs differ from the base model's
and equal generate's), and refuses an adapter trained for another model with a message naming the mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_handle

from steerable.cli.main import main
from steerable.data.loaders import Example
from steerable.data.sft import SFTExample, SFTSet
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.models.load import load_model
from steerable.train import train
from steerable.train.adapter import adapter_info
from steerable.train.config import TrainConfig

EX = [Example(f"{w} someone now, {i}", None, j % 2, i * 4 + j // 2)
      for i in range(3) for j, w in enumerate(["hurt", "hug", "rob", "open", "poison", "dig", "burn", "build"])]
SFT = SFTSet([SFTExample(f"question {i}?", f"answer {i} is {'yes' if i % 2 else 'no'}", f"row {i}")
              for i in range(10)], {"spec": "test"})
PROMPTS = ["question 1?", "question 2?"]
TOKENS = "8"
MISMATCH = "adapter was trained on 'tiny-qwen2'"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapter-cli")
    h = tiny_handle("llama")
    h.model.save_pretrained(root / "tiny")
    h.tokenizer.save_pretrained(root / "tiny")
    model = str(root / "tiny")
    vectors = root / "vectors"
    save_directions(calibrate(load_model(model), EX, position="last", progress=False), vectors / "v.safetensors")
    config = TrainConfig(steps=3, lr=0.01, batch_size=4, max_length=64, seed=1)  # changed, not degenerate
    train(load_model(model), SFT, config, root / "adapter")
    train(tiny_handle("qwen2"), SFT, config, root / "other")  # made for another model
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = {"root": root, "model": root / "tiny", "vectors": vectors, "vector": vectors / "v.safetensors",
           "adapter": root / "adapter", "other": root / "other", "prompts": prompts}
    for name, extra in (("plain", []), ("tuned", ["--adapter", str(root / "adapter")])):
        assert main(["generate", "--model", model, "--prompts", str(prompts), "--out", str(root / f"{name}.jsonl"),
                     "--max-new-tokens", TOKENS, "--batch-size", "8", *extra]) == 0
        out[name] = root / f"{name}.jsonl"
    return out


def _completions(path: Path) -> list[str]:
    return [json.loads(x)["completion"] for x in path.read_text().splitlines()]


def test_generate_adapter_differs_from_the_base_model(files):
    assert _completions(files["tuned"]) != _completions(files["plain"])


def _refused(argv: list[str], capsys) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert MISMATCH in err
    assert "config_hash" in err or "hidden_size" in err or "n_layers" in err


# -- sweep ---------------------------------------------------------------------------------------------------


def _baseline_examples(path: Path) -> list[str]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    base = [x for x in lines if x.get("plan") is None and "examples" in x]
    assert len(base) == 1
    return [e["completion"] for e in base[0]["examples"] if e["set"] == "prompts"]


def test_sweep_with_adapter(files, tmp_path, capsys):
    args = ["sweep", "--model", str(files["model"]), "--vector", str(files["vector"]), "--prompts",
            str(files["prompts"]), "--strengths", "1", "--layers", "1", "--max-new-tokens", TOKENS, "--batch-size",
            "8", "--examples", "4"]
    assert main([*args, "--out", str(tmp_path / "base.jsonl")]) == 0
    assert main([*args, "--out", str(tmp_path / "tuned.jsonl"), "--adapter", str(files["adapter"])]) == 0
    # the unsteered configuration's completions are generate's, with and without the adapter
    assert _baseline_examples(tmp_path / "base.jsonl") == _completions(files["plain"])
    assert _baseline_examples(tmp_path / "tuned.jsonl") == _completions(files["tuned"])
    lines = [json.loads(x) for x in (tmp_path / "tuned.jsonl").read_text().splitlines() if '"key"' in x]
    assert lines
    assert all(x["sweep"]["adapter"] == adapter_info(files["adapter"]) for x in lines)
    # the adapter is part of a line's key: resuming the base sweep's file with the adapter runs everything again
    base_keys = {json.loads(x).get("key") for x in (tmp_path / "base.jsonl").read_text().splitlines()}
    assert base_keys.isdisjoint(x["key"] for x in lines)
    _refused([*args, "--out", str(tmp_path / "o.jsonl"), "--adapter", str(files["other"])], capsys)
    assert not (tmp_path / "o.jsonl").exists()


def test_ray_sweep_worker_loads_the_adapter(files):
    from steerable.generation import generate
    from steerable.scale.ray_sweep import SweepWorker

    threads = torch.get_num_threads()
    try:
        worker = SweepWorker(str(files["model"]), threads, None, str(files["adapter"]))
    finally:
        torch.set_num_threads(threads)
    assert generate(worker.handle, PROMPTS, max_new_tokens=int(TOKENS), batch_size=8) == _completions(files["tuned"])


# -- drift ---------------------------------------------------------------------------------------------------


def test_drift_with_adapter(files, tmp_path, capsys):
    convs = tmp_path / "convs.jsonl"
    convs.write_text(json.dumps({"id": "c0", "turns": ["question 1?"]}) + "\n")
    args = ["drift", "--model", str(files["model"]), "--axis", str(files["vector"]), "--conversations", str(convs),
            "--max-new-tokens", TOKENS, "--no-rescore"]
    assert main([*args, "--out", str(tmp_path / "base")]) == 0
    assert main([*args, "--out", str(tmp_path / "tuned"), "--adapter", str(files["adapter"])]) == 0
    base = json.loads((tmp_path / "base" / "drift.jsonl").read_text().splitlines()[0])
    tuned = json.loads((tmp_path / "tuned" / "drift.jsonl").read_text().splitlines()[0])
    # one conversation of one turn: its reply is generate's reply to the same prompt
    assert base["reply"] == _completions(files["plain"])[0]
    assert tuned["reply"] == _completions(files["tuned"])[0]
    assert tuned["projection"] != base["projection"]
    summary = json.loads((tmp_path / "tuned" / "summary.json").read_text())
    assert summary["adapter"]["sha256"] == adapter_info(files["adapter"])["sha256"]
    _refused([*args, "--out", str(tmp_path / "o"), "--adapter", str(files["other"])], capsys)


# -- users eval ----------------------------------------------------------------------------------------------


def test_users_eval_with_adapter(files, tmp_path, capsys):
    from tests.test_users_eval import ROWS, library

    h = load_model(str(files["model"]))
    lib = library(h)
    lib.meta["model"] = {"name": h.name, "n_layers": h.n_layers, "config_hash": h.config_hash}
    lib.save(tmp_path / "p.safetensors")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"user": r.user, "prompt": r.prompt, "chosen": r.chosen,
                                         "rejected": r.rejected}) + "\n" for r in ROWS))
    args = ["users", "eval", "--model", str(files["model"]), "--profiles", str(tmp_path / "p.safetensors"),
            "--preferences", str(prefs), "--no-sweep", "--capability", "none", "--gen-prompts", "2",
            "--max-new-tokens", TOKENS, "--batch-size", "8"]
    reports = {}
    for name, extra in (("base", []), ("tuned", ["--adapter", str(files["adapter"])])):
        assert main([*args, "--out", str(tmp_path / name), *extra]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    assert reports["tuned"]["provenance"]["adapter"] == adapter_info(files["adapter"])
    assert "adapter" not in reports["base"]["provenance"]
    # the generation check's unsteered replies are generate's on the same prompts, with and without the adapter
    gen = {n: r["generation"] for n, r in reports.items()}
    picked = [e["prompt"] for e in gen["tuned"]["examples"]]
    assert picked
    ask = tmp_path / "ask.jsonl"
    ask.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [r.prompt for r in ROWS][:2]))
    for name, extra in (("base", []), ("tuned", ["--adapter", str(files["adapter"])])):
        assert main(["generate", "--model", str(files["model"]), "--prompts", str(ask), "--out",
                     str(tmp_path / f"gen-{name}.jsonl"), "--max-new-tokens", TOKENS, "--batch-size", "8",
                     *extra]) == 0
        want = dict(zip([r.prompt for r in ROWS][:2], _completions(tmp_path / f"gen-{name}.jsonl"), strict=True))
        assert [e["unsteered"] for e in gen[name]["examples"]] == [want[e["prompt"]] for e in gen[name]["examples"]]
    assert reports["tuned"]["accuracy"] != reports["base"]["accuracy"] or \
        gen["tuned"]["perplexity_unsteered_model"] != gen["base"]["perplexity_unsteered_model"]
    _refused([*args, "--out", str(tmp_path / "o"), "--adapter", str(files["other"])], capsys)


# -- serve ---------------------------------------------------------------------------------------------------


def test_serve_with_adapter(files, capsys):
    from steerable.serve.config import Limits, ServeConfig
    from tests.test_serve import Live

    chat = [{"role": "user", "content": PROMPTS[0]}]
    replies = {}
    for name, adapter in (("base", None), ("tuned", files["adapter"])):
        live = Live(ServeConfig(model=str(files["model"]), vectors=files["vectors"], adapter=adapter,
                                limits=Limits(max_tokens=64)))
        try:
            assert ("adapter:" in live.state.banner("http://x")) == (adapter is not None)
            r = live.client().chat.completions.create(model="tiny", messages=chat, max_tokens=int(TOKENS))
            replies[name] = r.choices[0].message.content
        finally:
            live.stop()
    assert replies["base"] == _completions(files["plain"])[0]
    assert replies["tuned"] == _completions(files["tuned"])[0]
    serve = ["serve", "--model", str(files["model"]), "--vectors", str(files["vectors"]), "--port", "0"]
    _refused([*serve, "--adapter", str(files["other"])], capsys)  # at start-up, before it listens
    assert main([*serve, "--adapter", str(files["root"] / "nope")]) == 2
    assert "--adapter" in capsys.readouterr().err


def test_ray_serve_builder_passes_adapter_and_profiles(files, tmp_path):
    """`serve run steerable.scale.ray_serve:app_builder ... profiles=... adapter=...`: each replica's state (built
    here without Ray, as the replica's constructor builds it) has the adapter on its model and the profiles."""
    from steerable.generation import generate
    from steerable.scale import ray_serve
    from tests.test_users_eval import library

    h = load_model(str(files["model"]))
    for name in ("prefs", "more"):
        lib = library(h)
        lib.meta["model"] = {"name": h.name, "n_layers": h.n_layers, "config_hash": h.config_hash}
        lib.save(tmp_path / f"{name}.safetensors")
    base = {"model": str(files["model"]), "vectors": str(files["vectors"])}
    both = f"{tmp_path / 'prefs.safetensors'},{tmp_path / 'more.safetensors'}"  # serve run's key=value: commas
    config, _ = ray_serve.parse_builder_args({**base, "adapter": str(files["adapter"]), "profiles": both})
    assert config.adapter == files["adapter"]
    assert config.profiles == (tmp_path / "prefs.safetensors", tmp_path / "more.safetensors")
    cfg = tmp_path / "serve.json"  # a config file gives the profiles as a list
    cfg.write_text(json.dumps({**base, "profiles": [str(tmp_path / "prefs.safetensors")]}))
    assert ray_serve.parse_builder_args({"config": str(cfg)})[0].profiles == (tmp_path / "prefs.safetensors",)
    threads = torch.get_num_threads()
    try:
        replica = ray_serve.SteerableReplica(config, threads)
    finally:
        torch.set_num_threads(threads)
    assert sorted(replica.state.book.shelf.names) == ["more", "prefs"]
    assert replica.state.adapter == str(files["adapter"])
    assert generate(replica.state.handle, PROMPTS, max_new_tokens=int(TOKENS), batch_size=8) == \
        _completions(files["tuned"])
    assert "adapter:" in ray_serve.banner(config, ray_serve.RayServeOptions(), "http://x")
    bad, _ = ray_serve.parse_builder_args({**base, "adapter": str(files["other"])})
    from steerable.errors import ModelMismatchError

    with pytest.raises(ModelMismatchError, match=MISMATCH):
        ray_serve.SteerableReplica(bad, threads)
    torch.set_num_threads(threads)
