"""Steering hooks: applied inside the block, gone after it (also on errors), plans validated."""

from __future__ import annotations

import json

import pytest
import torch

from steerable.data.loaders import Example
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.errors import SteerableError
from steerable.generation import generate
from steerable.steering.hooks import steer
from steerable.steering.plan import build_plan

EX = [Example(p, None, i % 2, i // 2) for i, p in enumerate(
    ["hurt someone", "hug someone", "rob a store", "open a store", "poison a well", "dig a well",
     "burn a house", "build a house"])]
PROMPTS = ["Say something nice", "What is the capital of France?", "Count to five"]


@pytest.fixture
def vec_path(handle, tmp_path):
    ds = calibrate(handle, EX, position="last", progress=False)
    return str(save_directions(ds, tmp_path / "v.safetensors"))


def _logits(handle, texts=PROMPTS):
    enc = handle.encode([handle.render(t) for t in texts])
    with torch.no_grad():
        return handle.model(**enc).logits


def test_steering_changes_output_then_model_is_bit_identical(handle, vec_path):
    before = _logits(handle)
    with steer(handle, {"vector": vec_path, "method": "add", "strength": 4.0, "layers": "1-2"}):
        during = _logits(handle)
    after = _logits(handle)
    assert not torch.equal(before, during)
    assert torch.equal(before, after)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in handle.layout.layers)


def test_hooks_removed_on_exception(handle, vec_path):
    before = _logits(handle)
    with pytest.raises(RuntimeError, match="boom"), steer(handle, {"vector": vec_path, "layers": "all"}):
        raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in handle.layout.layers)
    assert torch.equal(before, _logits(handle))


def test_zero_strength_is_identity(handle, vec_path):
    before = _logits(handle)
    with steer(handle, {"vector": vec_path, "method": "add", "strength": 0.0, "layers": "all"}):
        assert torch.equal(before, _logits(handle))


def test_ablate_zeroes_projection_inside_model(handle, vec_path):
    plan = build_plan({"vector": vec_path, "method": "ablate", "layers": [2], "direction": 1}, handle)
    u = plan.interventions[0].vectors.direction(1)
    seen = {}
    with steer(handle, plan):
        # registered after the steering hook, so it sees the steered output
        hook = handle.layout.layers[2].register_forward_hook(lambda _m, _a, o: seen.__setitem__("h", o))
        _logits(handle)
        hook.remove()
    h = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
    assert float((h @ u).abs().max()) < 1e-4


def test_add_strength_one_moves_negative_mean_onto_positive(handle, vec_path):
    plan = build_plan({"vector": vec_path, "strength": 1.0, "layers": [1]}, handle)
    ds = plan.interventions[0].vectors
    vec = plan.interventions[0].prepare(1)["vector"][0]
    r = ds.row(1)
    torch.testing.assert_close(ds.mean_neg[r] + vec, ds.mean_pos[r], atol=1e-4, rtol=1e-4)


def test_generate_steered_differs_and_is_batch_invariant(handle, vec_path):
    plain = generate(handle, PROMPTS, max_new_tokens=6, batch_size=3)
    assert plain == generate(handle, PROMPTS, max_new_tokens=6, batch_size=1)
    steered = generate(handle, PROMPTS, {"vector": vec_path, "strength": 8.0, "layers": "0-3"},
                       max_new_tokens=6, batch_size=3)
    assert steered != plain
    assert plain == generate(handle, PROMPTS, max_new_tokens=6, batch_size=3)


@pytest.mark.parametrize(("spec", "message"), [
    ({"method": "shout"}, "unknown method 'shout'"),
    ({"layers": "0-99"}, "layer 99 out of range"),
    ({"layers": "x-y"}, "cannot parse layers"),
    ({"strength": float("nan")}, "strength must be finite"),
    ({"strength": "big"}, "strength must be a number"),
    ({"colour": 1}, "unknown plan key"),
    ({"direction": "sideways"}, "direction must be"),
])
def test_plan_validation_names_the_fault(handle, vec_path, spec, message):
    with pytest.raises(SteerableError, match=message):
        build_plan({"vector": vec_path, **spec}, handle)


def test_plan_rejects_other_model_and_missing_vector(handle, vec_path, tmp_path):
    from tests.conftest import tiny_handle
    other = tiny_handle("llama" if handle.layout.family != "llama" else "qwen2")
    with pytest.raises(SteerableError, match="mismatch"):
        build_plan({"vector": vec_path}, other)
    with pytest.raises(SteerableError, match="no such direction file"):
        build_plan({"vector": str(tmp_path / "nope.safetensors")}, handle)
    with pytest.raises(SteerableError, match="not valid JSON"):
        build_plan("{oops", handle)


def test_plan_json_round_trip(handle, vec_path):
    plan = build_plan([{"vector": vec_path, "layers": "1-2", "strength": 0.5},
                       {"vector": vec_path, "method": "ablate", "layers": [3], "direction": "global"}], handle)
    again = build_plan(json.loads(json.dumps(plan.to_json())), handle)
    assert again.to_json() == plan.to_json()
