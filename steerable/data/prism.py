"""`prism:DIR`: preference pairs from the published PRISM alignment files (Kirk et al. 2024).

PRISM cannot be downloaded here; point `prism:DIR` at a directory holding the released files:
- `utterances.jsonl` (read when present): one row per rated model response, with `utterance_id`,
  `interaction_id` (one human message and the responses rated for it), `conversation_id`, `user_id`,
  `turn` (0-based), `within_turn_id`, `conversation_type`, `user_prompt`, `model_response`, `model_name`,
  `model_provider`, `score` (1–100) and `if_chosen`;
- otherwise `conversations.jsonl`: one row per conversation (`conversation_id`, `user_id`,
  `conversation_type`, …) whose `conversation_history` lists the turns: `{"turn", "role": "user",
  "content"}` and `{"turn", "role": "model", "content", "within_turn_id", "model_name", "score",
  "if_chosen"}` entries. Both files hold the same interactions; utterances.jsonl is the long format.

Pairs: within one interaction, the chosen response against each rejected response. Dropped: responses
stored as "EMPTY STRING" (PRISM's code for an empty reply) or blank; a rejected response whose score
equals the chosen one's (a tie) or exceeds it (contradicts the choice); a rejected text equal to the
chosen text or to an earlier rejected text of the same interaction (duplicates); interactions without
exactly one chosen response. By default only opening turns (turn 0) are read: their prompt stands alone,
and four different models answered it; `all_turns=True` adds later turns, whose prompt is then the
turn's human message alone (the earlier turns are not carried in a string prompt).

Splits (fixed): a user is unseen when preferences.user_seen says so (20 % by a seeded hash of user_id);
a pair's train/test split is loaders.split_of of its conversation id (30 % test), so every pair of a
conversation lands in the same split and no prompt is in both. `category` is the conversation type.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerable.data.jsonl import read_jsonl_numbered
from steerable.data.loaders import split_of
from steerable.data.messages import check_text
from steerable.data.preferences import PreferenceRow, user_seen
from steerable.errors import DataError

log = logging.getLogger(__name__)

EMPTY = "EMPTY STRING"  # how PRISM stores an empty model response
UTTERANCE_KEYS = ("user_id", "interaction_id", "user_prompt", "model_response", "score", "if_chosen")


@dataclass(frozen=True)
class Response:
    """One rated model response of an interaction, with where it came from (for error messages)."""

    text: str
    score: float
    chosen: bool
    order: int  # within_turn_id, else position in the file
    where: str


@dataclass
class Interaction:
    key: str
    user: str
    conversation: str
    turn: int | None
    prompt: str
    category: str | None
    responses: list[Response]


def split_of_conversation(conversation_id: str) -> str:
    """The fixed train/test split of a PRISM conversation (and so of every pair it gives)."""
    return split_of(f"prism:{conversation_id}")


def _id(value: Any, where: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f'{where}: "{key}" must be a string (or integer) id, got {type(value).__name__}')
    return check_text(str(value), where, f'"{key}"')


def _score(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f'{where}: "score" must be a finite number, got {value!r:.40}')
    return float(value)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise DataError(f'{where}: "if_chosen" must be true or false, got {value!r:.40}')
    return value


def _turn(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f'{where}: "turn" must be an integer, got {value!r:.40}')
    return value


def _category(value: Any, where: str) -> str | None:
    return None if value is None else check_text(value, where, '"conversation_type"')


def _order(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _from_utterances(path: Path) -> list[Interaction]:
    groups: dict[str, Interaction] = {}
    for n, row in read_jsonl_numbered(path, "PRISM utterances file"):
        where = f"{path}:{n}"
        missing = [k for k in UTTERANCE_KEYS if k not in row]
        if missing:
            raise DataError(f'{where}: utterance row has no {", ".join(chr(34) + k + chr(34) for k in missing)}'
                            f' (PRISM utterances need {", ".join(UTTERANCE_KEYS)})')
        key = _id(row["interaction_id"], where, "interaction_id")
        user = _id(row["user_id"], where, "user_id")
        prompt = check_text(row["user_prompt"], where, '"user_prompt"')
        conv = _id(row.get("conversation_id", key), where, "conversation_id")
        turn = _turn(row.get("turn"), where)
        inter = groups.get(key)
        if inter is None:
            inter = groups[key] = Interaction(key, user, conv, turn, prompt,
                                              _category(row.get("conversation_type"), where), [])
        elif (inter.user, inter.prompt, inter.conversation) != (user, prompt, conv):
            raise DataError(f"{where}: interaction {key!r} has another user, prompt or conversation than its "
                            "first row")
        inter.responses.append(Response(check_text(row["model_response"], where, '"model_response"'),
                                        _score(row["score"], where), _flag(row["if_chosen"], where),
                                        _order(row.get("within_turn_id"), len(inter.responses)), where))
    return list(groups.values())


def _from_conversations(path: Path) -> list[Interaction]:
    out: list[Interaction] = []
    seen_ids: set[str] = set()
    for n, row in read_jsonl_numbered(path, "PRISM conversations file"):
        where = f"{path}:{n}"
        for k in ("conversation_id", "user_id", "conversation_history"):
            if k not in row:
                raise DataError(f'{where}: conversation row has no "{k}"')
        conv = _id(row["conversation_id"], where, "conversation_id")
        if conv in seen_ids:
            raise DataError(f"{where}: conversation {conv!r} appears twice")
        seen_ids.add(conv)
        user = _id(row["user_id"], where, "user_id")
        category = _category(row.get("conversation_type"), where)
        history = row["conversation_history"]
        if not isinstance(history, list):
            raise DataError(f'{where}: "conversation_history" must be a list, got {type(history).__name__}')
        turns: dict[int, Interaction] = {}
        models: list[tuple[int, dict[str, Any], str]] = []
        for i, entry in enumerate(history):
            at = f"{where} conversation_history[{i}]"
            if not isinstance(entry, dict) or "role" not in entry or "content" not in entry:
                raise DataError(f'{at}: each entry needs "role" and "content"')
            turn = _turn(entry.get("turn"), at)
            if turn is None:
                raise DataError(f'{at}: entry has no "turn"')
            if entry["role"] == "user":
                if turn in turns:
                    raise DataError(f"{at}: turn {turn} has a second user message")
                turns[turn] = Interaction(f"{conv}:{turn}", user, conv, turn,
                                          check_text(entry["content"], at, '"content"'), category, [])
            elif entry["role"] in ("model", "assistant"):
                models.append((turn, entry, at))
            else:
                raise DataError(f'{at}: "role" must be "user" or "model", got {entry["role"]!r:.40}')
        for turn, entry, at in models:
            if turn not in turns:
                raise DataError(f"{at}: model response for turn {turn}, which has no user message")
            for k in ("score", "if_chosen"):
                if k not in entry:
                    raise DataError(f'{at}: model entry has no "{k}"')
            inter = turns[turn]
            inter.responses.append(Response(check_text(entry["content"], at, '"content"'),
                                            _score(entry["score"], at), _flag(entry["if_chosen"], at),
                                            _order(entry.get("within_turn_id"), len(inter.responses)), at))
        out.extend(turns[t] for t in sorted(turns))
    return out


def _usable(text: str) -> bool:
    return bool(text.strip()) and text.strip() != EMPTY


def interaction_pairs(inter: Interaction, drops: Counter[str]) -> list[tuple[str, str]]:
    """(chosen, rejected) texts of one interaction after the drop rules (module docstring); `drops`
    counts what was dropped and why."""
    if not _usable(inter.prompt):
        drops["empty prompt"] += 1
        return []
    usable = []
    for r in inter.responses:
        if _usable(r.text):
            usable.append(r)
        else:
            drops["empty response"] += 1
    chosen = [r for r in usable if r.chosen]
    if len(chosen) != 1:
        drops["no chosen response" if not chosen else "several chosen responses"] += 1
        return []
    best = chosen[0]
    pairs: list[tuple[str, str]] = []
    texts = {best.text.strip()}
    for r in sorted((r for r in usable if not r.chosen), key=lambda r: r.order):
        if r.text.strip() in texts:
            drops["duplicate text"] += 1
        elif r.score == best.score:
            drops["tie"] += 1
        elif r.score > best.score:
            drops["rejected scored higher"] += 1
        else:
            texts.add(r.text.strip())
            pairs.append((best.text, r.text))
    return pairs


def prism_pairs(directory: str | Path, split: str = "all", *,
                all_turns: bool = False) -> tuple[list[PreferenceRow], dict[str, int]]:
    """The pairs of a PRISM directory and the counts of what the drop rules removed."""
    if split not in ("train", "test", "all"):
        raise DataError(f"unknown split {split!r} for prism: use train, test or all")
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"prism:{directory}: not a directory (give the folder holding PRISM's "
                        "utterances.jsonl or conversations.jsonl)")
    if (root / "utterances.jsonl").exists():
        interactions = _from_utterances(root / "utterances.jsonl")
    elif (root / "conversations.jsonl").exists():
        interactions = _from_conversations(root / "conversations.jsonl")
    else:
        raise DataError(f"prism:{directory}: no utterances.jsonl or conversations.jsonl in it")
    drops: Counter[str] = Counter()
    rows: list[PreferenceRow] = []
    for inter in interactions:
        if not all_turns and inter.turn not in (0, None):
            drops["later turn"] += 1
            continue
        pair_split = split_of_conversation(inter.conversation)
        if split != "all" and pair_split != split:
            continue
        seen = user_seen(inter.user)
        rows.extend(PreferenceRow(inter.user, inter.prompt, c, r, category=inter.category, split=pair_split,
                                  seen=seen, answer_token=False)
                    for c, r in interaction_pairs(inter, drops))
    log.info("prism:%s: %d pairs from %d interactions; dropped %s", directory, len(rows), len(interactions),
             dict(drops))
    return rows, dict(drops)


def load_prism(directory: str | Path, split: str = "all", *, all_turns: bool = False) -> list[PreferenceRow]:
    """PreferenceRows from PRISM's files in `directory` (module docstring for the rules)."""
    rows, _ = prism_pairs(directory, split, all_turns=all_turns)
    return rows


__all__ = ["EMPTY", "interaction_pairs", "load_prism", "prism_pairs", "split_of_conversation"]
