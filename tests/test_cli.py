"""The CLI contract, end to end on a tiny model saved as a Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

from steerable.cli.main import main


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_calibrate_inspect_generate(model_dir, tmp_path, capsys):
    pos = _jsonl(tmp_path / "pos.jsonl", [{"prompt": f"do harm {i}"} for i in range(6)])
    neg = _jsonl(tmp_path / "neg.jsonl", [{"prompt": f"be kind {i}"} for i in range(6)])
    out = str(tmp_path / "v.safetensors")
    assert main(["calibrate", "--model", model_dir, "--positive", pos, "--negative", neg, "--out", out,
                 "--estimator", "lda", "--position", "last", "--limit", "5"]) == 0
    assert main(["inspect", out]) == 0
    printed = capsys.readouterr().out
    assert "AUROC" in printed
    assert "cohen_d" in printed
    assert "estimator lda" in printed

    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "positive": "no way", "negative": "sure"}
                                               for i in range(4)])
    assert main(["calibrate", "--model", model_dir, "--pairs", pairs, "--out", out,
                 "--position", "response-mean", "--estimator", "pca"]) == 0

    prompts = _jsonl(tmp_path / "in.jsonl", [{"prompt": "hello", "id": 1}, {"prompt": "bye", "id": 2}])
    plain, steered = str(tmp_path / "plain.jsonl"), str(tmp_path / "steered.jsonl")
    assert main(["generate", "--model", model_dir, "--prompts", prompts, "--out", plain,
                 "--max-new-tokens", "5"]) == 0
    assert main(["generate", "--model", model_dir, "--prompts", prompts, "--out", steered, "--steer", out,
                 "--method", "add", "--strength", "6", "--layers", "1-3", "--max-new-tokens", "5",
                 "--batch-size", "2"]) == 0
    a = [json.loads(x) for x in Path(plain).read_text().splitlines()]
    b = [json.loads(x) for x in Path(steered).read_text().splitlines()]
    assert [r["id"] for r in a] == [1, 2]
    assert all("completion" in r for r in a + b)
    assert [r["completion"] for r in a] != [r["completion"] for r in b]

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"vector": out, "method": "ablate", "layers": "all"}))
    assert main(["generate", "--model", model_dir, "--prompts", prompts, "--out", steered, "--plan", str(plan),
                 "--max-new-tokens", "3"]) == 0


def test_cli_errors_are_clean(model_dir, tmp_path, capsys):
    out = str(tmp_path / "v.safetensors")
    assert main(["inspect", out]) == 2
    assert "no such direction file" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tmp_path / "nothing"), "--pairs", "refusal-pairs", "--out", out]) == 2
    assert "unknown model" in capsys.readouterr().err
    prompts = _jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert main(["generate", "--model", model_dir, "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"),
                 "--steer", str(bad)]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_every_flag_and_per_row_plans(model_dir, tmp_path, capsys):
    pos = _jsonl(tmp_path / "pos.jsonl", [{"prompt": f"do harm {i}"} for i in range(10)])
    neg = _jsonl(tmp_path / "neg.jsonl", [{"prompt": f"be kind {i}"} for i in range(10)])
    vec = str(tmp_path / "v.safetensors")
    assert main(["calibrate", "--model", model_dir, "--positive", pos, "--negative", neg, "--out", vec]) == 0
    texts = ["hello", "bye", "what now", "tell me"]
    plain = str(tmp_path / "plain.jsonl")
    assert main(["generate", "--model", model_dir, "--prompts", _jsonl(tmp_path / "p.jsonl", [
        {"prompt": t} for t in texts]), "--out", plain, "--max-new-tokens", "5", "--batch-size", "4"]) == 0
    rows = [
        {"prompt": texts[0]},  # takes the flags' plan
        {"prompt": texts[1], "plan": None},  # unsteered
        {"prompt": texts[2], "plan": {"vector": vec, "method": "add", "strength": 9, "layers": "0-3"}},
        {"prompt": texts[3], "plan": [{"vector": vec, "method": "cap", "cap_floor": "p95", "layers": "all"},
                                      {"vector": vec, "method": "angular", "angle": 30, "gate": "generated"}]},
    ]
    out = str(tmp_path / "out.jsonl")
    assert main(["generate", "--model", model_dir, "--prompts", _jsonl(tmp_path / "rows.jsonl", rows), "--out", out,
                 "--steer", vec, "--method", "rotate", "--angle", "170", "--layers", "all", "--gate", "all",
                 "--direction", "global", "--strength", "1", "--max-new-tokens", "5", "--batch-size", "4"]) == 0
    got = [json.loads(x)["completion"] for x in Path(out).read_text().splitlines()]
    ref = [json.loads(x)["completion"] for x in Path(plain).read_text().splitlines()]
    assert got[1] == ref[1]
    assert got[0] != ref[0]
    assert got[2] != ref[2]
    cond = tmp_path / "cond.json"
    cond.write_text(json.dumps({"method": "conditional", "vector": vec, "layer": 2, "threshold": 0.1,
                                "then": {"vector": vec, "layers": "1-3"}}))
    assert main(["generate", "--model", model_dir, "--prompts", plain, "--out", out, "--plan", str(cond),
                 "--max-new-tokens", "2"]) == 0
    assert '"layer": 2' in capsys.readouterr().err
    for flags in (["--method", "cap", "--cap-floor", "p10", "--cap-ceiling", "3.5"],
                  ["--method", "sttp", "--threshold", "p50", "--target", "p90"]):
        assert main(["generate", "--model", model_dir, "--prompts", plain, "--out", out, "--steer", vec,
                     *flags, "--max-new-tokens", "2"]) == 0
