"""Conditions that generalise (issue 14): several sources per class, chosen by leaving one source out."""

from __future__ import annotations

import math

import pytest
import torch

from steerable.data.condition_sources import BENIGN_SOURCES, HARMFUL_SOURCES, condition_source
from steerable.data.loaders import edgy_benign_rows, load_pairs, load_prompt_rows
from steerable.directions.artifact import load_directions, save_directions
from steerable.directions.multi_source import Source, _balanced_direction, _loso, _threshold, calibrate_condition
from steerable.errors import DataError
from steerable.evaluate.cast_hits import cast_hits
from steerable.steering.plan import build_plan


def test_leaving_a_source_out_measures_a_shift_a_pooled_fit_hides():
    """Synthetic: harmful source b lies between a and the benign sources, past the midpoint; fitted with b, a
    threshold covers it; fitted without it, B is missed — what leave-one-source-out is there to reveal."""
    g = torch.Generator().manual_seed(0)
    d = 16
    axis = torch.zeros(d, dtype=torch.float64)
    axis[0] = 1.0

    def cloud(center: float, n: int) -> torch.Tensor:
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.1
        x[:, 0] += center
        x[:, 1] += 3.0  # a shared offset: every prompt has a large component off the axis
        return x
    x = torch.cat([cloud(2.0, 40), cloud(-0.5, 40), cloud(-2.0, 40), cloud(-1.5, 40)])
    groups = [torch.arange(i * 40, (i + 1) * 40) for i in range(4)]
    rates = _loso(x, groups, [1, 1, 0, 0], ["a", "b", "c", "d"], "projection", 0.9)
    assert rates["a"] == 1.0  # a left out: the threshold fitted on b still catches a
    assert rates["b"] < 0.5  # b left out: the threshold sits at a's margin, past b
    assert rates["c"] == 0.0
    assert rates["d"] == 0.0
    # fitted on every source (what a pooled calibration reports), b looks covered
    unit = _balanced_direction(x, groups, [1, 1, 0, 0])
    s_all = x @ unit
    pos = torch.cat([s_all[groups[0]], s_all[groups[1]]])
    t, cmp = _threshold(pos, torch.cat([s_all[groups[2]], s_all[groups[3]]]), 0.9)
    assert cmp == ">"
    assert float((s_all[groups[1]] > t).double().mean()) > 0.8


def test_builtin_sources_load_with_splits():
    for name in (*HARMFUL_SOURCES, *BENIGN_SOURCES):
        got, prompts = condition_source(f"{name}:test")
        assert got == name
        assert prompts
    assert len(edgy_benign_rows()) == 60
    assert {r["category"] for r in edgy_benign_rows()} == {"medical", "security", "chemistry", "history", "everyday"}
    train = {r["prompt"] for r in edgy_benign_rows("train")}
    assert not train & {r["prompt"] for r in edgy_benign_rows("test")}
    _, caa = condition_source("caa-refusal:train")
    assert not any("Choices:" in p for p in caa)
    with pytest.raises(DataError, match="unknown condition source"):
        condition_source("nope")


def test_every_condition_source_is_a_prompt_set():
    """`generate --prompts` takes every built-in condition source by name (its per-source condition report
    then labels the rows with it), and gives the same prompts as the condition calibration reads."""
    for name in (*HARMFUL_SOURCES, *BENIGN_SOURCES):
        rows = load_prompt_rows(f"{name}:test")
        assert rows, name
        assert all(isinstance(r["prompt"], str | list) for r in rows), name
    # the two sets read from elsewhere than a prompt file: CAA's refusal questions without their A/B choices,
    # and the project's edgy questions with their own split
    caa = load_prompt_rows("caa-refusal:test")
    assert len(caa) == len(load_pairs("caa-refusal:test"))
    assert not any("Choices:" in r["prompt"] or "(A)" in r["prompt"] for r in caa)
    edgy = [r["prompt"] for r in load_prompt_rows("edgy-benign:test")]
    assert edgy == [r["prompt"] for r in edgy_benign_rows("test")]
    with pytest.raises(DataError, match="unknown prompt set"):
        load_prompt_rows("edgy-harmful:test")


WORDS = [("hurt", "hug"), ("rob", "open"), ("poison", "dig"), ("burn", "build"), ("kill", "feed"), ("steal", "lend")]


def test_calibrate_condition_chooses_and_conditional_plans_use_it(llama, tmp_path):
    sources = [
        Source("verbs-a", 1, [f"{a} someone now, {i}" for a, _ in WORDS[:3] for i in range(4)]),
        Source("verbs-b", 1, [f"please {a} them, {i}" for a, _ in WORDS[3:] for i in range(4)]),
        Source("kind-a", 0, [f"{b} someone now, {i}" for _, b in WORDS[:3] for i in range(4)]),
        Source("kind-b", 0, [f"please {b} them, {i}" for _, b in WORDS[3:] for i in range(4)]),
    ]
    ds = calibrate_condition(llama, sources, recall=0.8, max_fpr=0.2, progress=False)
    cond = ds.meta["condition"]
    assert cond["layer"] in ds.layers
    assert cond["score"] in ("cast", "projection")
    assert set(cond["loso"]) == {s.name for s in sources}
    assert len(cond["candidates"]) == 2 * len(ds.layers)
    assert all(0 <= v["fires"] <= 1 for v in cond["fires_per_source"].values())
    path = save_directions(ds, tmp_path / "cond.safetensors")
    again = load_directions(path)
    assert again.meta["condition"]["layer"] == cond["layer"]
    plan = build_plan({"method": "conditional", "vector": str(path), "then": {"vector": str(path), "layers": [3]}},
                      llama)
    c = plan.interventions[0].conditions[0]
    assert (c.layer, c.score, c.compare) == (cond["layer"], cond["score"], cond["compare"])
    assert math.isclose(c.threshold, cond["threshold"])
    assert "leave_one_source_out" in c.report()
    # the condition fires on generation as it fired at calibration: the same features, the same rule
    prompts = [p for s in sources for p in s.prompts]
    hits = cast_hits(llama, plan, prompts)
    fired = {s.name: sum(hits[i] for i, p in enumerate(prompts) if p in s.prompts) / len(s.prompts) for s in sources}
    for name, v in cond["fires_per_source"].items():
        assert fired[name] == pytest.approx(v["fires"], abs=1e-9)
    with pytest.raises(DataError, match="each class"):
        calibrate_condition(llama, sources[:2], progress=False)


def test_cli_calibrate_condition(model_dir, tmp_path, capsys):
    from steerable.cli.main import main

    rows = {"h1": [f"{a} someone now, {i}" for a, _ in WORDS for i in range(2)],
            "b1": [f"{b} someone now, {i}" for _, b in WORDS for i in range(2)]}
    for name, prompts in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(f'{{"prompt": "{p}"}}\n' for p in prompts))
    out = tmp_path / "c.safetensors"
    code = main(["calibrate-condition", "--model", model_dir, "--harmful", str(tmp_path / "h1.jsonl"),
                 "--benign", str(tmp_path / "b1.jsonl"), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fires when left out" in printed
    assert "chosen: layer" in printed
    assert load_directions(out).meta["condition"]["score"] in ("cast", "projection")


def test_logistic_estimator_and_precomputed_features(llama):
    from steerable.capture.features import prompt_features

    sources = [
        Source("verbs-a", 1, [f"{a} someone now, {i}" for a, _ in WORDS[:3] for i in range(4)]),
        Source("verbs-b", 1, [f"please {a} them, {i}" for a, _ in WORDS[3:] for i in range(4)]),
        Source("kind-a", 0, [f"{b} someone now, {i}" for _, b in WORDS[:3] for i in range(4)]),
        Source("kind-b", 0, [f"please {b} them, {i}" for _, b in WORDS[3:] for i in range(4)]),
    ]
    layers = list(range(llama.n_layers))
    feats = prompt_features(llama, [p for s in sources for p in s.prompts], layers, progress=False)
    a = calibrate_condition(llama, sources, recall=0.8, max_fpr=0.2, progress=False)
    b = calibrate_condition(llama, sources, recall=0.8, max_fpr=0.2, progress=False, features=feats)
    assert a.meta["condition"]["candidates"] == b.meta["condition"]["candidates"]
    lg = calibrate_condition(llama, sources, recall=0.8, max_fpr=0.2, estimator="logistic", progress=False,
                             features=feats)
    c = lg.meta["condition"]
    assert c["estimator"] == "logistic"
    assert lg.meta["estimator"].startswith("logistic")
    assert all(r["estimator"] == "logistic" for r in c["candidates"])
    # the probe's direction points toward the positive class at every layer
    assert bool((lg.scales > 0).all())
    with pytest.raises(DataError, match="estimator"):
        calibrate_condition(llama, sources, estimator="pca", progress=False, features=feats)
    with pytest.raises(DataError, match="features of shape"):
        calibrate_condition(llama, sources, progress=False, features=feats[:2])
