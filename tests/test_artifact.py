"""Artifacts round-trip, are written atomically, and reject mismatches and corrupt files."""

from __future__ import annotations

import pytest
import torch

from steerable.data.loaders import Example
from steerable.directions.artifact import load_directions, save_directions
from steerable.directions.calibrate import calibrate
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
    assert back.meta["estimator"] == "mean-diff" and back.meta["site"] == "resid_post"
    assert back.meta["format_version"] == 1


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_rejects_other_models(ds, family, tmp_path):
    path = save_directions(ds, tmp_path / "v.safetensors")
    with pytest.raises(SteerableError, match="mismatch"):
        load_directions(path, tiny_handle(family))


def test_rejects_other_hidden_size(ds, llama, tmp_path):
    ds.directions = torch.nn.functional.normalize(torch.randn(len(ds.layers), 16), dim=1)
    ds.mean_pos = ds.mean_neg = torch.zeros(len(ds.layers), 16)
    path = save_directions(ds, tmp_path / "v.safetensors")
    with pytest.raises(SteerableError, match="hidden size mismatch: direction set has d=16"):
        load_directions(path, llama)


def test_rejects_layer_count_and_hash(ds, llama, tmp_path):
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

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(art, "save_file", boom)
    with pytest.raises(OSError):
        save_directions(ds, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temp file left behind
