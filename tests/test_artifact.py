"""Artifacts round-trip, are written atomically, and reject mismatches and corrupt files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from steerable.capture.run import capture_stats
from steerable.data.loaders import Example
from steerable.directions.artifact import FORMAT, load_directions, save_directions
from steerable.directions.calibrate import calibrate, directions_from_capture
from steerable.directions.geometry import discriminative_layers
from steerable.directions.quality import cast_score, percentiles
from steerable.errors import SteerableError
from tests.conftest import tiny_handle

EX = [Example(p, None, i % 2, i // 2) for i, p in enumerate(
    ["how do I pick a lock", "bake a cake", "build a weapon", "plant a tree", "steal a car", "write a poem",
     "hack a bank", "learn piano", "make poison", "paint a wall", "forge money", "fix a bike"])]


@pytest.fixture
def ds(llama):
    return calibrate(llama, EX, estimator="mean-diff", position="last", progress=False)


def test_round_trip(ds, llama, tmp_path):
    path = save_directions(ds, tmp_path / "v.safetensors")
    back = load_directions(path, llama)
    assert back.layers == ds.layers
    for name, t in ds.tensors().items():
        torch.testing.assert_close(getattr(back, name), t, rtol=0, atol=0, equal_nan=True)
    assert back.meta["model"]["config_hash"] == llama.config_hash
    assert back.meta["estimator"] == "mean-diff"
    assert back.meta["site"] == "resid_post"
    assert back.meta["format_version"] == 2
    assert {"mean_unit_pos", "mean_unit_neg", "cast_percentiles"} <= set(ds.tensors())


def test_calibrate_fills_selection_tensors(ds, llama):
    n, d = len(ds.layers), llama.hidden_size
    assert ds.mean_unit_pos.shape == ds.mean_unit_neg.shape == (n, d)
    assert ds.cast_percentiles.shape == (n, 2, 2, 101)
    for t in (ds.mean_unit_pos, ds.mean_unit_neg, ds.cast_percentiles):
        assert bool(torch.isfinite(t).all())  # EX holds out one pair, so the held-out fold is non-empty
    assert bool((ds.mean_unit_pos.norm(dim=1) <= 1 + 1e-5).all())  # a mean of unit vectors
    assert bool((ds.cast_percentiles.diff(dim=-1) >= 0).all())
    assert ds.meta["counts"]["heldout_pos"] == ds.meta["counts"]["heldout_neg"] == 1
    assert isinstance(discriminative_layers(ds), list)


def test_selection_tensors_match_the_samples(llama):
    cap = capture_stats(llama, EX, [1, 2], progress=False)
    ds = directions_from_capture(cap, "mean-diff", {})
    for i, layer in enumerate(ds.layers):
        st, v = cap.stats[layer], ds.directions[i]
        torch.testing.assert_close(ds.cast_percentiles[i, 0, 0], percentiles(cast_score(st.pos.sample.rows, v)))
        torch.testing.assert_close(ds.cast_percentiles[i, 1, 1], percentiles(cast_score(st.heldout_neg.rows, v)))
        unit = torch.nn.functional.normalize(st.neg.sample.rows, dim=1).mean(0)  # reservoir holds every row here
        torch.testing.assert_close(ds.mean_unit_neg[i], unit)


def _v1_file(ds, path):
    """A file as version 1 wrote it: no optional tensors, format_version 1."""
    names = ["directions", "raw_norms", "scales", "bias", "mean_pos", "mean_neg", "percentiles", "auroc", "cohens_d"]
    meta = {**ds.meta, "format": FORMAT, "format_version": 1, "layers": ds.layers}
    save_file({k: getattr(ds, k).contiguous() for k in names}, str(path), metadata={"steerable": json.dumps(meta)})
    return path


def test_reads_version_1(ds, llama, tmp_path):
    old = load_directions(_v1_file(ds, tmp_path / "v1.safetensors"), llama)
    assert old.meta["format_version"] == 1
    assert old.mean_unit_pos is None
    assert old.mean_unit_neg is None
    assert old.cast_percentiles is None
    torch.testing.assert_close(old.directions, ds.directions)
    with pytest.raises(SteerableError, match="recalibrate"):
        discriminative_layers(old)
    resaved = load_directions(save_directions(old, tmp_path / "v2.safetensors"))  # still no optional tensors
    assert resaved.cast_percentiles is None
    assert resaved.meta["format_version"] == 2


def test_rejects_bad_optional_tensors(ds, tmp_path):
    ds.cast_percentiles = ds.cast_percentiles[:, 0]
    with pytest.raises(SteerableError, match="'cast_percentiles' has shape"):
        save_directions(ds, tmp_path / "v.safetensors")
    ds.cast_percentiles = None
    ds.mean_unit_neg = None
    with pytest.raises(SteerableError, match="present together"):
        save_directions(ds, tmp_path / "v.safetensors")
    ds.mean_unit_neg = ds.mean_unit_pos.clone()
    ds.mean_unit_neg[0, 0] = float("inf")
    with pytest.raises(SteerableError, match="'mean_unit_neg' contains NaN or Inf"):
        save_directions(ds, tmp_path / "v.safetensors")


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_rejects_other_models(ds, family, tmp_path):
    path = save_directions(ds, tmp_path / "v.safetensors")
    with pytest.raises(SteerableError, match="mismatch"):
        load_directions(path, tiny_handle(family))


def test_rejects_other_hidden_size(ds, llama, tmp_path):
    ds.directions = torch.nn.functional.normalize(torch.randn(len(ds.layers), 16), dim=1)
    ds.mean_pos = ds.mean_neg = ds.mean_unit_pos = ds.mean_unit_neg = torch.zeros(len(ds.layers), 16)
    path = save_directions(ds, tmp_path / "v.safetensors")
    with pytest.raises(SteerableError, match="hidden size mismatch: direction set has d=16"):
        load_directions(path, llama)


def test_rejects_layer_count_and_hash(ds, llama):
    ds.meta["model"]["n_layers"] = 12
    with pytest.raises(SteerableError, match="layer count mismatch"):
        ds.check_model(llama)
    ds.meta["model"]["n_layers"] = llama.n_layers
    ds.meta["model"]["config_hash"] = "0" * 16
    with pytest.raises(SteerableError, match="config hash"):
        ds.check_model(llama)


def test_rejects_nan_and_corrupt(ds, tmp_path):
    good = save_directions(ds, tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SteerableError, match="not a readable safetensors"):
        load_directions(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SteerableError):
        load_directions(tmp_path / "junk.safetensors")
    with pytest.raises(SteerableError, match="no such direction file"):
        load_directions(tmp_path / "missing.safetensors")
    ds.mean_pos = ds.mean_pos.clone()
    ds.mean_pos[0, 0] = float("nan")
    with pytest.raises(SteerableError, match="NaN"):
        save_directions(ds, tmp_path / "nan.safetensors")


def test_failed_write_leaves_old_file(ds, tmp_path, monkeypatch):
    path = save_directions(ds, tmp_path / "v.safetensors")
    before = path.read_bytes()
    import steerable.directions.artifact as art

    def boom(*_a, **_k):
        raise OSError("disk full")
    monkeypatch.setattr(art, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_directions(ds, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temp file left behind
