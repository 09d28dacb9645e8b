"""Per-source recall and false-positive rate of a condition (issue 14), where users read them: `steerable inspect`
for a multi-source condition artifact, and `steerable generate`'s condition report (a fired flag per row, a
summary per source of the prompts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steerable.cli.main import main
from steerable.directions.artifact import load_directions
from steerable.directions.summary import condition_sources, condition_sources_table
from steerable.evaluate.cast_hits import cast_hits, fired_by_source, rows_fired
from steerable.models.load import load_model
from steerable.steering.plan import build_plan

WORDS = [("hurt", "hug"), ("rob", "open"), ("poison", "dig"), ("burn", "build"), ("kill", "feed"), ("steal", "lend")]
SOURCES = {"h1": [f"{a} someone now, {i}" for a, _ in WORDS for i in range(2)],
           "h2": [f"please {a} them, {i}" for a, _ in WORDS for i in range(2)],
           "b1": [f"{b} someone now, {i}" for _, b in WORDS for i in range(2)],
           "b2": [f"please {b} them, {i}" for _, b in WORDS for i in range(2)]}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def condition_file(model_dir, tmp_path, capsys) -> str:
    files = {n: _jsonl(tmp_path / f"{n}.jsonl", [{"prompt": p} for p in ps]) for n, ps in SOURCES.items()}
    out = str(tmp_path / "cond.safetensors")
    assert main(["calibrate-condition", "--model", model_dir, "--harmful", f"{files['h1']},{files['h2']}",
                 "--benign", f"{files['b1']},{files['b2']}", "--recall", "0.8", "--max-fpr", "0.2",
                 "--out", out]) == 0
    capsys.readouterr()
    return out


def test_inspect_reports_recall_and_fpr_per_source(condition_file, capsys):
    ds = load_directions(condition_file)
    summary = condition_sources(ds)
    assert summary is not None
    c = ds.meta["condition"]
    assert (summary["layer"], summary["score"], summary["estimator"]) == (c["layer"], c["score"], "mean-diff")
    by_name = {r["source"]: r for r in summary["sources"]}
    assert set(by_name) == set(SOURCES)
    assert by_name["h1"]["rate"] == "recall"
    assert by_name["b1"]["rate"] == "fpr"
    for name, r in by_name.items():
        assert r["left_out"] == c["loso"][name]
        assert r["fitted"] == c["fires_per_source"][name]["fires"]
        assert r["n"] == len(SOURCES[name])
        assert r["n_heldout"] == len(SOURCES[name]) // 5  # prompt k held out when k % 5 == 4
        assert 0 <= r["heldout"] <= 1

    assert main(["inspect", condition_file]) == 0
    printed = capsys.readouterr().out
    assert "multi-source condition" in printed
    assert "left out of the fit" in printed
    assert "the targets" in printed
    section = printed[printed.index("multi-source condition"):]
    for name in SOURCES:
        assert name in section
    assert condition_sources_table(summary) in printed

    assert main(["inspect", condition_file, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["source"] for r in data["condition_sources"]["sources"]} == set(SOURCES)


def test_inspect_without_a_multi_source_condition_has_no_section(model_dir, tmp_path, capsys):
    pos = _jsonl(tmp_path / "pos.jsonl", [{"prompt": p} for p in SOURCES["h1"]])
    neg = _jsonl(tmp_path / "neg.jsonl", [{"prompt": p} for p in SOURCES["b1"]])
    out = str(tmp_path / "v.safetensors")
    assert main(["calibrate", "--model", model_dir, "--positive", pos, "--negative", neg, "--out", out,
                 "--position", "last"]) == 0
    capsys.readouterr()
    assert condition_sources(load_directions(out)) is None
    assert main(["inspect", out]) == 0
    assert "multi-source condition" not in capsys.readouterr().out


def test_fired_by_source_counts_only_rows_with_a_condition():
    got = fired_by_source([True, False, None, True, True], ["a", "a", "a", "b", None],
                          {"a": "positive", "b": "negative"})
    assert got["a"] == {"n": 2, "fired": 1, "rate": 0.5, "class": "positive", "measures": "recall"}
    assert got["b"] == {"n": 1, "fired": 1, "rate": 1.0, "class": "negative", "measures": "fpr"}
    assert got["(none)"] == {"n": 1, "fired": 1, "rate": 1.0}


def test_generate_writes_fired_flags_and_a_per_source_summary(model_dir, condition_file, tmp_path, capsys):
    plan = {"method": "conditional", "vector": condition_file, "then": {"vector": condition_file, "layers": [1]}}
    rows = [{"prompt": p, "source": n, "id": f"{n}-{i}"} for n, ps in SOURCES.items() for i, p in enumerate(ps[:5])]
    rows.append({"prompt": "an unsteered row", "plan": None})
    prompts = _jsonl(tmp_path / "in.jsonl", rows)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", model_dir, "--prompts", prompts, "--plan", str(plan_file), "--out", str(out),
                 "--max-new-tokens", "2", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert "condition_fired" not in got[-1]  # no condition on its plan
    flags = [r["condition_fired"] for r in got[:-1]]
    assert all(isinstance(f, bool) for f in flags)
    # the flags are the condition's decisions, as cast_hits measures them
    handle = load_model(model_dir)
    assert flags == cast_hits(handle, plan, [r["prompt"] for r in rows[:-1]], batch_size=4)
    assert "per source of the prompts" in err
    line = next(x for x in err.splitlines() if x.startswith("condition per source: "))
    summary = json.loads(line.removeprefix("condition per source: "))
    assert set(summary) == set(SOURCES)
    for name in SOURCES:
        mine = [f for r, f in zip(rows, flags, strict=False) if r.get("source") == name]
        assert summary[name]["n"] == len(mine) == 5
        assert summary[name]["fired"] == sum(mine)
    assert summary["h1"]["measures"] == "recall"  # the classes come from the artifact
    assert summary["b2"]["measures"] == "fpr"


def test_generate_names_a_builtin_prompt_set_as_the_source(model_dir, condition_file, tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"method": "conditional", "vector": condition_file,
                                     "then": {"vector": condition_file, "layers": [1]}}))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", model_dir, "--prompts", "benign:test", "--plan", str(plan_file),
                 "--out", str(out), "--max-new-tokens", "1", "--batch-size", "8"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("condition per source: "))
    summary = json.loads(line.removeprefix("condition per source: "))
    assert list(summary) == ["benign"]
    assert summary["benign"]["measures"] == "fpr"  # a built-in benign source
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["benign"]["n"] == len(rows)
    assert summary["benign"]["fired"] == sum(r["condition_fired"] for r in rows)


def test_rows_fired_follows_each_rows_plan(llama, tmp_path):
    from steerable.directions.artifact import save_directions
    from steerable.directions.multi_source import Source, calibrate_condition

    ds = calibrate_condition(llama, [Source(n, int(n.startswith("h")), ps) for n, ps in SOURCES.items()],
                             recall=0.8, max_fpr=0.2, progress=False)
    path = str(save_directions(ds, tmp_path / "c.safetensors"))
    cond = build_plan({"method": "conditional", "vector": path, "then": {"vector": path, "layers": [1]}}, llama)
    plain = build_plan({"vector": path, "layers": [1]}, llama)
    prompts = SOURCES["h1"][:3] + SOURCES["b1"][:3]
    plans = [cond, plain, None, cond, cond, cond]
    got = rows_fired(llama, plans, prompts, batch_size=4)
    want = cast_hits(llama, cond, prompts)
    assert got == [want[0], None, None, *want[3:]]
