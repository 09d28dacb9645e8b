"""The calibrated capability formats ("+cal"): leave-one-out letter-prior removal, label-free, per plan."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from steerable.data.loaders import Example
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.errors import SteerableError
from steerable.evaluate.capability import (
    DEFAULT_FORMAT,
    MCItem,
    calibrated,
    calibrated_by_plan,
    dev_items,
    mc_correct,
    mc_scores,
    mc_scores_formats,
    parse_format,
    predicted,
    split_calibration,
)
from steerable.models.load import ModelHandle
from tests.conftest import tiny_handle

EX = [Example(p, None, i % 2, i // 2) for i, p in enumerate(
    ["hurt someone", "hug someone", "rob a store", "open a store", "poison a well", "dig a well"])]


def _items(per: int = 4) -> list[MCItem]:
    return [MCItem(f"{s} question {i}: what is {i} + {len(s)}?", (f"{i}", f"{i + 1} or so", "none", f"{s}"),
                   "ABCD"[(i + len(s)) % 4], s) for s in ("algebra", "biology") for i in range(per)]


@pytest.fixture(scope="module")
def llama() -> ModelHandle:
    return tiny_handle("llama")


@pytest.fixture(scope="module")
def plan(llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ds = calibrate(llama, EX, position="last", progress=False)
    path = save_directions(ds, tmp_path_factory.mktemp("v") / "v.safetensors")
    return {"vector": str(path), "method": "add", "strength": 4.0, "layers": "1-2"}


def test_calibrated_subtracts_the_other_items_mean() -> None:
    scores = [[5.0, 1.0, 0.0, 0.0], [5.0, 0.0, 2.0, 0.0], [5.5, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 1.0]]
    arr = np.asarray(scores)
    want = [arr[i] - np.delete(arr, i, 0).mean(0) for i in range(len(arr))]
    assert np.allclose(calibrated(scores), want)
    assert predicted(scores) == ["A"] * 4
    assert predicted(calibrated(scores)) == ["B", "C", "A", "D"]


def test_calibrated_ignores_a_constant_shift_per_item_and_per_letter() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(12, 4))
    shifted = scores + rng.normal(size=(12, 1)) + np.array([[3.0, -1.0, 0.5, 2.0]])
    assert predicted(calibrated(shifted.tolist())) == predicted(calibrated(scores.tolist()))


def test_calibrated_leaves_a_single_item_alone() -> None:
    assert calibrated([[1.0, 2.0, 0.0, 0.0]]) == [[1.0, 2.0, 0.0, 0.0]]
    assert calibrated([]) == []


def test_split_and_parse_calibrated_names() -> None:
    assert split_calibration("cue+cal") == ("cue", True)
    assert split_calibration("letter-3shot+cal") == ("letter-3shot", True)
    assert split_calibration("cue") == ("cue", False)
    assert parse_format("cue-3shot+cal") == ("cue", 3)
    parse_format(DEFAULT_FORMAT)
    for bad in ("cue+cal+cal", "+cal", "cue+calx"):
        with pytest.raises(SteerableError, match="unknown capability format"):
            parse_format(bad)


@pytest.mark.parametrize("fmt", ["letter", "cue", "cue-1shot"])
def test_cal_format_is_calibrated_raw_scores(llama: ModelHandle, fmt: str) -> None:
    items = _items(3)
    pool = dev_items(items, 2)
    raw = mc_scores(llama, items, format=fmt, pool=pool, batch_size=4)
    cal = mc_scores(llama, items, format=f"{fmt}+cal", pool=pool, batch_size=4)
    assert torch.tensor(cal, dtype=torch.float64) == pytest.approx(torch.tensor(calibrated(raw)), abs=1e-6)
    together = mc_scores_formats(llama, items, [fmt, f"{fmt}+cal"], pool=pool, batch_size=4)
    assert torch.tensor(together[f"{fmt}+cal"]) == pytest.approx(torch.tensor(cal), abs=1e-4)
    ok = mc_correct(llama, items, format=f"{fmt}+cal", pool=pool, batch_size=4)
    assert ok == [p == it.answer for p, it in zip(predicted(cal), items, strict=True)]


def test_per_row_plans_are_calibrated_per_plan(llama: ModelHandle, plan: dict[str, Any]) -> None:
    items = _items(3)
    base = mc_scores(llama, items, format="cue+cal", batch_size=4)
    steered = mc_scores(llama, items, plan, format="cue+cal", batch_size=4)
    mixed = mc_scores(llama, items * 2, format="cue+cal", batch_size=4, plans=[None] * len(items) + [plan] * len(items))
    assert torch.tensor(mixed) == pytest.approx(torch.tensor(base + steered), abs=1e-4)


def test_calibrated_by_plan_groups_by_plan_object() -> None:
    a, b = {"x": 1}, {"x": 1}  # equal but distinct: two configurations
    scores = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 3.0, 0]]
    got = calibrated_by_plan(scores, [a, a, b, b])
    assert got == calibrated(scores[:2]) + calibrated(scores[2:])
    assert calibrated_by_plan(scores, None) == calibrated(scores)
