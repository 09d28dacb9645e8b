"""The project's role data (steerable/data/roles/): personas, neutral questions, persona-framed harmful
requests and multi-turn drift scripts, each row with a fixed "split" (train / test).

Written by the project for the Assistant Axis (methods.md §3) and persona drift (§8); it ships inside the
package, so nothing is fetched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerable.data.jsonl import read_jsonl_numbered
from steerable.data.messages import check_messages, check_text
from steerable.errors import DataError

ROLES_DIR = Path(__file__).with_name("roles")
ROLE_FILES = ("personas", "questions", "harmful", "conversations")
SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class Persona:
    id: str
    kind: str
    system: str


@dataclass(frozen=True)
class Question:
    id: str
    topic: str
    question: str


@dataclass(frozen=True)
class Conversation:
    """A drift script: user turns only; the assistant's replies are generated turn by turn."""

    id: str
    turns: tuple[str, ...]
    system: str | None = None
    kind: str = ""


def _rows(name: str, split: str) -> list[dict[str, Any]]:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    path = ROLES_DIR / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows if split == "all" else [r for r in rows if r["split"] == split]


def personas(split: str = "train") -> list[Persona]:
    return [Persona(r["id"], r["kind"], r["system"]) for r in _rows("personas", split)]


def questions(split: str = "train") -> list[Question]:
    return [Question(r["id"], r["topic"], r["question"]) for r in _rows("questions", split)]


def harmful_rows(split: str = "test") -> list[dict[str, Any]]:
    """Persona-framed harmful requests as prompt rows: {"prompt": [system, user], "category", "id"}."""
    return [{"prompt": [{"role": "system", "content": r["system"]}, {"role": "user", "content": r["user"]}],
             "category": r["category"], "id": r["id"]} for r in _rows("harmful", split)]


def _conversation(row: dict[str, Any], where: str) -> Conversation:
    turns = row.get("turns")
    if not isinstance(row.get("id"), str | int) or isinstance(row.get("id"), bool) or not isinstance(turns, list) \
            or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise DataError(f"{where}: a conversation needs an \"id\" and \"turns\" (non-empty user messages)")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: \"system\" must be a string")
    kind = row.get("kind", "")
    if not isinstance(kind, str):
        raise DataError(f"{where}: \"kind\" must be a string")
    # the user messages a drift run renders (replies come later) pass the one message check
    check_messages([{"role": "user", "content": t} for t in turns], where, "\"turns\"")
    if system is not None:
        check_text(system, where, "\"system\"")
    return Conversation(str(row["id"]), tuple(turns), system, kind)


def load_conversations(spec: str) -> list[Conversation]:
    """Drift scripts: `roles` / `roles:test` / `roles:train` / `roles:all` (built-in; default test), or a
    JSONL of {"id", "system"?, "turns": [user messages]}."""
    path = Path(spec)
    if path.suffix == ".jsonl":
        if not os.path.lexists(path):
            raise DataError(f"conversations file {spec} does not exist")
        out = [_conversation(row, f"{path}: row {n}") for n, row in read_jsonl_numbered(path, "conversations file")]
    else:
        name, _, split = spec.partition(":")
        if name not in ("roles", "conversations"):
            raise DataError(f"unknown conversation set {spec!r}: use roles[:train|test|all] or a .jsonl file")
        out = [_conversation(r, f"roles/{r.get('id')}") for r in _rows("conversations", split or "test")]
    ids = [c.id for c in out]
    if len(set(ids)) != len(ids):
        raise DataError(f"conversation ids must be unique in {spec}")
    if not out:
        raise DataError(f"no conversations in {spec}")
    return out
