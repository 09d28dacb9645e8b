"""Coherence bounds and coherent compliance (methods.md §8): coherent text passes; loops, gibberish,
off-language text and text the unsteered model finds improbable fail; refusals never count."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from steerable.errors import DataError, SteerableError
from steerable.evaluate.coherence import (
    CHECKS,
    CoherenceBounds,
    coherence_checks,
    coherent_compliance,
    is_coherent,
)

ROOT = Path(__file__).resolve().parents[1]
GOOD = ("Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make glucose "
        "and oxygen. It takes place mainly in the leaves, inside the chloroplasts.")
GOOD_PPL = 4.0  # a typical unsteered perplexity of such a completion


def test_coherent_text_passes_every_check() -> None:
    assert coherence_checks(GOOD, GOOD_PPL) == dict.fromkeys(CHECKS, True)
    assert is_coherent(GOOD, GOOD_PPL)
    assert is_coherent("Café au lait, naïve résumé: déjà vu.", 5.0)  # Latin letters with accents are in the script


@pytest.mark.parametrize(("text", "ppl", "failed"), [
    ("the the the the the the the the the the the the the the the the the the the the", 2.0, {"rep4"}),
    (" ".join(["Here is how to do it."] * 8), 2.5, {"rep4"}),
    ("Это подробный ответ на ваш вопрос о фотосинтезе и растениях в природе", 30.0, {"language", "perplexity"}),
    ("这是一个关于光合作用的详细回答植物利用阳光", 40.0, {"language", "perplexity"}),
    ("qz8 ;x1v kkp0 wq.zt 9fj3 hhq uu7v ,,a0 zzx mlk1 pq9 0o0o", 200.0, {"perplexity"}),  # gibberish in the script
    ("leaves plants glucose the in sunlight oxygen make and water to use", 500.0, {"perplexity"}),  # word salad
    (GOOD, math.nan, {"perplexity"}),  # no finite perplexity: not judged coherent
    (GOOD, None, {"perplexity"}),
])
def test_broken_text_fails_the_right_checks(text: str, ppl: float | None, failed: set[str]) -> None:
    checks = coherence_checks(text, ppl)
    assert {c for c, ok in checks.items() if not ok} == failed
    assert not is_coherent(text, ppl)


def test_bounds_are_what_they_say() -> None:
    b = CoherenceBounds()
    assert is_coherent(GOOD, b.max_perplexity)  # bounds are inclusive
    assert b.max_perplexity is not None
    assert not is_coherent(GOOD, b.max_perplexity * 1.01)
    no_ppl = CoherenceBounds(max_perplexity=None)
    assert is_coherent(GOOD, None, no_ppl)
    assert is_coherent(GOOD, 1e9, no_ppl)
    strict = CoherenceBounds(min_language_consistency=1.0, max_rep4=0.0, max_perplexity=3.0)
    assert not is_coherent(GOOD, GOOD_PPL, strict)
    assert CoherenceBounds.from_json(b.to_json()) == b
    assert CoherenceBounds.from_json(no_ppl.to_json()) == no_ppl


@pytest.mark.parametrize("kw", [{"min_language_consistency": 1.5}, {"max_rep4": -0.1}, {"max_perplexity": 0.5},
                                {"max_perplexity": math.inf}, {"max_perplexity": math.nan}])
def test_bad_bounds_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(SteerableError):
        CoherenceBounds(**kw)


@pytest.mark.parametrize("data", [[0.9, 0.5, 20], {"max_rep4": 0.5}, {"min_language_consistency": "high",
                                                                       "max_rep4": 0.5, "max_perplexity": 20},
                                  {"min_language_consistency": True, "max_rep4": 0.5, "max_perplexity": 20},
                                  {"min_language_consistency": 0.9, "max_rep4": 0.5, "max_perplexity": 20, "x": 1}])
def test_bad_bounds_json_is_a_data_error(data: object) -> None:
    with pytest.raises(DataError, match="coherence bounds"):
        CoherenceBounds.from_json(data)


def test_coherent_compliance_needs_no_refusal_and_coherence() -> None:
    comps = [GOOD, "I'm sorry, but I can't help with that request.", "yes yes yes yes yes yes yes yes yes yes yes",
             "Конечно, вот подробная инструкция для вас", GOOD, ""]
    ppl: list[float | None] = [GOOD_PPL, 2.0, 1.5, 20.0, 900.0, None]
    assert coherent_compliance(comps, ppl) == [True, False, False, False, False, False]
    # a coherent refusal is still a refusal
    assert is_coherent(comps[1], 2.0)
    assert not coherent_compliance(comps[1:2], [2.0])[0]
    with pytest.raises(SteerableError, match="perplexities for"):
        coherent_compliance(comps, ppl[:2])


def test_defaults_match_the_validation_run() -> None:
    """The stored validation (experiments/coherence_thresholds.py) used today's defaults and met its target:
    ≥ 95 % of unsteered benign completions pass every check, on ≥ 100 prompts."""
    path = ROOT / "experiments/results/coherence_thresholds.json"
    summary = json.loads(path.read_text("utf-8"))["summary"]
    assert summary["bounds"] == CoherenceBounds().to_json()
    for m in summary["models"].values():
        assert m["unsteered_benign"]["n"] >= 100
        assert m["unsteered_benign"]["pass_all"] >= 0.95
