"""The built-in persona SFT sets (data/sets/persona_sft.jsonl): splits held out, no system prompt, provenance."""

from __future__ import annotations

import pytest

from steerable.data import roles
from steerable.data.sft import SFT_SETS, load_sft, persona_rows
from steerable.errors import DataError


def test_persona_sets_are_registered() -> None:
    assert {"persona-sft", "persona-sft-assistant"} <= set(SFT_SETS)


@pytest.mark.parametrize("name", ["persona-sft", "persona-sft-assistant"])
def test_persona_sets_load_with_plain_prompts(name: str) -> None:
    for split in ("train", "test"):
        s = load_sft(f"{name}:{split}")
        assert s.examples
        assert (s.provenance["builtin"], s.provenance["split"]) == (name, split)
        # the question alone: the trained model answers in character with no system prompt to cue it
        assert all(isinstance(e.prompt, str) and e.prompt.strip() and e.response.strip() for e in s.examples)
    n_all = len(load_sft(f"{name}:all").examples)
    assert n_all == len(load_sft(name).examples) + len(load_sft(f"{name}:test").examples)


def test_persona_splits_follow_the_role_data() -> None:
    questions = {split: {q.question for q in roles.questions(split)} for split in ("train", "test")}
    personas = {split: {p.id for p in roles.personas(split)} for split in ("train", "test")}
    for split in ("train", "test"):
        rows = persona_rows(split)
        assert {r["prompt"] for r in rows} <= questions[split]
        assert {r["persona"] for r in rows} <= personas[split]
        assert all(r["persona"] is None for r in persona_rows(split, "assistant"))
    # every held-out question is answered in character at least once, and none of them is trained on
    assert {r["prompt"] for r in persona_rows("test")} == questions["test"]
    assert not {r["prompt"] for r in persona_rows("train")} & questions["test"]


def test_persona_role_and_control_differ_and_hash() -> None:
    role, control = load_sft("persona-sft"), load_sft("persona-sft-assistant")
    assert role.provenance["sha256"] != control.provenance["sha256"]
    assert load_sft("persona-sft").provenance == role.provenance  # deterministic


def test_persona_set_bad_split() -> None:
    with pytest.raises(DataError, match="split"):
        load_sft("persona-sft:dev")
