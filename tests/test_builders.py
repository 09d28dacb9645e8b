"""The notebook path: in-memory direction sets, plan builders composed with +, DirectionSet.steer / combine."""

from __future__ import annotations

import json
import math

import pytest
import torch

from steerable import ablate, add, cap, conditional, rotate, steer, sttp
from steerable.data.loaders import Example
from steerable.directions.artifact import DirectionSet, load_directions, save_directions
from steerable.directions.calibrate import calibrate
from steerable.errors import ArtifactError, PlanError
from steerable.generation import generate
from steerable.steering.builders import Plan
from steerable.steering.plan import build_plan

WORDS = ["hurt", "hug", "rob", "open", "poison", "dig", "burn", "build"]
EX = [Example(f"{w} someone now, {i}", None, j % 2, i * 4 + j // 2) for i in range(3) for j, w in enumerate(WORDS)]
PROMPTS = ["Say something nice", "Count to five"]


@pytest.fixture
def ds(llama):
    return calibrate(llama, EX, position="last", progress=False)


def _logits(handle):
    enc = handle.encode([handle.render(p) for p in PROMPTS])
    with torch.no_grad():
        return handle.model(**enc).logits


def test_in_memory_set_steers_like_its_saved_file(llama, ds, tmp_path):
    memory = generate(llama, PROMPTS, {"vector": ds, "strength": 4.0, "layers": "1-2"}, max_new_tokens=5)
    path = save_directions(ds, tmp_path / "v.safetensors")
    on_disk = generate(llama, PROMPTS, {"vector": str(path), "strength": 4.0, "layers": "1-2"}, max_new_tokens=5)
    assert memory == on_disk
    assert memory != generate(llama, PROMPTS, max_new_tokens=5)


def test_directionset_steer_is_a_context_manager(llama, ds):
    before = _logits(llama)
    with ds.steer(llama, method="add", strength=4.0, layers="1-2"):
        during = _logits(llama)
    with steer(llama, {"vector": ds, "method": "add", "strength": 4.0, "layers": "1-2"}):
        same = _logits(llama)
    assert torch.equal(during, same)
    assert not torch.equal(before, during)
    assert torch.equal(before, _logits(llama))
    with pytest.raises(PlanError, match="unknown plan key"), ds.steer(llama, method="add", angle=3):
        pass


def test_builders_compose_in_order(llama, ds):
    plan = add(ds, 0.8, layers="1-2") + cap(ds, floor="p25", layers=[3]) + ablate(ds, layers=[0])
    assert isinstance(plan, Plan)
    assert [e["method"] for e in plan] == ["add", "cap", "ablate"]
    checked = build_plan(plan, llama)
    assert [iv.method for iv in checked.interventions] == ["add", "cap", "ablate"]
    assert checked.interventions[0].strength == 0.8
    assert checked.interventions[1].layers == (3,)
    # order matters: the same two entries the other way round steer differently
    a, b = add(ds, 3.0, layers=[1]), cap(ds, ceiling="n10", layers=[1])
    with steer(llama, a + b):
        ab = _logits(llama)
    with steer(llama, b + a):
        ba = _logits(llama)
    assert not torch.equal(ab, ba)
    # a plain plan dict composes too
    assert len(plan + {"vector": ds, "method": "add", "layers": [1]}) == 4


def test_builders_match_the_json_they_stand_for(llama, ds, tmp_path):
    path = str(save_directions(ds, tmp_path / "v.safetensors"))
    saved = load_directions(path)
    pairs = [
        (add(saved, 0.5, layers="1-2", gate="generated"),
         {"vector": path, "method": "add", "strength": 0.5, "layers": "1-2", "gate": "generated"}),
        (rotate(saved, 90, layers="all"), {"vector": path, "method": "rotate", "angle": 90, "layers": "all"}),
        (sttp(saved, threshold="p60", mirror=True), {"vector": path, "method": "stmp", "threshold": "p60"}),
    ]
    for built, spec in pairs:
        assert build_plan(built, llama).to_json() == build_plan(spec, llama).to_json()
        assert built.to_json()[0]["vector"] == path  # a loaded set is named by its file


def test_when_and_conditional_wrap_a_plan(llama, ds):
    then = add(ds, 2.0, layers=[2])
    a = build_plan(then.when(ds, layer=1, threshold=0.1, compare=">"), llama)
    b = build_plan(conditional(ds, then, layer=1, threshold=0.1, compare=">"), llama)
    assert a.to_json() == b.to_json()
    assert a.interventions[0].conditions[0].layer == 1


def test_in_memory_label_is_refused_as_a_path(llama, ds):
    label = add(ds).to_json()[0]["vector"]
    assert label.startswith("<in-memory DirectionSet ")
    with pytest.raises(PlanError, match="in-memory DirectionSet"):
        build_plan(json.loads(json.dumps(add(ds).to_json())), llama)


def test_combine_keeps_the_raw_vectors_and_drops_statistics(llama, ds):
    other = calibrate(llama, [Example(e.prompt[::-1], None, e.label, e.pair) for e in EX], position="last",
                      progress=False)
    both = DirectionSet.combine([(ds, 1.0), (other, -0.5)])
    r = both.row(2)
    expected = (ds.mean_pos[r] - ds.mean_neg[r]) - 0.5 * (other.mean_pos[r] - other.mean_neg[r])
    torch.testing.assert_close(both.scales[r] * both.directions[r], expected, atol=1e-5, rtol=1e-5)
    assert math.isnan(float(both.auroc[r]))
    assert "percentiles" in both.meta["dropped"]
    # add α = 1 adds exactly the combined vector
    iv = build_plan(add(both, 1.0, layers=[2]), llama).interventions[0]
    torch.testing.assert_close(iv.prepare(2)["vector"][0], expected.float(), atol=1e-5, rtol=1e-5)
    # statistics that did not survive are refused, not silently NaN
    with pytest.raises(PlanError, match="no calibration percentiles"):
        build_plan(cap(both, floor="p25", layers=[2]), llama)
    with pytest.raises(ArtifactError, match="at least one"):
        DirectionSet.combine([])
