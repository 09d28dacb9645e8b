"""Steering any forward pass the obvious way: `with steer(...)` around the model's own generate (or a
transformers pipeline) steers exactly the tokens steerable.generate steers, for every gate."""

from __future__ import annotations

import pytest
import torch
from transformers import pipeline

from steerable.data.loaders import Example
from steerable.directions.calibrate import calibrate
from steerable.errors import PlanError
from steerable.generation import generate
from steerable.models.batch import PromptBatch
from steerable.steering.hooks import steer

WORDS = ["hurt", "hug", "rob", "open", "poison", "dig", "burn", "build"]
EX = [Example(f"{w} someone now, {i}", None, j % 2, i * 4 + j // 2) for i in range(3) for j, w in enumerate(WORDS)]
PROMPTS = ["Say something nice", "What is the capital of France?", "Count to five"]
GATES = ["all", "prompt", "generated", "first:2", "prompt+first:3"]
NEW = 6


@pytest.fixture
def ds(handle):
    return calibrate(handle, EX, position="last", progress=False)


def _plan(ds, gate):
    return {"vector": ds, "method": "add", "strength": 6.0, "layers": "1-2", "gate": gate}


def _own_generate(handle, prompts, plan):
    """The user's own call: steer() around model.generate, no begin(), no steerable batching."""
    batch = PromptBatch.encode(handle, prompts)
    with steer(handle, plan):
        out = handle.model.generate(input_ids=batch.ids, attention_mask=batch.mask, do_sample=False,
                                    max_new_tokens=NEW, pad_token_id=handle.tokenizer.pad_token_id)
    return [handle.tokenizer.decode(row[batch.width:], skip_special_tokens=True) for row in out]


@pytest.mark.parametrize("gate", GATES)
def test_model_generate_steers_like_steerable_generate(handle, ds, gate):
    plan = _plan(ds, gate)
    # one batch in steerable.generate's order (shortest rendered prompt first), and one prompt at a time
    order = sorted(PROMPTS, key=lambda p: len(handle.render(p)))
    ours = generate(handle, order, plan, max_new_tokens=NEW, batch_size=len(order))
    assert _own_generate(handle, order, plan) == ours
    for p, expected in zip(order, ours, strict=True):
        assert _own_generate(handle, [p], plan) == [expected]


def test_the_gates_change_different_tokens(handle, ds):
    """The comparison above is not vacuous: each gate steers something, and not the same thing."""
    plain = generate(handle, PROMPTS, max_new_tokens=NEW, batch_size=3)
    outs = {g: generate(handle, PROMPTS, _plan(ds, g), max_new_tokens=NEW, batch_size=3) for g in GATES}
    for g in ("all", "prompt", "generated"):
        assert outs[g] != plain, g
    assert outs["prompt"] != outs["all"]
    assert outs["generated"] != outs["all"]


def test_pipeline_is_steered_like_generate(llama):
    ds = calibrate(llama, EX, position="last", progress=False)
    plan = _plan(ds, "generated")
    pipe = pipeline("text-generation", model=llama.model, tokenizer=llama.tokenizer)
    for p in PROMPTS:
        (expected,) = generate(llama, [p], plan, max_new_tokens=NEW)
        with steer(llama, plan):
            got = pipe(llama.render(p), max_new_tokens=NEW, do_sample=False, return_full_text=False)
        assert got[0]["generated_text"] == expected
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in llama.model.modules())


@pytest.mark.parametrize("gate", ["assistant", "turns>=1"])
def test_turn_gates_without_turns_raise(llama, gate):
    ds = calibrate(llama, EX, position="last", progress=False)
    batch = PromptBatch.encode(llama, PROMPTS)
    with pytest.raises(PlanError, match="turn boundaries"), steer(llama, _plan(ds, gate)):
        llama.model.generate(input_ids=batch.ids, attention_mask=batch.mask, max_new_tokens=2, do_sample=False)
    # with the prompts declared (what steerable.generate does) the same plan runs
    with steer(llama, _plan(ds, gate), batch=batch):
        llama.model(**batch.inputs())
    assert generate(llama, PROMPTS, _plan(ds, gate), max_new_tokens=2)


def test_gated_plan_entered_mid_generation_raises(llama):
    """A cached pass before any uncached one: where the prompt ended cannot be known."""
    ds = calibrate(llama, EX, position="last", progress=False)
    batch = PromptBatch.encode(llama, PROMPTS[:1])
    with torch.no_grad():
        out = llama.model(**batch.inputs(), use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([batch.mask, batch.mask.new_ones(1, 1)], 1)
    with pytest.raises(PlanError, match="middle of a generation"), steer(llama, _plan(ds, "generated")):
        llama.model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values)
    # a gate that does not depend on the boundary is fine
    with steer(llama, _plan(ds, "all")):
        llama.model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values)
