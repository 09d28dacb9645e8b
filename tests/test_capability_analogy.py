"""The word-analogy capability items: parsing, fixed choices, the bundled file (when cached), and the
sweep / tune options that pick the capability format."""

from __future__ import annotations

import argparse

import pytest

from steerable.data.sources import DATA_FILES
from steerable.errors import DataError
from steerable.evaluate.capability import DEFAULT_FORMAT, DEFAULT_PER_SUBJECT, LETTERS, mc_correct, stratified
from steerable.evaluate.capability_analogy import SECTIONS, analogy_items, load_analogies, parse_analogies
from steerable.models.load import ModelHandle
from steerable.sources.wheels import cache_dir
from tests.conftest import tiny_handle

TEXT = """: capital-common-countries
Athens Greece Baghdad Iraq
Athens Greece Berlin Germany
Berlin Germany Paris France
Paris France Rome Italy
Rome Italy Madrid Spain
: family
boy girl brother sister
boy girl father mother
brother sister king queen
father mother son daughter
king queen uncle aunt
"""


def test_parse_keeps_sections_and_lines() -> None:
    got = parse_analogies(TEXT)
    assert list(got) == ["capital-common-countries", "family"]
    assert got["family"][0] == ("boy", "girl", "brother", "sister")
    assert len(got["capital-common-countries"]) == 5
    with pytest.raises(DataError, match="line 1"):
        parse_analogies("Athens Greece Baghdad Iraq\n")
    with pytest.raises(DataError, match="four words"):
        parse_analogies(": x\nAthens Greece Baghdad\n")


def test_items_hold_the_answer_and_three_distractors_from_the_section() -> None:
    sections = parse_analogies(TEXT)
    items = analogy_items(sections)
    assert len(items) == 10
    for (section, lines) in sections.items():
        answers = {d for *_, d in lines}
        mine = [it for it in items if it.subject == SECTIONS[section]]
        for it, (a, b, c, d) in zip(mine, lines, strict=True):
            assert it.question == f"{a} is to {b} as {c} is to what?"
            assert len(it.choices) == len(set(it.choices)) == 4
            assert it.choices[LETTERS.index(it.answer)] == d
            assert set(it.choices) <= answers
            assert not {a, b, c} & set(it.choices)
    assert analogy_items(sections) == items  # the draws are fixed
    assert {it.answer for it in analogy_items(parse_analogies(TEXT * 1))} <= set(LETTERS)


def test_a_section_with_too_few_answers_is_refused() -> None:
    with pytest.raises(DataError, match="too few"):
        analogy_items(parse_analogies(": x\na b c d\nc d e f\n"))


def test_items_work_with_the_mmlu_formats() -> None:
    handle: ModelHandle = tiny_handle("llama")
    items = stratified(analogy_items(parse_analogies(TEXT)), 2)
    assert len(items) == 4
    for fmt in ("cue+cal", "choice-loglik", DEFAULT_FORMAT):
        assert len(mc_correct(handle, items, format=fmt, batch_size=4)) == 4


@pytest.mark.skipif(not (cache_dir() / "data" / DATA_FILES["analogies"][0] / DATA_FILES["analogies"][2]).exists(),
                    reason="analogy set not cached (steerable fetch --data)")
def test_bundled_analogies() -> None:
    items = load_analogies()
    assert len(items) == 19544
    assert {it.subject for it in items} == set(SECTIONS.values())
    assert len(stratified(items, 72)) == 14 * 72


def test_sweep_and_tune_take_a_capability_format() -> None:
    from steerable.cli.sweep_cmd import add_sweep_parsers

    ap = argparse.ArgumentParser()
    add_sweep_parsers(ap.add_subparsers())
    base = ["--vector", "v.safetensors", "--prompts", "advbench", "--out", "o.json"]
    args = ap.parse_args(["tune", *base])
    assert (args.mmlu, args.capability_format) == (0, DEFAULT_FORMAT)
    args = ap.parse_args(["sweep", *base, "--mmlu", "--capability-format", "cue-3shot+cal"])
    assert (args.mmlu, args.capability_format) == (DEFAULT_PER_SUBJECT, "cue-3shot+cal")
    assert ap.parse_args(["sweep", *base, "--mmlu", "2"]).mmlu == 2
    assert ap.parse_args(["tune", *base, "--capability-task", "analogies"]).capability_task == "analogies"
    with pytest.raises(SystemExit):
        ap.parse_args(["sweep", *base, "--capability-format", "essay"])


def test_the_capability_format_enters_the_resume_key_unless_letter() -> None:
    from types import SimpleNamespace

    from steerable.sweeps.run import SweepSpec

    handle = SimpleNamespace(name="m", config_hash="h")
    rows = [{"prompt": "hi"}]
    letter = SweepSpec("v", [], rows, mmlu_per_subject=2, capability_format="letter").context(handle)  # type: ignore[arg-type]
    cal = SweepSpec("v", [], rows, mmlu_per_subject=2, capability_format="cue+cal").context(handle)  # type: ignore[arg-type]
    off = SweepSpec("v", [], rows, capability_format="cue+cal").context(handle)  # type: ignore[arg-type]
    assert "capability_format" not in letter
    assert "capability_format" not in off
    ana = SweepSpec("v", [], rows, mmlu_per_subject=2, capability_format="letter",
                    capability_task="analogies").context(handle)  # type: ignore[arg-type]
    assert ana["capability_task"] == "analogies"
    assert cal["capability_format"] == "cue+cal"
    assert {k: v for k, v in cal.items() if k != "capability_format"} == letter


def test_capability_tasks() -> None:
    from steerable.errors import SteerableError
    from steerable.evaluate.capability_tasks import task_items

    with pytest.raises(SteerableError, match="unknown capability task"):
        task_items("trivia", 1)
