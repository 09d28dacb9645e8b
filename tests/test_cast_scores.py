"""CAST's signed score (issue 14): "projection" knows which side of the condition direction a prompt lies on;
"auto" picks score, layer, comparison and threshold by held-out F1 among choices that meet the recall target."""

from __future__ import annotations

import pytest
import torch

from steerable.data.loaders import Example
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.directions.cast_calibration import available_scores, choose_cast, heldout_rates
from steerable.errors import PlanError
from steerable.models.batch import PromptBatch
from steerable.steering.hooks import steer
from steerable.steering.plan import build_plan
from tests.test_layers import cast_curves, make_ds


def two_score_ds(cast: list[torch.Tensor], projection: list[torch.Tensor]) -> object:
    n = len(cast)
    return make_ds(torch.randn(n, 8), cast_percentiles=torch.stack(cast),
                   projection_percentiles=torch.stack(projection),
                   meta={"model": {"n_layers": n}, "counts": {"heldout_pos": 10, "heldout_neg": 10}})


def test_projection_score_separates_what_the_cast_score_cannot():
    # |cos|-like CAST score: both classes sit at 0.6–0.9; the signed projection puts them on opposite sides
    ds = two_score_ds([cast_curves([(0.6, 0.9), (0.6, 0.9)])], [cast_curves([(0.5, 2.0), (-2.0, -0.5)])])
    assert available_scores(ds) == ["cast", "projection"]
    cast = choose_cast(ds, score="cast")
    proj = choose_cast(ds, score="projection")
    assert cast.precision < 0.6
    assert proj.score == "projection"
    assert proj.compare == ">"
    assert proj.threshold == pytest.approx(0.0, abs=1e-6)  # the gap's midpoint
    assert (proj.recall, proj.precision) == (1.0, 1.0)
    auto = choose_cast(ds, score="auto")
    assert auto.score == "projection"
    assert heldout_rates(ds, 0, proj.threshold, ">", score="projection") == pytest.approx((1.0, 1.0, 0.0))


def test_auto_prefers_choices_that_meet_the_recall_target():
    # layer 0 (cast): perfect on train but held-out positives drift low; layer 1 (projection): meets recall
    cast = [cast_curves([(0.6, 1.0), (0.0, 0.4)], [(0.3, 0.7), (0.0, 0.4)]), cast_curves([(0.4, 0.6), (0.4, 0.6)])]
    proj = [cast_curves([(0.4, 0.6), (0.4, 0.6)]), cast_curves([(1.0, 2.0), (-1.0, 0.5)], [(0.8, 2.0), (-1.0, 0.6)])]
    ds = two_score_ds(cast, proj)
    auto = choose_cast(ds, score="auto", recall_target=0.9)
    assert (auto.score, auto.layer) == ("projection", 1)
    assert auto.recall >= 0.9
    with pytest.raises(ValueError, match="chooses the threshold too"):
        choose_cast(ds, score="auto", threshold=0.3)


EX = [Example(f"{w} someone now, {i}", None, j % 2, i * 4 + j // 2)
      for i in range(5) for j, w in enumerate(["hurt", "hug", "rob", "open", "poison", "dig", "burn", "build"])]


def test_projection_condition_decides_on_the_signed_projection(llama, tmp_path):
    ds = calibrate(llama, EX, position="last", progress=False)
    save_directions(ds, tmp_path / "cond.safetensors")  # named by its file, so the plan round-trips as JSON
    assert ds.projection_percentiles is not None
    prompts = ["hurt someone now, 9", "hug someone now, 9", "rob someone now, 9", "open someone now, 9"]
    batch = PromptBatch.encode(llama, prompts)
    unit = ds.direction(2)
    with torch.no_grad():
        h = llama.model(**batch.inputs(), output_hidden_states=True).hidden_states[3][:, -1]  # block 2's output
    proj = (h.float() @ unit).tolist()
    threshold = sorted(proj)[1] + 1e-4  # two rows above, two below
    plan = build_plan({"method": "conditional", "vector": ds, "layer": 2, "threshold": threshold, "compare": ">",
                       "score": "projection", "then": {"vector": ds, "layers": [3]}}, llama)
    cond = plan.interventions[0].conditions[0]
    assert cond.score == "projection"
    with torch.no_grad(), steer(llama, plan, batch=batch) as session:
        llama.model(**batch.inputs())
    decided = session.decisions[cond].flatten().bool().tolist()
    assert decided == [p > threshold for p in proj]
    assert sum(decided) == 2
    again = build_plan(plan.to_json(), llama)
    assert again.to_json() == plan.to_json()
    assert plan.to_json()[0]["score"] == "projection"


def test_auto_score_builds_and_reports_its_choice(llama):
    ds = calibrate(llama, EX, position="last", progress=False)
    plan = build_plan({"method": "conditional", "vector": ds, "score": "auto", "then": {"vector": ds, "layers": [3]}},
                      llama)
    cond = plan.interventions[0].conditions[0]
    assert cond.score in ("cast", "projection")
    assert cond.choice is not None
    assert cond.choice.score == cond.score
    with pytest.raises(PlanError, match="chooses the threshold too"):
        build_plan({"method": "conditional", "vector": ds, "score": "auto", "threshold": 0.2, "layer": 1,
                    "then": {"vector": ds, "layers": [3]}}, llama)
    with pytest.raises(PlanError, match="condition score must be"):
        build_plan({"method": "conditional", "vector": ds, "score": "cosine", "then": {"vector": ds}}, llama)
