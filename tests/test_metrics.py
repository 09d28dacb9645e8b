"""Logit metrics, capability and judge quality, checked against hand computations on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

from steerable.data.loaders import Example, Pair, _split_caa
from steerable.data.sources import DATA_FILES
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.errors import SteerableError
from steerable.evaluate.capability import (
    MCItem,
    mc_correct,
    mc_prompt,
    mmlu_accuracy,
    mmlu_change,
    paired_change,
    stratified,
)
from steerable.evaluate.judge import drop_reused, judge_quality, judge_quality_on
from steerable.evaluate.logits import (
    ab_score,
    answer_letter,
    first_token_ids,
    kl_benign,
    kl_per_prompt,
    log1mexp,
    mass_logit,
    perplexity,
    refusal_score,
)
from steerable.sources.wheels import cache_dir
from steerable.steering.hooks import steer

EX = [Example(p, None, i % 2, i // 2) for i, p in enumerate(
    ["hurt someone", "hug someone", "rob a store", "open a store", "poison a well", "dig a well",
     "burn a house", "build a house"])]
PROMPTS = ["Say something nice", "What is the capital of France? Answer in one word, please.", "Hi"]


@pytest.fixture
def vec_path(llama, tmp_path):
    ds = calibrate(llama, EX, position="last", progress=False)
    return str(save_directions(ds, tmp_path / "v.safetensors"))


def _plan(vec_path, strength=4.0, **kw):
    return {"vector": vec_path, "method": "add", "strength": strength, "layers": "1-2", **kw}


def _ids(handle, prompt, tail=""):
    """Unpadded token ids of the rendered prompt, and of the prompt + tail."""
    p = handle.encode([handle.render(prompt)])["input_ids"][0].tolist()
    return p, p + handle.tokenizer.encode(tail, add_special_tokens=False)


def _logprobs(handle, ids):
    with torch.no_grad():
        return handle.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def _cached(name):
    pkg, _, member, _ = DATA_FILES[name]
    return (cache_dir() / "data" / pkg / member).exists()


# -- refusal score ----------------------------------------------------------------------------------


def test_mass_logit_on_hand_made_distribution():
    lp = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    assert float(mass_logit(lp, [0, 1])) == pytest.approx(math.log(3))
    assert float(mass_logit(lp, [2])) == pytest.approx(math.log(1 / 7))
    assert float(log1mexp(torch.tensor(-1e-10, dtype=torch.float64))) == pytest.approx(math.log(1e-10), rel=1e-6)
    assert float(log1mexp(torch.tensor(-30.0))) == pytest.approx(-math.exp(-30), rel=1e-3)


def test_first_token_ids_deduplicated(llama):
    tok = llama.tokenizer
    got = first_token_ids(tok, ["I", "I'm", "As", "Sorry", "Ask"])
    assert got == [tok.convert_tokens_to_ids(c) for c in ("I", "A", "S")]


def test_refusal_score_matches_hand_computation_and_ignores_padding(handle):
    ids = first_token_ids(handle.tokenizer, ["I", "I'm", "As", "Sorry", "Unfortunately"])
    got = refusal_score(handle, PROMPTS, batch_size=2)  # batches of two: the shorter prompt is left-padded
    for prompt, score in zip(PROMPTS, got, strict=True):
        p, _ = _ids(handle, prompt)
        assert score == pytest.approx(float(mass_logit(_logprobs(handle, p)[-1], ids)), abs=1e-4)


def test_refusal_score_under_plan(llama, vec_path):
    base = refusal_score(llama, PROMPTS)
    steered = refusal_score(llama, PROMPTS, _plan(vec_path))
    assert all(abs(a - b) > 1e-3 for a, b in zip(base, steered, strict=True))
    # A "generated" gate touches no prompt position: the session is told where the prompt ends.
    assert refusal_score(llama, PROMPTS, _plan(vec_path, gate="generated")) == pytest.approx(base, abs=1e-6)
    assert refusal_score(llama, PROMPTS) == base  # hooks gone, model unchanged


# -- A/B score --------------------------------------------------------------------------------------


def test_answer_letter_reads_caa_answers():
    assert answer_letter("(A)") == "A"
    assert answer_letter(" (B) Disagree") == "B"
    with pytest.raises(SteerableError, match="answer letter"):
        answer_letter("Yes")


def test_caa_rows_split_into_ab_items():
    row = "Do you agree?\n\nChoices:\n (A) Agree\n (B) Disagree\n\nAnswer:\n ({})"
    pair = _split_caa(row.format("A"), row.format("B"))
    assert pair.prompt.endswith("Answer:")
    assert (answer_letter(pair.positive), answer_letter(pair.negative)) == ("A", "B")
    row = "What is your SSN?\n\nChoices:\n(A) I have none\n(B) Sure, it is 123\n({})"
    pair = _split_caa(row.format("A"), row.format("B"))
    assert pair.prompt.endswith("123")
    assert answer_letter(pair.positive) == "A"


def test_ab_score_matches_hand_computation(llama):
    q1 = "Do you agree?\n\nChoices:\n (A) Agree\n (B) Disagree\n\nAnswer:"
    q2 = "Pick one, please, and be quick about it.\n\nChoices:\n(A) x\n(B) y"
    items = [Pair(q1, "(A)", "(B)"), Pair(q2, "(B)", "(A)")]
    got = ab_score(llama, items, batch_size=2)
    a, b = (llama.tokenizer.convert_tokens_to_ids(c) for c in "AB")
    for item, score in zip(items, got, strict=True):
        _, ids = _ids(llama, item.prompt, "(")
        lp = _logprobs(llama, ids)[-1]
        m, o = (a, b) if item.positive == "(A)" else (b, a)
        assert score == pytest.approx(float(torch.sigmoid(lp[m] - lp[o])), abs=1e-5)
    swapped = ab_score(llama, [Pair(p.prompt, p.negative, p.positive) for p in items])
    assert [s + t for s, t in zip(got, swapped, strict=True)] == pytest.approx([1.0, 1.0])
    with pytest.raises(SteerableError, match="both answers"):
        ab_score(llama, [Pair(q1, "(A)", "(A)")])


# -- perplexity -------------------------------------------------------------------------------------


def test_perplexity_matches_hand_computation(handle):
    completions = ["Paris is lovely.", "ok", ""]
    got = perplexity(handle, PROMPTS, completions, batch_size=3)  # prompts left-, completions right-padded
    for prompt, comp, ppl in zip(PROMPTS[:2], completions[:2], got[:2], strict=True):
        p, full = _ids(handle, prompt, comp)
        lp = _logprobs(handle, full)
        nll = -sum(float(lp[j - 1, full[j]]) for j in range(len(p), len(full))) / (len(full) - len(p))
        assert ppl == pytest.approx(math.exp(nll), rel=1e-4)
    assert math.isnan(got[2])


def test_perplexity_under_plan_scores_like_generation(llama, vec_path):
    base = perplexity(llama, PROMPTS, ["Paris!", "x", "Hello there"])
    steered = perplexity(llama, PROMPTS, ["Paris!", "x", "Hello there"], _plan(vec_path))
    assert all(abs(a - b) > 1e-4 for a, b in zip(base, steered, strict=True))
    # Under a "generated" gate the first completion token is predicted from the (unsteered) prompt, as in
    # generate(): a one-token completion scores as unsteered, longer ones do not.
    gated = perplexity(llama, PROMPTS, ["Paris!", "x", "Hello there"], _plan(vec_path, gate="generated"))
    assert gated[1] == pytest.approx(base[1], rel=1e-5)
    assert abs(gated[0] - base[0]) > 1e-4


# -- KL on benign prompts ---------------------------------------------------------------------------


def test_kl_matches_hand_computation(handle, tmp_path):
    ds = calibrate(handle, EX, position="last", progress=False)
    plan = _plan(str(save_directions(ds, tmp_path / "v.safetensors")))
    got = kl_per_prompt(handle, PROMPTS, plan, batch_size=2)
    lengths = []
    for prompt, kl in zip(PROMPTS, got, strict=True):
        ids, _ = _ids(handle, prompt)
        p = _logprobs(handle, ids)
        with steer(handle, plan):
            q = _logprobs(handle, ids)
        want = float((p.exp() * (p - q)).sum(-1).mean())
        assert kl == pytest.approx(want, rel=1e-3, abs=1e-6)
        assert want > 1e-4
        lengths.append(len(ids))
    pooled = sum(k * n for k, n in zip(got, lengths, strict=True)) / sum(lengths)
    assert kl_benign(handle, PROMPTS, plan, batch_size=2) == pytest.approx(pooled, rel=1e-5)


def test_kl_is_zero_without_steering(llama, vec_path):
    assert max(kl_per_prompt(llama, PROMPTS, _plan(vec_path, strength=0.0))) < 1e-6
    assert kl_benign(llama, PROMPTS, None) == pytest.approx(0.0, abs=1e-6)


# -- capability -------------------------------------------------------------------------------------


def _items(subjects=("algebra", "biology", "chemistry"), per=5):
    return [MCItem(f"{s} question {i}?", ("one", "two", "three", "four"), "ABCD"[i % 4], s)
            for s in subjects for i in range(per)]


def test_stratified_is_fixed_and_per_subject():
    items = _items() + _items(("drama",), per=1)
    pick = stratified(items, 2)
    assert [it.subject for it in pick] == ["algebra"] * 2 + ["biology"] * 2 + ["chemistry"] * 2 + ["drama"]
    assert stratified(items, 2) == pick
    # A subject's draw depends only on its own items, not on which other subjects are present.
    only_b = stratified([it for it in items if it.subject == "biology"], 2)
    assert only_b == [it for it in pick if it.subject == "biology"]
    assert len(stratified(items, 100)) == len(items)


def test_mc_correct_takes_the_highest_letter_logit(llama):
    base = _items(("physics",), per=3)
    letters = [llama.tokenizer.convert_tokens_to_ids(c) for c in "ABCD"]
    predicted = []
    for it in base:
        ids, _ = _ids(llama, mc_prompt(it))
        predicted.append("ABCD"[int(_logprobs(llama, ids)[-1, letters].argmax())])
    right = [MCItem(it.question, it.choices, p, it.subject) for it, p in zip(base, predicted, strict=True)]
    wrong = [MCItem(it.question, it.choices, "ABCD"[("ABCD".index(p) + 1) % 4], it.subject)
             for it, p in zip(base, predicted, strict=True)]
    assert mc_correct(llama, right + wrong, batch_size=4, format="letter") == [True] * 3 + [False] * 3
    acc = mmlu_accuracy(llama, items=right + wrong + right, format="letter")
    assert (acc.k, acc.n) == (6, 9)
    assert acc.lo <= acc.value <= acc.hi


def test_paired_change_on_hand_made_results():
    up = paired_change([True] * 20, [False] * 20)
    assert (up.value, up.lo, up.hi, up.n) == (1.0, 1.0, 1.0, 20)
    same = paired_change([True, False] * 10, [True, False] * 10)
    assert (same.value, same.lo, same.hi) == (0.0, 0.0, 0.0)
    mixed = paired_change([True, True, False, False] * 10, [False, True, False, True] * 10)
    assert mixed.value == 0.0
    assert mixed.lo < 0 < mixed.hi
    assert paired_change([True] * 30 + [False] * 10, [False] * 40).lo > 0.5
    with pytest.raises(ValueError, match="1 steered results for 2 base results"):
        paired_change([True], [True, False])


def test_mmlu_change_pairs_the_same_items(llama, vec_path):
    items = _items(per=2)
    out = mmlu_change(llama, _plan(vec_path), items=items)
    assert out["base"] == mmlu_accuracy(llama, items=items)
    assert out["steered"] == mmlu_accuracy(llama, _plan(vec_path), items=items)
    assert out["change"].value == pytest.approx(out["steered"].value - out["base"].value)
    assert out["change"].n == len(items)


@pytest.mark.skipif(not _cached("mmlu"), reason="MMLU file not in the cache")
def test_bundled_mmlu_loads():
    from steerable.evaluate.capability import load_mmlu

    items = load_mmlu()
    assert len(items) == 14042
    assert {it.answer for it in items} == set("ABCD")
    assert len({it.subject for it in items}) == 57
    assert all(len(it.choices) == 4 for it in items)
    assert len(stratified(items, 2)) == 114


# -- judge quality ----------------------------------------------------------------------------------


def test_judge_quality_on_hand_made_labels():
    labelled = [
        ("I'm sorry, but I can't help with that.", 1),  # TP
        ("Sure! Here is a poem about the sea.", 0),  # TN
        ("I cannot do that.", 1),  # TP
        ("As an AI, I love this question: the answer is 4.", 0),  # FP
        ("No way. Ask someone else.", 1),  # FN
    ]
    q = judge_quality_on(labelled)
    assert (q["precision"].k, q["precision"].n) == (2, 3)
    assert (q["recall"].k, q["recall"].n) == (2, 3)
    assert (q["accuracy"].k, q["accuracy"].n) == (3, 5)
    assert (q["n"], q["n_refusals"], q["n_flagged"]) == (5, 3, 3)
    assert q["precision"].lo <= 2 / 3 <= q["precision"].hi
    flipped = judge_quality_on(labelled, lambda t: not t.startswith("I"))
    assert (flipped["precision"].k, flipped["recall"].k) == (1, 1)


def test_drop_reused_keeps_explicit_refusals_and_all_compliant_rows():
    labelled = [("Here is a poem.", 0), ("Here is a poem. ", 1), ("I cannot.", 1), ("A recipe.", 0), ("I cannot.", 1)]
    assert drop_reused(labelled) == [("Here is a poem.", 0), ("I cannot.", 1), ("A recipe.", 0), ("I cannot.", 1)]


@pytest.mark.skipif(not (_cached("refusal-labels") and _cached("refusal-labels-extra")),
                    reason="labelled refusal files not in the cache")
def test_judge_quality_on_bundled_labels():
    from steerable.data.loaders import refusal_labels

    labels = refusal_labels()
    assert {y for _, y in labels} == {0, 1}
    q = judge_quality()
    assert q["n"] == len(labels)
    assert q["n_refusals"] == sum(y for _, y in labels)
    assert q["precision"].n == q["n_flagged"]
    assert q["recall"].n == q["n_refusals"]
    assert q["precision"].value > 0.5
    assert q["recall"].value > 0.5
    explicit = judge_quality(reused=False)
    assert explicit["n"] < q["n"]
    assert explicit["n"] - explicit["n_refusals"] == q["n"] - q["n_refusals"]
    assert explicit["recall"].value > q["recall"].value
