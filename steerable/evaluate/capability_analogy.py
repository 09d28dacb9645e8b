"""A second capability measure: word analogies as four-way multiple choice (docs/results.md, "Capability
measure").

The data is the word2vec analogy test set (Mikolov et al. 2013, `questions-words.txt`, 19 544 lines in 14
sections: world capitals, currencies, US states, family terms and nine kinds of English morphology),
read from the gensim wheel (`data_file("analogies")`). Each line `a b c d` becomes the item "a is to b as
c is to what?" with `d` and three distractors drawn from the other answers of its section (never `a`,
`b` or `c`), the correct choice's position drawn too; both draws are seeded by the line, so the items
are fixed. Items are `MCItem`s, so every MMLU format (`capability.mc_correct(..., format=)`) and
`stratified` (by section) apply unchanged.
"""

from __future__ import annotations

import random

from steerable.data.sources import data_file
from steerable.errors import DataError
from steerable.evaluate.capability import LETTERS, MCItem

# the section names as a question's "subject"
SECTIONS = {
    "capital-common-countries": "capital cities",
    "capital-world": "world capitals",
    "currency": "currencies",
    "city-in-state": "US cities and states",
    "family": "family relations",
    "gram1-adjective-to-adverb": "adverbs",
    "gram2-opposite": "opposites",
    "gram3-comparative": "comparatives",
    "gram4-superlative": "superlatives",
    "gram5-present-participle": "present participles",
    "gram6-nationality-adjective": "nationality adjectives",
    "gram7-past-tense": "past tenses",
    "gram8-plural": "plural nouns",
    "gram9-plural-verbs": "verb forms",
}


def parse_analogies(text: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """The lines of each section of a questions-words file, in file order."""
    out: dict[str, list[tuple[str, str, str, str]]] = {}
    section: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words:
            continue
        if words[0] == ":":
            section = words[1]
            out.setdefault(section, [])
        elif section is None or len(words) != 4:
            raise DataError(f"analogy line {n}: expected ': section' or four words, got {line[:60]!r}")
        else:
            out[section].append((words[0], words[1], words[2], words[3]))
    return out


def analogy_items(sections: dict[str, list[tuple[str, str, str, str]]]) -> list[MCItem]:
    """Four-way items from parsed sections (see the module doc), ordered by section, then line."""
    items = []
    for section, lines in sections.items():
        answers = sorted({d for *_, d in lines})
        subject = SECTIONS.get(section, section)
        for a, b, c, d in lines:
            rng = random.Random(f"{section}:{a}:{b}:{c}:{d}")
            pool = [w for w in answers if w not in (a, b, c, d)]
            if len(pool) < len(LETTERS) - 1:
                raise DataError(f"section {section} has too few distinct answers for four choices")
            choices = rng.sample(pool, len(LETTERS) - 1)
            pos = rng.randrange(len(LETTERS))
            choices.insert(pos, d)
            items.append(MCItem(f"{a} is to {b} as {c} is to what?", tuple(choices), LETTERS[pos], subject))
    return items


def load_analogies() -> list[MCItem]:
    """The bundled analogy items (19 544, in 14 subjects); `stratified(load_analogies(), n)` draws n per
    subject."""
    return analogy_items(parse_analogies(data_file("analogies").read_text(encoding="utf-8")))
