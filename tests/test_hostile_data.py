"""Hostile input files and flags (issue 13): every prompts / pairs / conversations / plan file and every CLI flag
ends in a valid result or a typed SteerableError naming the file, the line and the key; the CLI prints it and
exits 2. One named test per class of failure an attacker found, then a fuzz test over random JSONL files."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steerable.cli.main import main
from steerable.data.jsonl import read_jsonl
from steerable.data.loaders import load_pairs, load_prompt_rows, load_prompts
from steerable.data.messages import MAX_MESSAGES, check_messages
from steerable.data.roles import load_conversations
from steerable.errors import DataError, PlanError
from steerable.models.turns import segment


def _jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _generate(model_dir: str, prompts: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["generate", "--model", model_dir, "--prompts", prompts, "--out", str(tmp_path / "out.jsonl"),
            "--max-new-tokens", "2", *extra]


def refused_by_cli(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The CLI exits 2 (no traceback) and its message holds every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("steerable: error: "), err
    for n in needles:
        assert n in err, err
    return err


def bad_flag(argv: list[str], capsys: pytest.CaptureFixture[str], needle: str) -> None:
    """argparse refuses the flag: SystemExit(2) with a usage error naming the problem."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err, err
    assert needle in err, err


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Fail (instead of hanging the suite) if the block takes more than 20 s."""
    def boom(*_a: Any) -> None:
        raise TimeoutError("hung")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- chat messages as prompts -------------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "needle"), [
    ([1, "two", None], '"prompt"[0] must be a message'),
    ([{"role": "user", "content": "hi"}, "text"], '"prompt"[1] must be a message'),
], ids=["numbers", "strings"])
def test_prompt_list_of_non_messages(model_dir, tmp_path, capsys, prompt, needle):
    rows = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "fine"}, {"prompt": prompt}])
    refused_by_cli(_generate(model_dir, rows, tmp_path), capsys, "rows.jsonl:2", needle)
    assert not (tmp_path / "out.jsonl").exists()


def test_prompt_empty_list(model_dir, tmp_path, capsys):
    rows = _jsonl(tmp_path / "rows.jsonl", [{"prompt": []}])
    refused_by_cli(_generate(model_dir, rows, tmp_path), capsys, "rows.jsonl:1", '"prompt" is an empty list')


@pytest.mark.parametrize(("message", "needle"), [
    ({"role": "user"}, '"prompt"[0] has no "content"'),
    ({"content": "hi"}, '"prompt"[0] has no "role"'),
    ({"role": "user", "content": ["hi"]}, '"prompt"[0].content must be a string'),
    ({"role": "user", "content": 7}, '"prompt"[0].content must be a string'),
    ({"role": "wizard", "content": "hi"}, '"prompt"[0].role must be one of system, user, assistant'),
    ({"role": ["user"], "content": "hi"}, '"prompt"[0].role must be one of'),
    ({"role": "user", "content": "hi", "name": "x"}, "unknown key(s) ['name']"),
    ({"role": "user", "content": "\ud800"}, "lone surrogate"),
], ids=["no-content", "no-role", "list-content", "number-content", "unknown-role", "list-role", "extra-key",
        "surrogate"])
def test_message_without_content_or_role_or_with_bad_values(model_dir, tmp_path, capsys, message, needle):
    rows = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "fine"}, {"prompt": "fine"}, {"prompt": [message]}])
    refused_by_cli(_generate(model_dir, rows, tmp_path), capsys, "rows.jsonl:3", needle)


@pytest.mark.parametrize("prompt", [42, 1.5, True, None, {"role": "user", "content": "hi"}],
                         ids=["int", "float", "bool", "null", "object"])
def test_prompt_is_a_number_or_other_non_prompt(model_dir, tmp_path, capsys, prompt):
    rows = _jsonl(tmp_path / "rows.jsonl", [{"prompt": prompt}])
    refused_by_cli(_generate(model_dir, rows, tmp_path), capsys, "rows.jsonl:1", '"prompt"')


def test_message_lists_are_checked_in_one_place(llama, tmp_path):
    """load_prompt_rows, ModelHandle.render, the turn segmenter and load_conversations refuse the same inputs."""
    bad = [{"role": "bot", "content": "hi"}]
    with pytest.raises(DataError, match="role must be one of"):
        check_messages(bad)
    with pytest.raises(DataError, match="role must be one of"):
        llama.render(bad)
    with pytest.raises(DataError, match="role must be one of"):
        segment(llama, bad)
    with pytest.raises(DataError, match="is an empty list"):
        llama.render([])
    with pytest.raises(DataError, match="must be a string or a list"):
        llama.render(5)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="content must be a string"):
        llama.render("hi", system=3)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=f"at most {MAX_MESSAGES}"):
        llama.render([{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1))
    with pytest.raises(DataError, match="lone surrogate"):
        llama.encode(["\udc80"])
    conv = tmp_path / "conv.jsonl"
    conv.write_text(json.dumps({"id": "a", "turns": ["ok", "x" * 10]}) + "\n"
                    + json.dumps({"id": "b", "turns": ["\ud800"]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"conv\.jsonl:2: row holds a string with a lone surrogate"):
        load_conversations(str(conv))
    conv.write_text(json.dumps({"id": "a", "turns": ["x"] * (MAX_MESSAGES + 1)}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"at most {MAX_MESSAGES}"):
        load_conversations(str(conv))
    # a valid message list is accepted everywhere and renders as before
    good = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": good}) + "\n", encoding="utf-8")
    assert load_prompt_rows(str(rows))[0]["prompt"] == good
    assert llama.render(good).endswith("<|im_start|>assistant\n")
    assert len(segment(llama, good)[0]) > 0


def test_chat_template_refusals_are_data_errors(llama):
    llama.tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                                     "{{ raise_exception('no system prompts') }}{% endif %}{{ m['content'] }}"
                                     "{% endfor %}")
    with pytest.raises(DataError, match=r"chat template refuses these messages.*no system prompts"):
        llama.render("hi", system="be nice")


# -- per-row plans ------------------------------------------------------------------------------------

@pytest.mark.parametrize("plan", [5, "{\"vector\": 1}", True, 2.5], ids=["int", "string", "bool", "float"])
def test_row_plan_not_object_list_or_null(model_dir, tmp_path, capsys, plan):
    rows = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "hi", "plan": None}, {"prompt": "hi", "plan": plan}])
    refused_by_cli(_generate(model_dir, rows, tmp_path), capsys, "rows.jsonl:2",
                   '"plan" must be a JSON object, a list of them or null')


def test_row_plan_error_names_the_line(model_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join([json.dumps({"prompt": "a"}), "", "   ",
                               json.dumps({"prompt": "b", "plan": {"vector": "v.safetensors", "method": "warp"}}),
                               ""]), encoding="utf-8")
    err = refused_by_cli(_generate(model_dir, str(rows), tmp_path), capsys, "rows.jsonl:4: \"plan\": ",
                         "unknown method 'warp'")
    assert "row 1:" not in err
    assert "row 3:" not in err
    from steerable.cli import commands

    with pytest.raises(PlanError, match=r"^x: unknown method"):  # the type survives the prefix
        commands._checked({"method": "warp"}, None, None, "x")  # type: ignore[arg-type]


# -- unreadable files ---------------------------------------------------------------------------------

def test_non_utf8_prompt_pair_conversation_and_plan_files(model_dir, tmp_path, capsys):
    good = b'{"prompt": "hi", "positive": "a", "negative": "b", "id": "c", "turns": ["x"]}\n'
    for name in ("p.jsonl", "pairs.jsonl", "conv.jsonl"):
        (tmp_path / name).write_bytes(good + b'{"prompt": "caf\xe9"}\n')
    refused_by_cli(_generate(model_dir, str(tmp_path / "p.jsonl"), tmp_path), capsys, "p.jsonl:2: not UTF-8")
    refused_by_cli(["calibrate", "--model", model_dir, "--pairs", str(tmp_path / "pairs.jsonl"),
                    "--out", str(tmp_path / "v.safetensors")], capsys, "pairs.jsonl:2: not UTF-8")
    with pytest.raises(DataError, match=r"conv\.jsonl:2: not UTF-8"):
        load_conversations(str(tmp_path / "conv.jsonl"))
    with pytest.raises(DataError, match=r"p\.jsonl:2: not UTF-8"):
        load_prompts(str(tmp_path / "p.jsonl"))
    plan = tmp_path / "plan.json"
    plan.write_bytes(b'{"vector": "\xff\xfe"}')
    prompts = _jsonl(tmp_path / "ok.jsonl", [{"prompt": "hi"}])
    refused_by_cli(_generate(model_dir, prompts, tmp_path, "--plan", str(plan)), capsys, "not UTF-8")
    # a UTF-8 byte-order mark on the first line is fine
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good)
    assert load_prompts(str(tmp_path / "bom.jsonl")) == ["hi"]


def test_huge_integer_line(model_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a"}\n{"prompt": "b", "id": ' + "9" * 5000 + "}\n", encoding="utf-8")
    refused_by_cli(_generate(model_dir, str(rows), tmp_path), capsys, "rows.jsonl:2: not valid JSON")
    for load in (load_prompt_rows, load_pairs, load_conversations):
        with pytest.raises(DataError, match=r"rows\.jsonl:2: not valid JSON"):
            load(str(rows))


def test_deep_nesting_line(model_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n", encoding="utf-8")
    refused_by_cli(_generate(model_dir, str(rows), tmp_path), capsys, "rows.jsonl:1: not valid JSON")
    # shallow enough for json but deeper than a row may be (json.dumps of the output could recurse)
    rows.write_text('{"prompt": "a", "x": ' + "[" * 500 + "]" * 500 + "}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.jsonl:1: row nests more than 64 levels"):
        load_prompt_rows(str(rows))
    plan = tmp_path / "plan.json"
    plan.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    refused_by_cli(_generate(model_dir, _jsonl(tmp_path / "ok.jsonl", [{"prompt": "hi"}]), tmp_path,
                             "--plan", str(plan)), capsys, "plan.json", "not valid JSON")


def test_plan_flag_is_a_directory(model_dir, tmp_path, capsys):
    prompts = _jsonl(tmp_path / "ok.jsonl", [{"prompt": "hi"}])
    (tmp_path / "plans").mkdir()
    refused_by_cli(_generate(model_dir, prompts, tmp_path, "--plan", str(tmp_path / "plans")), capsys,
                   "plans: not a regular file (a directory)")
    refused_by_cli(_generate(model_dir, prompts, tmp_path, "--plan", str(tmp_path / "none.json")), capsys,
                   "no such plan file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.usefixtures("no_hang")
def test_prompts_flag_is_a_directory_or_fifo(model_dir, tmp_path, capsys):
    (tmp_path / "dir.jsonl").mkdir()
    refused_by_cli(_generate(model_dir, str(tmp_path / "dir.jsonl"), tmp_path), capsys,
                   "dir.jsonl: not a regular file (a directory)")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    refused_by_cli(_generate(model_dir, str(fifo), tmp_path), capsys, "fifo.jsonl: not a regular file (a FIFO)")
    for load in (load_prompt_rows, load_pairs, load_conversations):
        with pytest.raises(DataError, match="not a regular file"):
            load(str(fifo))
    plan_fifo = tmp_path / "plan.json"
    os.mkfifo(plan_fifo)
    prompts = _jsonl(tmp_path / "ok.jsonl", [{"prompt": "hi"}])
    refused_by_cli(_generate(model_dir, prompts, tmp_path, "--plan", str(plan_fifo)), capsys, "not a regular file")
    bad_flag(["drift", "--axis", "a.safetensors", "--out", str(tmp_path / "d"), "--plan", str(plan_fifo)], capsys,
             "not a regular file")
    assert time.monotonic() - t0 < 10
    refused_by_cli(_generate(model_dir, str(tmp_path / "missing.jsonl"), tmp_path), capsys,
                   "no such prompts file")
    (tmp_path / "outdir").mkdir()
    refused_by_cli(["generate", "--model", model_dir, "--prompts", prompts, "--out", str(tmp_path / "outdir")],
                   capsys, "is a directory")


def test_jsonl_with_no_usable_row(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n\n", encoding="utf-8")
    refused_by_cli(_generate(model_dir, str(empty), tmp_path), capsys, "empty.jsonl: no rows")
    for load in (load_prompts, load_pairs):
        with pytest.raises(DataError, match="no rows"):
            load(str(empty))
    with pytest.raises(DataError, match="no conversations"):
        load_conversations(str(empty))
    surrogate = tmp_path / "s.jsonl"
    surrogate.write_text('{"prompt": "hi", "id": "\\ud800"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"s\.jsonl:1: row holds a string with a lone surrogate"):
        read_jsonl(surrogate)


# -- numeric flags ------------------------------------------------------------------------------------

BIG = "1" + "0" * 400


@pytest.mark.parametrize(("argv", "needle"), [
    (["generate", "--prompts", "p.jsonl", "--out", "o", "--batch-size", "0"], "0 is out of range (1–4096)"),
    (["generate", "--prompts", "p.jsonl", "--out", "o", "--max-new-tokens", "-1"], "out of range (1–65536)"),
    (["generate", "--prompts", "p.jsonl", "--out", "o", "--max-new-tokens", BIG], "not a whole number"),
    (["generate", "--prompts", "p.jsonl", "--out", "o", "--batch-size", "١٠"], "not a whole number"),
    (["generate", "--prompts", "p.jsonl", "--out", "o", "--batch-size", "1_0"], "not a whole number"),
    (["calibrate", "--pairs", "refusal-pairs", "--out", "o", "--limit", BIG], "not a whole number"),
    (["calibrate", "--pairs", "refusal-pairs", "--out", "o", "--limit", "0"], "out of range"),
    (["sweep", "--vector", "v", "--prompts", "p", "--out", "o", "--group-rows", "0"], "out of range"),
    (["sweep", "--vector", "v", "--prompts", "p", "--out", "o", "--examples", "-3"], "out of range"),
    (["sweep", "--vector", "v", "--prompts", "p", "--out", "o", "--mmlu", "9" * 5000], "not a whole number"),
    (["tune", "--vector", "v", "--prompts", "p", "--out", "o", "--max-kl", "nan"], "not a finite number"),
    (["tune", "--vector", "v", "--prompts", "p", "--out", "o", "--max-kl", "-1"], "not a finite number"),
    (["tune", "--vector", "v", "--prompts", "p", "--out", "o", "--max-over-refusal", "2"], "0–1"),
    (["tune", "--vector", "v", "--prompts", "p", "--out", "o", "--ppl-threshold", "1e999"], "not a finite number"),
    (["report", "r.jsonl", "--out", "o", "--max-ppl-increase", "inf"], "not a finite number"),
    (["export-gguf", "v", "--out", "o", "--strength", "1e400"], "not a finite number"),
    (["axis", "--out", "o", "--bootstrap", "-1"], "out of range"),
    (["axis", "--out", "o", "--per-persona", "0"], "out of range"),
    (["axis", "--out", "o", "--personas", BIG], "not a whole number"),
    (["drift", "--axis", "a", "--out", "o", "--band", "5,inf"], "0 ≤ LO < HI ≤ 100"),
    (["drift", "--axis", "a", "--out", "o", "--band", "95,5"], "0 ≤ LO < HI ≤ 100"),
    (["drift", "--axis", "a", "--out", "o", "--band", "x"], "not two percentiles"),
    (["drift", "--axis", "a", "--out", "o", "--max-turns", "0"], "out of range"),
    (["drift", "--axis", "a", "--out", "o", "--layer", "-2"], "out of range"),
    (["bake", "--steer", "v", "--out", "o", "--direction", BIG], "not a whole number"),
    (["sim", "--out", "o", "--seed", "-1"], "out of range"),
    (["axis", "--out", "o", "--responses", "/dev/null"], "not a regular file"),
], ids=lambda v: "-".join(v[:1] + [a for a in v if a.startswith("--")][-1:]) if isinstance(v, list) else None)
def test_numeric_flags_are_bounded(capsys, argv, needle):
    bad_flag(argv, capsys, needle)


def test_numeric_flags_in_range_are_accepted(model_dir, tmp_path):
    prompts = _jsonl(tmp_path / "ok.jsonl", [{"prompt": "hi"}, {"prompt": "there"}])
    assert main(["generate", "--model", model_dir, "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", " 2", "--batch-size", "+1"]) == 0
    assert len((tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()) == 2


# -- fuzz: random JSONL files -------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(["prompt", "positive", "negative", "plan", "category", "id", "turns", "system", "kind",
                        "role", "content"])
MESSAGE = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant", "bot"]) | JSON,
                                               "content": st.text(max_size=8) | JSON})
ROW = st.dictionaries(KEYS, JSON | st.text(max_size=8) | st.lists(MESSAGE, max_size=3)
                      | st.lists(st.text(), max_size=3), max_size=5)
LINE = (ROW.map(json.dumps).map(str.encode) | JSON.map(json.dumps).map(str.encode) | st.binary(max_size=24)
        | st.sampled_from([b"", b"   ", b"{", b'{"prompt": "\\ud800"}', b'{"prompt": ' + b"9" * 5000 + b"}",
                           b"[" * 3000, b'{"prompt": "caf\xe9"}', b'{"prompt": [{"role": "user", "content": "x"}]}']))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(lines=st.lists(LINE, max_size=5))
def test_random_jsonl_files_load_or_raise_data_error(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    for load in (load_prompt_rows, load_pairs, load_conversations, load_prompts):
        try:
            out = load(str(path))
        except DataError as e:
            message = str(e)
            assert "fuzz.jsonl" in message
        else:
            assert out
            if load is load_prompt_rows:
                for r in out:
                    assert isinstance(r["prompt"], str) or check_messages(r["prompt"]) == r["prompt"]
                    json.dumps(r, ensure_ascii=False).encode("utf-8")  # the output file can be written


def test_reused_responses_file_is_read_safely(tmp_path, capsys):
    responses = tmp_path / "r.responses.jsonl"
    responses.write_bytes(b'{"persona": "a"}\n{"persona": "caf\xe9"}\n')
    bad_flag(["axis", "--out", str(tmp_path / "a.safetensors"), "--responses", str(responses)], capsys,
             "r.responses.jsonl:2: not UTF-8")
    responses.write_text('{"n": ' + "9" * 5000 + "}\n", encoding="utf-8")
    bad_flag(["axis", "--out", str(tmp_path / "a.safetensors"), "--responses", str(responses)], capsys,
             "r.responses.jsonl:1: not valid JSON")
