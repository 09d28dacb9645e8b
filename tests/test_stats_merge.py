"""Streaming statistics merge exactly: shards merged equal one pass, whatever the sharding and order."""

from __future__ import annotations

import itertools

import pytest
import torch

from steerable.capture.run import batch_examples, capture_batches, capture_stats
from steerable.capture.stats import LayerStats, Reservoir
from steerable.data.loaders import Example
from steerable.errors import SteerableError
from tests.conftest import tiny_handle


def _assert_same(a: LayerStats, b: LayerStats) -> None:
    for x, y in ((a.pos, b.pos), (a.neg, b.neg)):
        assert x.n == y.n
        torch.testing.assert_close(x.total, y.total, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.unit_total, y.unit_total, rtol=1e-12, atol=1e-12)
        if x.outer is not None:
            torch.testing.assert_close(x.outer, y.outer, rtol=1e-12, atol=1e-10)
        assert x.sample.seen == y.sample.seen
        assert torch.equal(x.sample.keys, y.sample.keys)
        assert torch.equal(x.sample.rows, y.sample.rows)
    for r, s in ((a.heldout_pos, b.heldout_pos), (a.heldout_neg, b.heldout_neg)):
        assert r.seen == s.seen
        assert torch.equal(r.keys, s.keys)
        assert torch.equal(r.rows, s.rows)
    assert a.n_pairs == b.n_pairs
    torch.testing.assert_close(a.diff_total, b.diff_total, rtol=1e-12, atol=1e-12)
    if a.diff_outer is not None:
        torch.testing.assert_close(a.diff_outer, b.diff_outer, rtol=1e-12, atol=1e-10)


def _stream(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    label = torch.randint(0, 2, (n,), generator=g)
    heldout = torch.rand(n, generator=g) < 0.2
    return x, label, heldout, torch.randperm(n, generator=g) * 7 + 3  # unique keys, not in stream order


@pytest.mark.parametrize("moments", [False, True])
@pytest.mark.parametrize("cuts", [(), (1,), (50, 51, 300), (120, 240, 360)])
def test_merge_of_shards_equals_one_pass(moments: bool, cuts: tuple[int, ...]) -> None:
    # caps below the class sizes: the reservoirs overflow, so which rows they keep is tested too
    x, label, heldout, keys = _stream(480, 6, seed=len(cuts))
    one = LayerStats(6, moments, reservoir_cap=40, heldout_cap=15, seed=3)
    one.add(x, label, heldout, keys)
    one.add_pair_diffs(x[:100] - x[100:200])
    bounds = [0, *cuts, len(x)]
    shards = []
    for lo, hi in itertools.pairwise(bounds):
        st = LayerStats(6, moments, reservoir_cap=40, heldout_cap=15, seed=3)
        for a in range(lo, hi, 37):  # several adds per shard, as batches arrive
            b = min(hi, a + 37)
            st.add(x[a:b], label[a:b], heldout[a:b], keys[a:b])
        shards.append(st)
    for lo, hi in ((0, 30), (30, 100)):
        shards[-1].add_pair_diffs(x[lo:hi] - x[100 + lo : 100 + hi])
    merged = LayerStats(6, moments, reservoir_cap=40, heldout_cap=15, seed=3)
    for st in reversed(shards):  # merge order does not matter either
        merged.merge(st)
    _assert_same(merged, one)
    assert len(one.pos.sample.rows) == 40
    assert one.pos.sample.seen > 40


def test_reservoir_is_uniformish_and_keeps_a_short_stream_whole() -> None:
    r = Reservoir(cap=500, d=1, seed=0)
    r.add(torch.arange(5000.0)[:, None], torch.arange(5000))
    assert len(r.rows) == 500
    assert r.seen == 5000
    assert 2000 < float(r.rows.mean()) < 3000  # a uniform sample's mean is near 2500
    small = Reservoir(cap=10, d=2)
    x = torch.randn(7, 2)
    small.add(x[:3])
    small.add(x[3:])
    assert torch.equal(small.rows, x)  # without keys: arrival order, kept whole


def test_merge_refuses_different_settings() -> None:
    with pytest.raises(SteerableError, match="reservoir_cap"):
        LayerStats(4, reservoir_cap=8).merge(LayerStats(4, reservoir_cap=9))
    with pytest.raises(SteerableError, match="seed"):
        Reservoir(4, 2, seed=0).merge(Reservoir(4, 2, seed=1))


@pytest.mark.parametrize("position", ["last", "all"])
def test_captured_shards_merge_to_the_single_pass(position: str) -> None:
    handle = tiny_handle("llama")
    words = ["lock", "cake", "weapon", "tree", "car", "poem", "bank", "piano", "poison", "wall", "money", "bike"]
    examples = [Example(f"how to {w} " * (1 + i % 3), None, i % 2, i // 2) for i, w in enumerate(words * 2)]
    kw = {"site": "resid_post", "position": position, "second_moments": True, "reservoir_cap": 9, "progress": False}
    one = capture_stats(handle, examples, [1, 3], batch_size=4, **kw)  # type: ignore[arg-type]
    batches = batch_examples(examples, 4)
    parts = [capture_batches(handle, batches[i::3], [1, 3], **kw) for i in range(3)]  # type: ignore[arg-type]
    assert sum(p.n_examples for p in parts) == one.n_examples
    for layer in (1, 3):
        merged = parts[0].stats[layer]
        for p in parts[1:]:
            merged.merge(p.stats[layer])
        _assert_same(merged, one.stats[layer])
