"""Capability formats (letter, cue, choice-loglik, few-shot) on tiny random models: one result per item,
the prompts they build, batching and per-row plans leave results unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from steerable.data.loaders import Example
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.errors import SteerableError
from steerable.evaluate.capability import (
    CUE,
    LETTERS,
    MCItem,
    debiased,
    dev_items,
    format_prompt,
    mc_correct,
    mc_correct_formats,
    mc_prompt,
    mc_scores,
    mc_scores_formats,
    mmlu_accuracy,
    parse_format,
    predicted,
    question_prompt,
    shots_for,
)
from steerable.models.load import ModelHandle
from tests.conftest import tiny_handle

FORMATS = ["letter", "cue", "choice-loglik", "letter-2shot", "cue-2shot", "choice-loglik-1shot"]
EX = [Example(p, None, i % 2, i // 2) for i, p in enumerate(
    ["hurt someone", "hug someone", "rob a store", "open a store", "poison a well", "dig a well"])]


def _items(subjects: tuple[str, ...] = ("algebra", "biology"), per: int = 4) -> list[MCItem]:
    return [MCItem(f"{s} question {i}: what is {i} + {len(s)}?", (f"{i}", f"{i + 1} or so", "none", f"{s}"),
                   "ABCD"[(i + len(s)) % 4], s) for s in subjects for i in range(per)]


@pytest.fixture(scope="module")
def llama() -> ModelHandle:
    return tiny_handle("llama")


@pytest.fixture(scope="module")
def vec_path(llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory) -> str:
    ds = calibrate(llama, EX, position="last", progress=False)
    return str(save_directions(ds, tmp_path_factory.mktemp("v") / "v.safetensors"))


def _plan(vec_path: str, strength: float = 4.0) -> dict[str, Any]:
    return {"vector": vec_path, "method": "add", "strength": strength, "layers": "1-2"}


def _last_logprobs(handle: ModelHandle, prompt: str, tail: str = "") -> torch.Tensor:
    ids = handle.encode([handle.render(prompt)])["input_ids"][0].tolist()
    ids += handle.tokenizer.encode(tail, add_special_tokens=False)
    with torch.inference_mode():
        return handle.model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_gives_one_bool_per_item(llama: ModelHandle, fmt: str) -> None:
    items = _items()
    pool = dev_items(items, 3)
    out = mc_correct(llama, items, format=fmt, pool=pool, batch_size=4)
    assert len(out) == len(items)
    assert all(isinstance(c, bool) for c in out)
    scores = mc_scores(llama, items, format=fmt, pool=pool, batch_size=4)
    assert [len(s) for s in scores] == [4] * len(items)
    assert all(s == s and s > float("-inf") for row in scores for s in row)  # finite, not NaN


@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_size_does_not_change_results(llama: ModelHandle, fmt: str) -> None:
    items = _items(per=5)
    pool = dev_items(items, 3)
    one = mc_scores(llama, items, format=fmt, pool=pool, batch_size=1)
    eight = mc_scores(llama, items, format=fmt, pool=pool, batch_size=8)
    assert torch.tensor(one) == pytest.approx(torch.tensor(eight), abs=1e-4)
    assert (mc_correct(llama, items, format=fmt, pool=pool, batch_size=1)
            == mc_correct(llama, items, format=fmt, pool=pool, batch_size=8))


def test_cue_reads_the_letter_after_the_cue(llama: ModelHandle) -> None:
    items = _items(("physics",), per=3)
    letters = [llama.tokenizer.convert_tokens_to_ids(c) for c in LETTERS]
    want = [_last_logprobs(llama, mc_prompt(it), CUE)[letters].tolist() for it in items]
    assert torch.tensor(mc_scores(llama, items, format="cue")) == pytest.approx(torch.tensor(want), abs=1e-4)
    # letter reads the reply's first position instead
    first = [_last_logprobs(llama, mc_prompt(it))[letters].tolist() for it in items]
    assert torch.tensor(mc_scores(llama, items, format="letter")) == pytest.approx(torch.tensor(first), abs=1e-4)


def test_choice_loglik_is_the_mean_choice_log_likelihood(llama: ModelHandle) -> None:
    (it,) = _items(("physics",), per=1)
    tok = llama.tokenizer
    prompt = llama.encode([llama.render(question_prompt(it))])["input_ids"][0].tolist()
    want = []
    for choice in it.choices:
        tail = tok.encode(choice, add_special_tokens=False)
        with torch.inference_mode():
            lp = llama.model(input_ids=torch.tensor([prompt + tail])).logits[0].float().log_softmax(-1)
        want.append(float(sum(lp[len(prompt) - 1 + j, t] for j, t in enumerate(tail)) / len(tail)))
    assert mc_scores(llama, [it], format="choice-loglik")[0] == pytest.approx(want, abs=1e-4)


def test_cue_and_few_shot_prompts_contain_what_they_should(llama: ModelHandle) -> None:
    items = _items(("algebra", "biology"), per=4)
    pool = dev_items(items, 3)
    it = pool["algebra"][0]
    shots = shots_for(it, 2, pool)
    assert it not in shots
    assert [s.subject for s in shots] == ["algebra", "algebra"]
    msgs = format_prompt(it, "cue-2shot", pool)
    assert isinstance(msgs, list)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"] == mc_prompt(shots[0])
    assert msgs[1]["content"] == f"{CUE}{shots[0].answer})"
    assert msgs[-1]["content"] == mc_prompt(it)
    letter = format_prompt(it, "letter-2shot", pool)
    assert isinstance(letter, list)
    assert [m["content"] for m in letter][1::2] == [s.answer for s in shots]
    loglik = format_prompt(it, "choice-loglik-1shot", pool)
    assert isinstance(loglik, list)
    assert loglik[1]["content"] == shots[0].choices[LETTERS.index(shots[0].answer)]
    assert "A. " not in loglik[-1]["content"]
    # the few-shot turns reach the rendered text; the cue is the reply's opening, not part of the prompt
    text = llama.render(msgs)
    assert shots[0].question in text
    assert f"{CUE}{shots[0].answer})" in text
    assert not text.endswith(CUE)
    assert format_prompt(it, "cue", pool) == mc_prompt(it)
    # a subject with too few dev items borrows other subjects' dev items
    assert len(shots_for(it, 5, pool)) == 5


def test_parse_format() -> None:
    assert parse_format("cue") == ("cue", 0)
    assert parse_format("cue-3shot") == ("cue", 3)
    assert parse_format("choice-loglik-5shot") == ("choice-loglik", 5)
    for bad in ("Cue", "guess", "cue-shot", "letter-3shots"):
        with pytest.raises(SteerableError, match="unknown capability format"):
            parse_format(bad)


@pytest.mark.parametrize("fmt", ["letter", "cue", "choice-loglik", "cue-1shot"])
def test_per_row_plans_match_separate_runs(llama: ModelHandle, vec_path: str, fmt: str) -> None:
    items = _items(per=3)
    pool = dev_items(items, 2)
    plan = _plan(vec_path)
    alone = mc_scores(llama, items, plan, format=fmt, pool=pool, batch_size=4)
    base = mc_scores(llama, items, format=fmt, pool=pool, batch_size=4)
    assert alone != base  # the plan moves the scores
    rows = [plan if i % 2 else None for i in range(len(items))]
    mixed = mc_scores(llama, items, format=fmt, pool=pool, batch_size=4, plans=rows)
    want = [alone[i] if i % 2 else base[i] for i in range(len(items))]
    assert torch.tensor(mixed) == pytest.approx(torch.tensor(want), abs=1e-4)


def test_formats_at_once_equal_one_by_one(llama: ModelHandle) -> None:
    items = _items(per=3)
    pool = dev_items(items, 2)
    fmts = ["cue", "letter", "choice-loglik", "letter-1shot", "cue-1shot"]
    together = mc_correct_formats(llama, items, fmts, pool=pool, batch_size=4)
    assert list(together) == fmts
    for f in fmts:
        assert together[f] == mc_correct(llama, items, format=f, pool=pool, batch_size=4)


def test_mmlu_accuracy_takes_a_format(llama: ModelHandle) -> None:
    items = _items(per=2)
    acc = mmlu_accuracy(llama, items=items, format="cue")
    assert acc.k == sum(mc_correct(llama, items, format="cue"))
    assert acc.n == len(items)


def test_debiased_removes_a_constant_letter_preference() -> None:
    scores = [[5.0, 1.0, 0.0, 0.0], [5.0, 0.0, 2.0, 0.0], [5.5, 0.0, 0.0, 0.0]]
    assert predicted(scores) == ["A", "A", "A"]
    assert predicted(debiased(scores)) == ["B", "C", "A"]


def test_scores_formats_match_mc_scores(llama: ModelHandle) -> None:
    items = _items(per=2)
    together = mc_scores_formats(llama, items, ["letter", "cue"], batch_size=4)
    for f in ("letter", "cue"):
        assert torch.tensor(together[f]) == pytest.approx(torch.tensor(mc_scores(llama, items, format=f)), abs=1e-4)
