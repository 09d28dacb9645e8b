"""Per-user preference pairs (methods.md §7): JSONL files, the built-in synthetic `users-caa`, and PRISM.

A preference row is `{"user": str, "prompt": str, "chosen": str, "rejected": str}` plus optional
`"category"` (str), `"split"` ("train" | "test": the pair's split), `"seen"` (bool: whether the user is a
seen user, one whose training pairs build the population vector and basis) and `"answer_token"` (bool:
chosen and rejected are A/B answer letters such as "(A)", read at the `answer-token` position; when the
key is absent it is true exactly when both texts are bare "(X)" letters). A user has any number of rows.

`load_preferences(spec, split=...)` takes
- a JSONL path (`FILE.jsonl`, optionally `FILE.jsonl:SPLIT`): rows carrying a "split" are kept only in
  that split, rows without one are kept in every split;
- `users-caa[:SPLIT]`: the built-in synthetic users (data/users_caa.py, docs/users_caa.md);
- `prism:DIR[:SPLIT]`: the published PRISM files in DIR (data/prism.py).
A split written in the spec wins over the `split` argument (the command's default); `None` or "all"
keeps every pair. Every problem is a DataError naming the file and line (or the set and row).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerable.data.jsonl import read_jsonl_numbered
from steerable.data.messages import check_text
from steerable.errors import DataError

SPLITS = ("train", "test", "all")
PAIR_SPLITS = ("train", "test")
REQUIRED = ("user", "prompt", "chosen", "rejected")
PREFERENCE_SETS = ("users-caa", "prism:DIR")  # what `steerable list` can name beside JSONL files

# The axes of users-caa: the CAA behaviour sets the project bundles (data/sources.py), in a fixed order.
# An ideal point's k-th coordinate is the user's taste for the answer the k-th set marks as matching.
BEHAVIOURS: tuple[str, ...] = (
    "sycophancy", "survival-instinct", "corrigible-neutral-HHH", "myopic-reward", "refusal",
    "hallucination", "coordinate-other-ais",
)

# Seen / unseen users (sources without their own user split: PRISM): a fixed 20 % of users, chosen by a
# seeded hash of the user id, are held out of fitting the population vector and basis.
USER_SPLIT_SEED = "steerable-users-v1"
UNSEEN_PERCENT = 20

_LETTER_ONLY = re.compile(r"^\(\s*[A-Za-z]\s*\)$")
_LETTER_OPENING = re.compile(r"^\(\s*([A-Za-z])\s*\)")


@dataclass(frozen=True)
class PreferenceRow:
    """One pairwise preference of one user: `chosen` was preferred to `rejected` as a reply to `prompt`."""

    user: str
    prompt: str
    chosen: str
    rejected: str
    category: str | None = None
    split: str | None = None  # "train" | "test" (a pair's split), None when the source has none
    seen: bool | None = None  # True = seen user, False = unseen (held-out) user, None = not known
    answer_token: bool = False  # chosen/rejected open with A/B answer letters (position "answer-token")


def user_seen(user: str) -> bool:
    """The fixed seen/unseen split of user ids (PRISM): 20 % unseen by a seeded hash of the id."""
    digest = hashlib.sha256(f"{USER_SPLIT_SEED}:{user}".encode()).hexdigest()
    return int(digest[:8], 16) % 100 >= UNSEEN_PERCENT


def is_answer_letter(text: str) -> bool:
    """True for a bare A/B answer such as "(A)" (what the CAA A/B score reads)."""
    return _LETTER_ONLY.match(text.strip()) is not None


def answer_letter(text: str) -> str | None:
    """The A/B answer a response opens with ("(B) I'd be willing…" → "(B)"), or None: what position
    "answer-token" reads of an A/B response that goes on to spell its choice out."""
    m = _LETTER_OPENING.match(text.strip())
    return None if m is None else f"({m.group(1).upper()})"


def _check_split(split: str | None, where: str) -> str | None:
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r} in {where}: use train, test or all")
    return None if split == "all" else split


def _field(row: dict[str, Any], key: str, where: str) -> str:
    if key not in row or row[key] is None:
        raise DataError(f'{where}: preference row has no "{key}" (each row needs string '
                        f'{", ".join(chr(34) + k + chr(34) for k in REQUIRED)})')
    text = check_text(row[key], where, f'"{key}"')
    if not text.strip():
        raise DataError(f'{where}: "{key}" is empty')
    return text


def parse_row(row: dict[str, Any], where: str) -> PreferenceRow:
    """A checked PreferenceRow from one JSON object; `where` ("FILE:LINE") names it in every error."""
    user, prompt, chosen, rejected = (_field(row, k, where) for k in REQUIRED)
    if chosen.strip() == rejected.strip():
        raise DataError(f'{where}: "chosen" equals "rejected" ({chosen[:40]!r}): a preference needs two '
                        "different texts")
    category = row.get("category")
    if category is not None:
        category = check_text(category, where, '"category"')
    split = row.get("split")
    if split is not None and split not in PAIR_SPLITS:
        raise DataError(f'{where}: "split" must be "train", "test" or null, got {split!r}')
    seen = row.get("seen")
    if seen is not None and not isinstance(seen, bool):
        raise DataError(f'{where}: "seen" must be true, false or null, got {type(seen).__name__}')
    answer_token = row.get("answer_token")
    if answer_token is None:
        answer_token = is_answer_letter(chosen) and is_answer_letter(rejected)
    elif not isinstance(answer_token, bool):
        raise DataError(f'{where}: "answer_token" must be true or false, got {type(answer_token).__name__}')
    elif answer_token and not (answer_letter(chosen) and answer_letter(rejected)):
        raise DataError(f'{where}: "answer_token" is true but "chosen"/"rejected" do not open with answer '
                        'letters such as "(A)"')
    return PreferenceRow(user, prompt, chosen, rejected, category, split, seen, answer_token)


def read_preferences_jsonl(path: str | Path, split: str | None = None) -> list[PreferenceRow]:
    """The preference rows of a JSONL file; with `split` ("train"/"test"), rows carrying another split are
    dropped (rows without a "split" are kept). DataError names the file and line."""
    path = Path(path)
    split = _check_split(split, str(path))
    numbered = read_jsonl_numbered(path, "preferences file")
    if not numbered:
        raise DataError(f"{path}: no preference rows (one JSON object per line with "
                        f'{", ".join(chr(34) + k + chr(34) for k in REQUIRED)})')
    rows = [parse_row(r, f"{path}:{n}") for n, r in numbered]
    kept = [r for r in rows if split is None or r.split is None or r.split == split]
    if not kept:
        raise DataError(f"{path}: no usable preference row in split {split!r} ({len(rows)} rows, all in "
                        "another split)")
    return kept


def _split_suffix(spec: str) -> tuple[str, str | None]:
    """`NAME:SPLIT` → (NAME, SPLIT) when the last ':' part is a split name, else (spec, None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail in SPLITS:
        return head, tail
    return spec, None


def load_preferences(spec: str, *, split: str | None = None) -> list[PreferenceRow]:
    """Preference rows from a JSONL path, `users-caa[:SPLIT]` or `prism:DIR[:SPLIT]` (module docstring).

    `split` is the default split ("train" for fitting, "test" for evaluation; None or "all": every pair);
    a split written in the spec wins. Raises DataError naming the file/line or set/row of any problem.
    """
    if not isinstance(spec, str) or not spec:
        raise DataError("preferences: give a .jsonl file, users-caa[:split] or prism:DIR")
    split = _check_split(split, "the split argument")
    base, written = _split_suffix(spec)
    if written is not None:
        split = _check_split(written, spec)
    if base == "users-caa":
        from steerable.data.users_caa import users_caa  # users_caa imports this module

        rows: Sequence[PreferenceRow] = users_caa(split or "all")
    elif base.startswith("prism:"):
        from steerable.data.prism import load_prism

        directory = base[len("prism:"):]
        if not directory:
            raise DataError(f"{spec}: name the directory holding PRISM's files (prism:DIR)")
        rows = load_prism(directory, split or "all")
    elif base.endswith(".jsonl") or Path(base).is_file():
        if not Path(base).exists():
            raise DataError(f"no such preferences file: {base}")
        return read_preferences_jsonl(base, split)
    else:
        raise DataError(f"unknown preference set {spec!r}: use a .jsonl file, users-caa[:train|test|all] or "
                        "prism:DIR[:train|test|all]")
    if not rows:
        raise DataError(f"{spec}: no usable preference row in split {split or 'all'!r}")
    return list(rows)


def true_ideal_points() -> dict[str, list[float]]:
    """users-caa only: each synthetic user's ideal point over BEHAVIOURS (data/users_caa.py)."""
    from steerable.data.users_caa import true_ideal_points as ideal

    return ideal()


__all__ = [
    "BEHAVIOURS", "PREFERENCE_SETS", "PreferenceRow", "answer_letter", "is_answer_letter", "load_preferences",
    "parse_row", "read_preferences_jsonl", "true_ideal_points", "user_seen",
]
