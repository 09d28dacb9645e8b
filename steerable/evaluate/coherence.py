"""Text-only coherence metrics (methods.md §8): language consistency, compression ratio, rep-n."""

from __future__ import annotations

import unicodedata
import zlib


def _latin_or_common(ch: str) -> bool:
    """ASCII, Latin script, or a Common/Inherited-script character (digits, punctuation, symbols, marks).

    Python has no Unicode script table; letters are Latin when their name says so, and the Common and
    Inherited scripts are approximated by the number/punctuation/symbol/mark categories.
    """
    if ord(ch) < 128:
        return True
    cat = unicodedata.category(ch)
    if cat[0] in "NPSZ" or cat in ("Mn", "Me", "Cf"):
        return True
    return cat[0] == "L" and "LATIN" in unicodedata.name(ch, "")


def language_consistency(text: str) -> float:
    """Share of non-space characters that are ASCII or Latin/Common/Inherited script (1.0 for empty text)."""
    chars = [c for c in text if not c.isspace()]
    return sum(map(_latin_or_common, chars)) / len(chars) if chars else 1.0


def compression_ratio(text: str) -> float:
    """len(zlib(utf8, 9)) / len(utf8): lower is more repetitive (0 for empty text)."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / len(raw) if raw else 0.0


def rep_n(text: str, n: int = 4) -> float:
    """1 − unique n-grams / all n-grams over whitespace tokens (0 when there are none)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0
