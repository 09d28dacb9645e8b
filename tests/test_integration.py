"""Integration tests on the real bundled default model (fetched by `make test`)."""

from __future__ import annotations

import pytest

from steerable.data.loaders import contrastive_examples, load_prompts
from steerable.directions.calibrate import calibrate
from steerable.evaluate.refusal import refusal_rate
from steerable.generation import generate
from steerable.models.load import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


def test_chat_prompt_tokenises_as_the_template_says(smol):
    tok = smol.tokenizer
    text = smol.render("Hi there")
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")
    ids = smol.encode([text])["input_ids"][0].tolist()
    assert ids == tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=True,
                                          add_generation_prompt=True, return_dict=False)
    assert tok.convert_ids_to_tokens(ids[:2]) == ["<|im_start|>", "system"]  # one BOS, not two
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.decode(ids) == text


@pytest.fixture(scope="module")
def refusal_vector(smol, tmp_path_factory):
    from steerable.directions.artifact import save_directions

    ds = calibrate(smol, contrastive_examples(pairs="refusal-pairs", limit=150), position="response-mean",
                   layers=range(8, 13), progress=False)
    assert float(ds.auroc[ds.row(10)]) > 0.9
    return save_directions(ds, tmp_path_factory.mktemp("vec") / "refusal.safetensors")


def test_refusal_direction_raises_refusal_on_held_out_prompts(smol, refusal_vector):
    vec = refusal_vector
    harmful = load_prompts("advbench:test")[-30:]  # held out: never seen by calibration
    plan = {"vector": str(vec), "method": "add", "strength": 0.5, "layers": "9-11"}
    base = refusal_rate(generate(smol, harmful, max_new_tokens=32, batch_size=15))
    steered = refusal_rate(generate(smol, harmful, plan, max_new_tokens=32, batch_size=15))
    assert base.value < 0.25
    assert steered.value - base.value >= 0.4, (base, steered)


def test_tuned_point_induces_refusal_within_the_over_refusal_budget(smol, refusal_vector, tmp_path):
    from steerable.data.loaders import load_prompt_rows
    from steerable.sweeps.grid import Config
    from steerable.sweeps.run import SweepSpec, run_sweep
    from steerable.sweeps.select import Budget, select

    configs = [Config("none"), *(Config("add", "9-11", s) for s in (0.5, 1.0, 3.0))]
    spec = SweepSpec(vector=str(refusal_vector), configs=configs, prompts=load_prompt_rows("advbench:test")[-24:],
                     benign=load_prompt_rows("benign:test")[-24:], max_new_tokens=16)
    records = run_sweep(smol, spec, tmp_path / "r.jsonl", progress=False)
    base = records[0]
    choice = select(records, budget=Budget(max_over_refusal=0.15))
    chosen = choice.record
    assert chosen.behaviour.rate - base.behaviour.rate >= 0.4, choice.why
    assert chosen.benign is not None
    assert base.benign is not None
    assert chosen.benign.refusal.rate <= base.benign.refusal.rate + 0.15
    assert choice.admissible < choice.considered  # the strongest setting over-refuses benign prompts
    assert records[3].kl > records[2].kl > records[1].kl > 0
