"""Per-row plans, gating, CAST conditions and every method through the one validator (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch

from steerable.data.loaders import Example
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.directions.quality import cast_score
from steerable.errors import SteerableError
from steerable.generation import generate
from steerable.models.turns import segment
from steerable.steering.hooks import steer
from steerable.steering.plan import build_plan

WORDS = ["hurt", "hug", "rob", "open", "poison", "dig", "burn", "build", "kill", "feed", "steal", "lend"]
EX = [Example(f"{w} someone now, {i}", None, j % 2, i * 6 + j // 2)
      for i in range(5) for j, w in enumerate(WORDS)]
PROMPTS = ["Say something nice", "What is the capital of France?", "Count to five", "Name a colour"]


@pytest.fixture
def vec(handle, tmp_path):
    return str(save_directions(calibrate(handle, EX, position="last", progress=False), tmp_path / "v.safetensors"))


def _logits(handle, texts=PROMPTS, **kw):
    enc = handle.encode([handle.render(t) for t in texts])
    with torch.no_grad():
        return handle.model(**enc, **kw).logits


ALL_METHODS = [
    {"method": "add", "strength": 4.0},
    {"method": "ablate"},
    {"method": "cap", "cap_floor": "p90"},
    {"method": "cap", "cap_ceiling": "n10", "cap_floor": -5.0},
    {"method": "rotate", "angle": 120, "layers": "all"},
    {"method": "angular", "angle": 60},
    {"method": "angular-adaptive", "angle": 200},
    {"method": "sttp", "threshold": "p60", "target": "p95"},
    {"method": "stmp", "threshold": "p60"},
]


@pytest.mark.parametrize("spec", ALL_METHODS, ids=lambda s: s["method"])
def test_every_method_steers_and_comes_off(handle, vec, spec):
    before = _logits(handle)
    with steer(handle, {"vector": vec, **spec}):
        during = _logits(handle)
    assert not torch.equal(before, during)
    assert torch.equal(before, _logits(handle))
    with steer(handle, {"vector": vec, **spec, "strength": 0.0}):
        torch.testing.assert_close(_logits(handle), before, rtol=0, atol=1e-5)


def test_plan_with_every_key_round_trips(handle, vec):
    plan = build_plan([
        {"vector": vec, "method": "cap", "cap_floor": "p25", "cap_ceiling": 3.5, "layers": "1-2", "gate": "prompt"},
        {"vector": vec, "method": "rotate", "angle": 90.0, "layers": "all", "direction": "global",
         "gate": "prompt+first:4"},
        {"method": "conditional", "vector": vec, "layer": 2, "threshold": 0.1, "compare": "<",
         "then": {"vector": vec, "method": "sttp", "layers": [1], "gate": "turns>=1"}},
    ], handle)
    again = build_plan(json.loads(json.dumps(plan.to_json())), handle)
    assert again.to_json() == plan.to_json()
    assert plan.to_json()[2]["then"][0]["method"] == "sttp"


@pytest.mark.parametrize(("spec", "message"), [
    ({"method": "cap"}, "needs cap_floor"),
    ({"method": "cap", "cap_floor": "q5"}, "percentile"),
    ({"method": "cap", "cap_floor": "p90", "cap_ceiling": "p10"}, "above cap_ceiling"),
    ({"method": "rotate"}, "needs \"angle\""),
    ({"method": "add", "gate": "sometimes"}, "unknown gate"),
    ({"method": "add", "layers": "top:x"}, "cannot parse layers"),
    ({"method": "add", "vector": ["a", "b"]}, "only supported by method cap"),
    ({"method": "conditional"}, "needs \"then\""),
    ({"method": "conditional", "then": {}, "layer": "deep"}, "condition layer"),
    ({"method": "add", "site": "nowhere"}, "unknown site"),
    ({"method": "rotate", "angle": float("inf")}, "angle must be finite"),
    ({"method": "add", "angle": 90}, r"unknown plan key\(s\) \['angle'\] for method add \(angle belong"),
])
def test_validation_names_the_fault(handle, vec, spec, message):
    with pytest.raises(SteerableError, match=message):
        build_plan({"vector": vec, **spec}, handle)


def test_unsteered_row_is_exactly_unsteered_and_rows_are_independent(handle, vec):
    a = {"vector": vec, "method": "add", "strength": 6.0, "layers": "0-3"}
    b = {"vector": vec, "method": "rotate", "angle": 150, "layers": "all"}
    c = {"vector": vec, "method": "cap", "cap_ceiling": "n5", "layers": "1-2", "gate": "generated"}
    plain = _logits(handle)
    with steer(handle, rows=[a, None, b, c]):
        mixed = _logits(handle)
    assert torch.equal(mixed[1], plain[1])
    assert not torch.equal(mixed[0], plain[0])
    assert not torch.equal(mixed[2], plain[2])
    with steer(handle, rows=[b, None, a, None]):
        other = _logits(handle)
    assert torch.equal(other[1], plain[1])
    assert torch.equal(other[3], plain[3])
    with steer(handle, rows=[None, a, b, b]):
        swapped = _logits(handle)
    assert torch.equal(swapped[2], mixed[2])  # row 2 carries b in both; the others differ

    gen_plain = generate(handle, PROMPTS, max_new_tokens=6, batch_size=4)
    gen_mixed = generate(handle, PROMPTS, plans=[a, None, b, None], max_new_tokens=6, batch_size=4)
    gen_other = generate(handle, PROMPTS, plans=[c, None, b, a], max_new_tokens=6, batch_size=4)
    assert gen_mixed[1] == gen_plain[1]
    assert gen_mixed[3] == gen_plain[3]
    assert gen_other[1] == gen_plain[1]
    assert gen_mixed[2] == gen_other[2]
    assert gen_mixed[0] != gen_plain[0]


def test_per_row_batch_size_mismatch_is_an_error(llama, tmp_path):
    path = str(save_directions(calibrate(llama, EX, position="last", progress=False), tmp_path / "v.safetensors"))
    with pytest.raises(SteerableError, match="per-row plans for 2 rows"), \
            steer(llama, rows=[{"vector": path}, None]):
        _logits(llama)


def test_gates_prompt_and_generated(handle, vec):
    spec = {"vector": vec, "method": "add", "strength": 8.0, "layers": "0-3"}
    plain = generate(handle, PROMPTS, max_new_tokens=5, batch_size=4)
    full = generate(handle, PROMPTS, {**spec}, max_new_tokens=5, batch_size=4)
    gen_only = generate(handle, PROMPTS, {**spec, "gate": "generated"}, max_new_tokens=5, batch_size=4)
    prompt_only = generate(handle, PROMPTS, {**spec, "gate": "prompt"}, max_new_tokens=5, batch_size=4)
    first0 = generate(handle, PROMPTS, {**spec, "gate": "first:0"}, max_new_tokens=5, batch_size=4)
    assert first0 == plain  # touches no token at all
    # the first token comes from the prefill: steered by "prompt", untouched by "generated"
    tok = handle.tokenizer

    def first(outs):
        return [tok(o, add_special_tokens=False)["input_ids"][:1] for o in outs]

    assert first(gen_only) == first(plain)
    assert first(prompt_only) == first(full)
    # on a plain forward every position is a prompt position
    before = _logits(handle)
    with steer(handle, {**spec, "gate": "generated"}):
        assert torch.equal(_logits(handle), before)


def test_first_k_matches_full_steering_for_k_tokens(llama, tmp_path):
    path = str(save_directions(calibrate(llama, EX, position="last", progress=False), tmp_path / "v.safetensors"))
    spec = {"vector": path, "method": "add", "strength": 8.0, "layers": "0-3"}
    full = generate(llama, PROMPTS, spec, max_new_tokens=3, batch_size=4)
    firstk = generate(llama, PROMPTS, {**spec, "gate": "prompt+first:8"}, max_new_tokens=3, batch_size=4)
    assert full == firstk


def test_turn_segmentation(llama):
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
            {"role": "user", "content": "bye"}]
    turns, asst, reply = segment(llama, conv, system="be nice")
    text = llama.render(conv, "be nice")
    ids = llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(turns) == len(ids)
    assert reply == 1

    def decoded(mask):
        return llama.tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])

    assert "hi there" in decoded(asst)
    assert "hello" not in decoded(asst)
    assert "bye" not in decoded(asst)
    assert "bye" in decoded([t >= 1 for t in turns])
    assert "hello" not in decoded([t >= 1 for t in turns])
    assert "be nice" in decoded([t == 0 for t in turns])


def test_assistant_and_turn_gates(llama, tmp_path):
    path = str(save_directions(calibrate(llama, EX, position="last", progress=False), tmp_path / "v.safetensors"))
    spec = {"vector": path, "method": "add", "strength": 8.0, "layers": "0-3"}
    conv = [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
             {"role": "user", "content": "bye"}], [{"role": "user", "content": "one turn only"}]]
    plain = generate(llama, conv, max_new_tokens=4, batch_size=2)
    late = generate(llama, conv, {**spec, "gate": "turns>=1"}, max_new_tokens=4, batch_size=2)
    later = generate(llama, conv, {**spec, "gate": "turns>=2"}, max_new_tokens=4, batch_size=2)
    asst = generate(llama, conv, {**spec, "gate": "assistant"}, max_new_tokens=4, batch_size=2)
    assert later == plain  # neither conversation reaches exchange 2
    assert late[1] == plain[1]
    assert late[0] != plain[0]  # only the two-exchange conversation is steered
    assert asst != plain


def test_rotate_keeps_norms_inside_the_model(handle, vec):
    seen: dict[str, torch.Tensor] = {}
    layer = 1

    def grab(name):
        def hook(_module, _args, output):
            seen[name] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return hook

    hk = handle.layout.layers[layer].register_forward_hook(grab("plain"))
    _logits(handle)
    hk.remove()
    with steer(handle, {"vector": vec, "method": "rotate", "angle": 135, "layers": [layer, 2]}):
        hk = handle.layout.layers[layer].register_forward_hook(grab("rotated"))
        _logits(handle)
        hk.remove()
    assert not torch.allclose(seen["plain"], seen["rotated"])
    torch.testing.assert_close(seen["rotated"].norm(dim=-1), seen["plain"].norm(dim=-1), rtol=1e-5, atol=1e-6)


def _scores(handle, ds, layer, texts):
    enc = handle.encode([handle.render(t) for t in texts])
    with torch.no_grad():
        out = handle.model(**enc, output_hidden_states=True)
    return cast_score(out.hidden_states[layer + 1][:, -1].float(), ds.direction(layer))


@pytest.mark.parametrize(("cond_layer", "then_layers"), [(1, "2-3"), (3, "0-3")], ids=["inline", "prepass"])
def test_conditional_decides_per_row(llama, tmp_path, cond_layer, then_layers):
    ds = calibrate(llama, EX, position="last", progress=False)
    path = str(save_directions(ds, tmp_path / "v.safetensors"))
    scores = _scores(llama, ds, cond_layer, PROMPTS)
    order = scores.argsort()
    threshold = float((scores[order[1]] + scores[order[2]]) / 2)  # two rows above, two below
    then = {"vector": path, "method": "add", "strength": 8.0, "layers": then_layers}
    cond = {"method": "conditional", "vector": path, "layer": cond_layer, "threshold": threshold, "compare": ">",
            "then": then}
    plain = _logits(llama)
    with steer(llama, then):
        full = _logits(llama)
    with steer(llama, cond) as session:
        got = _logits(llama)
        decided = session.decisions
    hit = scores > threshold
    assert int(hit.sum()) == 2
    (decision,) = decided.values()
    assert decision.flatten().bool().tolist() == hit.tolist()
    for r in range(len(PROMPTS)):
        if hit[r]:
            torch.testing.assert_close(got[r], full[r], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got[r], plain[r])


def test_conditional_auto_uses_calibration_statistics(llama, tmp_path):
    ds = calibrate(llama, EX * 4, position="last", progress=False)
    path = str(save_directions(ds, tmp_path / "v.safetensors"))
    plan = build_plan({"method": "conditional", "vector": path, "then": {"vector": path, "layers": "2-3"}}, llama)
    cond = plan.interventions[0].conditions[0]
    assert cond.layer in ds.layers
    assert cond.compare in (">", "<")
    assert cond.report()["recall"] == 0.95


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_ablation_at_every_write_matches_bake(family, tmp_path):
    from steerable.bake import runtime_ablation
    from tests.conftest import tiny_handle

    h = tiny_handle(family)
    ds = calibrate(h, EX, position="last", progress=False)
    path = str(save_directions(ds, tmp_path / "v.safetensors"))
    with runtime_ablation(h, ds.direction(2)):
        ref = _logits(h)
    plan = {"vector": path, "method": "ablate", "site": ["resid_pre", "attn_out", "mlp_out"], "layers": "all",
            "direction": 2}
    assert len(build_plan(plan, h).interventions) == 3
    with steer(h, plan):
        got = _logits(h)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_calibrate_skips_layers_where_the_classes_coincide(llama):
    # attn_in of layer 0 at the last template token is the same embedding for every prompt
    ds = calibrate(llama, EX, site="attn_in", position="last", progress=False)
    assert 0 not in ds.layers
    assert "0" in ds.meta["skipped_layers"]
    assert ds.layers == [1, 2, 3]


def test_multi_direction_cap_bounds_every_axis_inside_the_model(llama, tmp_path):
    other = [Example(e.prompt[::-1], None, 1 - e.label, e.pair) for e in EX]
    a = str(save_directions(calibrate(llama, EX, position="last", progress=False), tmp_path / "a.safetensors"))
    b = str(save_directions(calibrate(llama, other, position="all", progress=False), tmp_path / "b.safetensors"))
    plan = build_plan({"vector": [a, b], "method": "cap", "cap_floor": [1.0, 0.5], "layers": [1]}, llama)
    axes, lo, _ = plan.interventions[0].axes(1)
    torch.testing.assert_close(axes @ axes.T, torch.eye(2), atol=1e-5, rtol=0)
    seen = {}
    with steer(llama, plan):
        hk = llama.layout.layers[1].register_forward_hook(lambda _m, _i, o: seen.__setitem__("h", o))
        _logits(llama)
        hk.remove()
    h = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
    assert bool(((h @ axes.T) >= lo - 1e-4).all())
    with pytest.raises(SteerableError, match="2 values for 1 directions"):
        build_plan({"vector": a, "method": "cap", "cap_floor": [1.0, 0.5], "layers": [1]}, llama)
