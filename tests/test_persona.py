"""Role data, the Assistant Axis, the in-generation drift monitor and the axis / drift CLI (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch

from steerable.cli.main import main
from steerable.data import roles
from steerable.data.loaders import load_prompt_rows
from steerable.directions.artifact import save_directions
from steerable.directions.axis import AxisData, RoleRow, assistant_axis, role_rows
from steerable.directions.calibrate import calibrate
from steerable.errors import DataError, SteerableError
from steerable.evaluate.drift import DriftArm, run_conversations
from steerable.evaluate.monitor import AxisMonitor
from steerable.generation import generate
from steerable.recipes.axis import AxisResult, estimate_axis, read_responses
from tests.test_steering import EX


def test_role_data_meets_the_issue_minimums_and_keeps_a_held_out_split():
    assert len(roles.personas("all")) >= 40
    assert len(roles.questions("all")) >= 60
    scripts = roles.load_conversations("roles:all")
    assert len(scripts) >= 20
    assert all(len(c.turns) >= 6 for c in scripts)
    for name in roles.ROLE_FILES:
        rows = roles._rows(name, "all")
        assert len({r["id"] for r in rows}) == len(rows)
        test = roles._rows(name, "test")
        assert 0.15 < len(test) / len(rows) < 0.4
    train_ids = {p.id for p in roles.personas("train")}
    assert train_ids.isdisjoint(p.id for p in roles.personas("test"))
    harmful = load_prompt_rows("persona-harmful:test")
    assert harmful
    assert all(r["prompt"][0]["role"] == "system" and r["prompt"][1]["role"] == "user" for r in harmful)
    assert {r["category"] for r in harmful} >= {"fraud", "violence", "cybercrime"}


def test_conversation_jsonl_is_validated(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text(json.dumps({"id": "a", "system": "be a pirate", "turns": ["hi", "more"]}) + "\n")
    assert roles.load_conversations(str(good))[0].system == "be a pirate"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "turns": []}) + "\n")
    with pytest.raises(SteerableError, match="turns"):
        roles.load_conversations(str(bad))
    with pytest.raises(SteerableError, match="unknown conversation set"):
        roles.load_conversations("nope")


def test_role_rows_are_balanced_and_cover_every_question():
    ps, qs = roles.personas("train")[:5], roles.questions("train")[:7]
    rows = role_rows(ps, qs, 3)
    assert sum(r.kind == "assistant" for r in rows) == 7
    per = {p.id: sum(r.persona == p.id for r in rows) for p in ps}
    assert set(per.values()) == {3}
    assert {r.question_id for r in rows if r.kind == "role"} == {q.id for q in qs}


def test_assistant_axis_is_assistant_mean_minus_mean_of_role_vectors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    personas = [None, None, None, "a", "a", "a", "a", "b", "b"]  # unbalanced: differs from plain mean-diff
    want = x[:3].mean(0) - (x[3:7].mean(0) + x[7:].mean(0)) / 2
    got = assistant_axis(x.float(), personas)
    assert torch.allclose(got.double(), want / want.norm(), atol=1e-6)
    plain = x[:3].mean(0) - x[3:].mean(0)
    assert float(got.double() @ (plain / plain.norm())) < 0.9999
    with pytest.raises(SteerableError, match="persona"):
        assistant_axis(x[:3].float(), [None] * 3)


def _axis_data(d: int = 8, seed: int = 0) -> AxisData:
    """Synthetic answers: Assistant rows shifted by +axis, each persona's rows by its own multiple of −axis."""
    g = torch.Generator().manual_seed(seed)
    qs = [f"q{i}" for i in range(30)]
    rows = [RoleRow("assistant", q, q) for q in qs]
    rows += [RoleRow("role", qs[(i * 4 + j) % 30], "", f"p{i}", "s") for i in range(12) for j in range(4)]
    axis = torch.zeros(d)
    axis[0] = 1
    x = torch.randn(len(rows), d, generator=g) * 0.3
    # personas pull by different amounts: what the pairwise PCA (of centred differences) can see
    pull = {f"p{i}": 0.5 + 0.4 * i for i in range(12)}
    x += torch.tensor([1.0 if r.kind == "assistant" else -pull[r.persona] for r in rows])[:, None] * axis
    return AxisData(rows, [0], x[None])


@pytest.mark.parametrize("estimator", ["assistant-axis", "pca", "lda", "logistic"])
def test_every_axis_estimator_points_at_the_assistant(estimator):
    data = _axis_data()
    v = data.fit(estimator, 0).direction
    # oriented toward the Assistant; the discriminative fits (LDA, logistic on separable classes) also lean on
    # noise coordinates, so they align less
    assert float(v[0]) > (0.4 if estimator in ("lda", "logistic") else 0.8)


def test_monitor_equals_teacher_forced_response_mean_projection(handle):
    """The projection read during decoding equals the mean over the reply's tokens of a plain forward pass."""
    layer = 1
    axis = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(3))
    mon = AxisMonitor(axis, layer)
    enc = handle.encode([handle.render("hello there"), handle.render("a longer prompt, this one")])
    width = enc["input_ids"].shape[1]
    with mon.watch(handle, [0, 1]):
        tok = handle.tokenizer
        gen = handle.model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id)
    stop = {handle.tokenizer.eos_token_id, handle.tokenizer.pad_token_id}
    mask = torch.cat([enc["attention_mask"], torch.ones_like(gen[:, width:])], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = handle.model(input_ids=gen, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    h = out.hidden_states[layer + 1]  # output of block `layer`
    unit = axis / axis.norm()
    for r in range(2):
        # decoding feeds back every generated token but the last; EOS / padding are not part of the reply
        fed = [t for t in range(width, gen.shape[1] - 1) if int(gen[r, t]) not in stop]
        want = torch.stack([h[r, t] @ unit for t in fed]).mean()
        assert mon.tokens(r) == len(fed)
        assert abs(mon.projection(r) - float(want)) < 1e-4


def test_monitor_reads_after_steering(llama, tmp_path):
    """A floor cap at the monitored layer lifts every reply token to the floor: the monitor sees what steering left."""
    ds = calibrate(llama, EX, position="last", progress=False)
    path = save_directions(ds, tmp_path / "v.safetensors")
    axis = ds.direction(2)
    plain, capped = AxisMonitor(axis, 2), AxisMonitor(axis, 2)
    generate(llama, ["hi", "tell me more"], max_new_tokens=5, monitor=plain)
    generate(llama, ["hi", "tell me more"], {"vector": str(path), "method": "cap", "cap_floor": 50.0, "layers": [2]},
             max_new_tokens=5, monitor=capped)
    for r in range(2):
        assert plain.projection(r) < 50
        assert abs(capped.projection(r) - 50.0) < 1e-3


def test_drift_rows_are_independent_of_other_conditions(llama, tmp_path):
    ds = calibrate(llama, EX, position="last", progress=False)
    ds.meta["axis"] = {"monitor_layer": 1}
    path = save_directions(ds, tmp_path / "v.safetensors")
    convs = [roles.Conversation("a", ("hello", "go on", "and then?")), roles.Conversation("b", ("x", "y"), "pirate")]
    cap = {"vector": str(path), "method": "cap", "cap_floor": 30.0, "layers": [1, 2]}
    alone = run_conversations(llama, convs, ds, max_new_tokens=4, progress=False)
    both = run_conversations(llama, convs, ds, [DriftArm("unsteered"), DriftArm("cap", cap)], max_new_tokens=4,
                             progress=False)
    assert len(alone) == 5
    assert len(both) == 10
    assert [r["reply"] for r in both if r["condition"] == "unsteered"] == [r["reply"] for r in alone]
    assert [r["projection"] for r in both if r["condition"] == "unsteered"] == pytest.approx(
        [r["projection"] for r in alone], abs=1e-4)
    capped = [r for r in both if r["condition"] == "cap"]
    assert all(r["projection"] >= 30 - 1e-3 for r in capped if r["projection"] is not None)
    # the same replies re-read by the unsteered model are not lifted by the cap
    assert all(r["text_projection"] < 30 for r in capped if r["text_projection"] is not None)
    assert [r["turn"] for r in alone] == [1, 2, 3, 1, 2]


def test_estimate_axis_recipe_answers_fits_and_reports(llama, tmp_path):
    seen: list[list[RoleRow]] = []
    res = estimate_axis(llama, personas=3, questions=6, per_persona=2, max_new_tokens=4, batch_size=8, bootstrap=2,
                        info={"note": "unit"}, on_answers=seen.append, progress=False)
    assert isinstance(res, AxisResult)
    assert seen == [res.rows]  # handed out once, before capture
    assert {r.kind for r in res.rows} == {"assistant", "role"}
    assert len({r.persona for r in res.rows if r.persona}) == 3
    assert all(r.response.strip() for r in res.rows)
    ds = res.directions
    assert ds.layers == list(range(llama.n_layers))
    assert ds.meta["estimator"] == "assistant-axis"
    assert ds.meta["data"]["per_persona"] == 2
    assert ds.meta["data"]["note"] == "unit"
    assert res.monitor_layer == ds.meta["axis"]["monitor_layer"]
    assert res.report["axis"] == ds.meta["axis"]
    assert [row["layer"] for row in res.report["layers"]] == ds.layers
    assert res.report["stability"]["bootstrap"]["lda"]["n"] == 2
    # the same answers, reused from a responses file: no generation, the same axis
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in res.rows))
    assert read_responses(path) == res.rows
    again = estimate_axis(llama, responses=path, bootstrap=0, on_answers=seen.append, progress=False)
    assert len(seen) == 1
    assert "stability" not in again.report
    torch.testing.assert_close(again.directions.directions, ds.directions)
    path.write_text("{not json\n")
    with pytest.raises(DataError):
        read_responses(path)
    with pytest.raises(SteerableError):
        estimate_axis(llama, estimator="nope", responses=res.rows, progress=False)


def test_axis_and_drift_cli(model_dir, tmp_path, capsys):
    out = tmp_path / "axis.safetensors"
    assert main(["axis", "--model", model_dir, "--out", str(out), "--personas", "4", "--questions", "6",
                 "--per-persona", "2", "--max-new-tokens", "4", "--bootstrap", "3", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "cos pca" in printed
    assert "monitor layer" in printed
    assert "bootstrap mean" in printed
    report = json.loads((tmp_path / "axis.report.json").read_text())
    assert len(report["layers"]) == 4
    assert "assistant-axis|lda" in report["layers"][0]["cosine"]
    assert set(report["stability"]["bootstrap"]) == {"assistant-axis", "pca", "lda", "logistic"}
    responses = tmp_path / "axis.responses.jsonl"
    assert len(responses.read_text().splitlines()) > 6
    again = tmp_path / "lda.safetensors"
    assert main(["axis", "--model", model_dir, "--out", str(again), "--responses", str(responses),
                 "--estimator", "lda", "--bootstrap", "0"]) == 0
    from steerable.directions.artifact import load_directions

    meta = load_directions(again).meta
    assert meta["estimator"] == "lda"
    assert "monitor_layer" in meta["axis"]
    assert meta["position"] == "response-mean"

    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(json.dumps({"id": f"c{i}", "turns": ["hi", "who are you?", "be a pirate"]}) + "\n"
                             for i in range(2)))
    plan = tmp_path / "cap25.json"
    plan.write_text(json.dumps({"vector": str(out), "method": "cap", "cap_floor": "p25", "layers": "1-2"}))
    d = tmp_path / "drift"
    assert main(["drift", "--model", model_dir, "--axis", str(out), "--conversations", str(convs), "--out", str(d),
                 "--plan", str(plan), "--baseline", "--max-new-tokens", "4"]) == 0
    rows = [json.loads(x) for x in (d / "drift.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 3
    assert {r["condition"] for r in rows} == {"unsteered", "cap25"}
    assert all({"id", "turn", "projection", "reply", "user", "left_band", "drift"} <= set(r) for r in rows)
    assert (d / "drift.png").read_bytes()[:4] == b"\x89PNG"
    assert "<img" in (d / "index.html").read_text()
    summary = json.loads((d / "summary.json").read_text())
    assert set(summary["conditions"]) == {"unsteered", "cap25"}
    assert main(["drift", "--model", model_dir, "--axis", str(out), "--conversations", "nope.jsonl",
                 "--out", str(d)]) == 2
    assert "does not exist" in capsys.readouterr().err
