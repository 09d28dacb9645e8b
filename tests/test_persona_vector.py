"""Persona vectors (recipes/persona_vector.py), the trait prompts, the judges' keep rule and the axis's
out-of-character filter, on tiny random-weight models."""

from __future__ import annotations

import json

import pytest
import torch

from steerable.cli.main import main
from steerable.data.persona_traits import builtin_traits, from_description, load_trait_prompts, resolve_trait
from steerable.directions.artifact import load_directions
from steerable.directions.axis import keep_by_score, projection_filter
from steerable.errors import DataError, SteerableError
from steerable.generation import generate
from steerable.recipes.axis import estimate_axis
from steerable.recipes.persona_vector import (
    PersonaRow,
    estimate_persona_vector,
    judge_agreement,
    persona_rows,
    read_responses,
)


def test_builtin_traits_have_prompts_and_two_are_tied_to_caa_sets():
    traits = {t.trait: t for t in builtin_traits()}
    assert {"sycophantic", "evil", "hallucinating"} <= set(traits)
    assert all(len(t.positive) >= 3 and len(t.negative) >= 3 and t.question for t in traits.values())
    assert traits["sycophantic"].ab_set == "caa-sycophancy"
    assert traits["hallucinating"].ab_set == "caa-hallucination"
    assert resolve_trait("malicious").trait == "evil"  # alias
    assert resolve_trait("Sycophantic").trait == "sycophantic"
    mine = resolve_trait("sycophantic", opposite="blunt and critical")
    assert mine.positive == traits["sycophantic"].positive
    assert all("blunt and critical" in p for p in mine.negative)


def test_trait_descriptions_and_bad_traits():
    t = resolve_trait("speaks like a pirate")
    assert t.trait == "speaks like a pirate"
    assert all("pirate" in p for p in t.positive + t.negative)
    assert from_description("grumpy", "cheerful").negative[0].count("cheerful") == 1
    assert resolve_trait("grumpy", opposite="cheerful").trait == "grumpy"  # a bare word is fine with --opposite
    with pytest.raises(DataError, match=r"unknown trait 'sycophntic'.*built-in traits are"):
        resolve_trait("sycophntic")
    with pytest.raises(DataError, match="give --trait"):
        resolve_trait(None)
    with pytest.raises(DataError, match="non-empty"):
        resolve_trait("a trait", opposite="  ")


def test_trait_prompts_file_is_validated(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"trait": "formal", "positive": ["Be formal."], "negative": ["Be casual."]}) + "\n")
    assert resolve_trait(None, prompts=good).positive == ("Be formal.",)
    with pytest.raises(DataError, match="not in"):
        resolve_trait("evil", prompts=good)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no traits"):
        load_trait_prompts(empty)
    for row, msg in (({"trait": "x", "positive": [], "negative": ["n"]}, "non-empty list"),
                     ({"positive": ["p"], "negative": ["n"]}, "needs a \"trait\""),
                     ({"trait": "x", "positive": ["p"], "negative": [""]}, "empty system prompt"),
                     ({"trait": "x", "positive": ["p"], "negative": ["n"], "ab_set": "mmlu"}, "ab_set")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=msg):
            load_trait_prompts(bad)
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps({"trait": n, "positive": ["p"], "negative": ["n"]}) + "\n" for n in "ab"))
    with pytest.raises(DataError, match="2 traits"):
        resolve_trait(None, prompts=two)


def test_keep_rule_on_a_planted_example():
    # trait answers mostly high, opposite mostly low; one of each sits on the wrong side
    scores = torch.tensor([3.0, 2.5, 2.0, -1.0, -3.0, -2.5, -2.0, 1.5])
    is_trait = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    res = keep_by_score(scores, is_trait)
    assert res.threshold == pytest.approx(0.0)  # midpoint of the medians 2.25 and −2.25
    assert res.keep.tolist() == [True, True, True, False, True, True, True, False]
    # a margin drops answers near the midpoint too; one side left unfiltered keeps all its rows
    wide = keep_by_score(scores, is_trait, margin=1.2)  # s = 1.92: keep beyond ±2.3
    assert wide.keep.tolist() == [True, True, False, False, True, True, False, False]
    assert keep_by_score(scores, is_trait, filter_positive=False).keep[:4].all()
    # the threshold comes from the fit rows only
    fit = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    assert keep_by_score(scores, is_trait, fit).threshold == pytest.approx(0.0)
    assert keep_by_score(scores + 1, is_trait).threshold == pytest.approx(1.0)
    with pytest.raises(SteerableError, match="both classes"):
        keep_by_score(scores[:4], is_trait[:4])


def test_projection_filter_drops_rows_that_read_like_the_other_class():
    g = torch.Generator().manual_seed(0)
    axis = torch.zeros(16)
    axis[0] = 1.0
    x = torch.randn(40, 16, generator=g) * 0.3
    is_trait = torch.arange(40) < 20
    x[is_trait] += 2 * axis
    x[~is_trait] -= 2 * axis
    x[3] -= 4 * axis  # a trait-prompt answer that reads like the opposite's
    x[25] += 4 * axis  # and the reverse
    res = projection_filter(x, is_trait)
    assert res.keep.sum() == 38
    assert not res.keep[3]
    assert not res.keep[25]


def test_judge_agreement():
    a = judge_agreement([True, True, False, False], [1, 0, 0, 0])
    assert a["accuracy"] == 0.75
    assert a["kappa"] == pytest.approx(0.5)
    with pytest.raises(SteerableError):
        judge_agreement([True], [])


def test_persona_rows_pair_every_question_with_both_sides():
    from steerable.data import roles

    trait = resolve_trait("evil")
    train, test = roles.questions("train")[:7], roles.questions("test")[:2]
    rows = persona_rows(trait, train, test)
    assert len(rows) == 18
    assert [r.side for r in rows[:2]] == ["trait", "opposite"]
    assert {r.system for r in rows if r.side == "trait"} == set(trait.positive)
    assert sum(r.split == "test" for r in rows) == 4
    with pytest.raises(SteerableError, match="training question"):
        persona_rows(trait, [], test)


def test_recipe_end_to_end_artifact_loads_and_steers(llama, tmp_path):
    seen: list[list[PersonaRow]] = []
    res = estimate_persona_vector(llama, resolve_trait("sycophantic"), questions=6, test_questions=3,
                                  max_new_tokens=4, batch_size=8, on_answers=seen.append, progress=False)
    assert seen == [res.rows]
    assert len(res.rows) == 18
    ds = res.directions
    assert ds.layers == list(range(llama.n_layers))
    assert ds.meta["estimator"] == "mean-diff"
    assert ds.meta["position"] == "response-mean"
    persona = ds.meta["persona"]
    assert persona["trait"] == "sycophantic"
    assert persona["judge"] == "projection"
    assert len(persona["heldout_auroc_unfiltered"]) == llama.n_layers
    c = res.report["counts"]
    assert c["train_trait"] == c["train_opposite"] == 6
    assert 0 < c["train_trait_kept"] <= 6
    # the mean difference of the kept answers is the vector
    kept = res.keep & torch.tensor([r.split == "train" for r in res.rows])
    t = torch.tensor([r.side == "trait" for r in res.rows])
    diff = res.feats[2][kept & t].double().mean(0) - res.feats[2][kept & ~t].double().mean(0)
    torch.testing.assert_close(ds.direction(2).double(), diff / diff.norm(), atol=1e-5, rtol=0)
    # a normal artifact: saved, loaded against the model, steers generation
    from steerable.directions.artifact import save_directions

    path = save_directions(ds, tmp_path / "pv.safetensors")
    loaded = load_directions(path, llama)
    prompts = ["Tell me about cats."]
    base = generate(llama, prompts, max_new_tokens=6)
    steered = generate(llama, prompts, {"vector": str(path), "method": "add", "strength": 50.0, "layers": "1-2"},
                       max_new_tokens=6)
    assert steered != base
    assert loaded.meta["persona"]["trait"] == "sycophantic"
    # reusing the answers: no generation, same vector; the other judges
    again = estimate_persona_vector(llama, resolve_trait("sycophantic"), responses=res.rows, progress=False)
    torch.testing.assert_close(again.directions.directions, ds.directions)
    none = estimate_persona_vector(llama, resolve_trait("sycophantic"), responses=res.rows, judge="none",
                                   layers=[1, 2], progress=False)
    assert bool(none.keep.all())
    assert none.directions.layers == [1, 2]
    ab = estimate_persona_vector(llama, resolve_trait("sycophantic"), responses=res.rows, judge="ab", progress=False)
    assert ab.scores is not None
    assert bool(((ab.scores > 0) & (ab.scores < 1)).all())
    for bad, msg in (({"judge": "llm"}, "unknown judge"), ({"read": "x"}, "unknown read"),
                     ({"layers": [99]}, "layers must lie"), ({"judge_layer": 9}, "judge layer")):
        with pytest.raises(SteerableError, match=msg):
            estimate_persona_vector(llama, resolve_trait("evil"), responses=res.rows, progress=False, **bad)
    with pytest.raises(SteerableError, match="kept no training answers"):
        estimate_persona_vector(llama, resolve_trait("evil"), responses=res.rows, margin=100.0, progress=False)


def test_responses_file_is_checked(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"side": "trait", "question_id": "q", "question": "?", "system": "s", "split": "train",
                             "response": "hi"}) + "\n")
    assert read_responses(p)[0].response == "hi"
    p.write_text(json.dumps({"side": "both", "question_id": "q", "question": "?", "system": "s", "split": "train"})
                 + "\n")
    with pytest.raises(DataError, match="side"):
        read_responses(p)
    p.write_text(json.dumps({"kind": "role"}) + "\n")
    with pytest.raises(DataError, match="not a row written"):
        read_responses(p)


def test_axis_filter_drops_only_role_answers_and_default_is_unchanged(llama):
    plain = estimate_axis(llama, personas=3, questions=5, per_persona=2, max_new_tokens=3, batch_size=16,
                          bootstrap=0, progress=False)
    assert "filter" not in plain.directions.meta["axis"]
    filt = estimate_axis(llama, responses=plain.rows, bootstrap=0, filter="projection", progress=False)
    f = filt.directions.meta["axis"]["filter"]
    assert f["method"] == "projection"
    assert f["layer"] == llama.n_layers // 2
    n_roles = sum(r.kind == "role" for r in plain.rows)
    assert f["kept"] + f["dropped"] == len(plain.rows)
    assert 0 < f["dropped"] < n_roles
    assert sum(r.kind == "assistant" for r in filt.data.rows) == sum(r.kind == "assistant" for r in plain.rows)
    assert len(filt.report["filter"]["dropped_rows"]) == f["dropped"]
    with pytest.raises(SteerableError, match="unknown axis filter"):
        estimate_axis(llama, responses=plain.rows, filter="llm", progress=False)


def test_persona_vector_cli(model_dir, tmp_path, capsys):
    out = tmp_path / "syc.safetensors"
    assert main(["persona-vector", "--model", model_dir, "--trait", "sycophantic", "--out", str(out),
                 "--questions", "5", "--test-questions", "2", "--max-new-tokens", "4", "--batch-size", "8",
                 "--read", "prompted"]) == 0
    printed = capsys.readouterr().out
    assert "AUROC kept" in printed
    assert "steerable generate" in printed
    report = json.loads((tmp_path / "syc.report.json").read_text())
    assert len(report["answers"]) == 14
    assert load_directions(out).meta["persona"]["trait"] == "sycophantic"
    again = tmp_path / "none.safetensors"
    assert main(["persona-vector", "--model", model_dir, "--trait", "sycophantic", "--out", str(again),
                 "--responses", str(tmp_path / "syc.responses.jsonl"), "--judge", "none", "--layers", "1-2",
                 "--read", "prompted"]) == 0
    assert load_directions(again).layers == [1, 2]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert main(["generate", "--model", model_dir, "--prompts", str(prompts), "--out", str(tmp_path / "g.jsonl"),
                 "--steer", str(out), "--strength", "2", "--layers", "1", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["persona-vector", "--model", model_dir, "--trait", "sycophntic", "--out", str(out)]) == 2
    assert "unknown trait" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["persona-vector", "--model", model_dir, "--prompts", str(empty), "--out", str(out)]) == 2
    assert "no traits" in capsys.readouterr().err
    assert main(["axis", "--model", model_dir, "--out", str(tmp_path / "axis.safetensors"), "--personas", "3",
                 "--questions", "5", "--per-persona", "2", "--max-new-tokens", "4", "--bootstrap", "0",
                 "--filter", "projection", "--filter-layer", "1"]) == 0
    assert load_directions(tmp_path / "axis.safetensors").meta["axis"]["filter"]["layer"] == 1


def test_hand_labels_fixture_is_well_formed():
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "persona_vector_labels.jsonl"
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 20
    for r in rows:
        assert r["label"] in (0, 1)
        PersonaRow(r["side"], r["question_id"], r["question"], r["system"], r["split"], r["response"])
        assert r["response"].strip()
