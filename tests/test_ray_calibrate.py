"""Calibration on a real local Ray cluster: the examples sharded over actors, their statistics merged, give the
single-process artifact (to 1e-5, its timestamp aside), also when an actor dies holding statistics."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from steerable.cli.main import main
from steerable.data.loaders import Example
from steerable.directions.artifact import DirectionSet, load_directions
from steerable.directions.calibrate import calibrate
from steerable.models.load import load_model
from steerable.scale.ray_env import WorkerOptions
from tests.conftest import tiny_handle

WORDS = ["lock", "cake", "weapon", "tree", "car", "poem", "bank", "piano", "poison", "wall", "money", "bike",
         "door", "song", "virus", "garden", "phone", "letter", "drug", "river"]
EX = [Example(f"please tell me how to {w}" + " now" * (i % 4), None, i % 2, i // 2) for i, w in enumerate(WORDS * 2)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray", reason="Ray is the optional extra steerable[ray] (pip install 'steerable[ray]')")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("raycal") / "model"
    h = tiny_handle("qwen2")
    h.model.save_pretrained(d)
    h.tokenizer.save_pretrained(d)
    return str(d)


def _single(model: str, **kw: Any) -> DirectionSet:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor runs
    try:
        return calibrate(load_model(model), EX, batch_size=4, progress=False, **kw)
    finally:
        torch.set_num_threads(threads)


def _assert_same(a: DirectionSet, b: DirectionSet) -> None:
    assert a.layers == b.layers
    for name in ("directions", "raw_norms", "scales", "bias", "mean_pos", "mean_neg", "percentiles", "auroc",
                 "cohens_d", "mean_unit_pos", "mean_unit_neg", "cast_percentiles", "projection_percentiles"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)
    assert {**a.meta, "created": None} == {**b.meta, "created": None}


def test_sharded_calibration_equals_one_process_also_when_an_actor_dies(cluster: Any, model: str) -> None:
    from steerable.scale.ray_calibrate import calibrate_ray

    dispatched: list[int] = []

    def kill(chunk: int, actor: Any) -> None:
        dispatched.append(chunk)
        if len(dispatched) == 4:  # that actor holds the statistics of an earlier chunk by now
            cluster.kill(actor)

    kw: dict[str, Any] = {"estimator": "pca", "position": "all", "layers": [1, 2, 3]}
    ds = calibrate_ray(model, EX, batch_size=4, options=WorkerOptions(workers=2), progress=False,
                       on_dispatch=kill, **kw)
    _assert_same(ds, _single(model, **kw))
    assert len(dispatched) > 8  # 8 chunks (2 workers × 4), and those the dead actor held ran again
    assert ds.meta["counts"]["heldout_pos"] > 0


@pytest.mark.usefixtures("cluster")
def test_cli_calibrate_on_ray_writes_the_single_process_artifact(model: str, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"prompt": "how to {w}?", "positive": "No, never {w}.", "negative": "Sure: {w}."}}\n'
                             for w in WORDS))
    common = ["calibrate", "--model", model, "--pairs", str(pairs), "--position", "response-mean", "--layers", "1-3",
              "--batch-size", "6"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*common, "--out", str(tmp_path / "one.safetensors")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main([*common, "--out", str(tmp_path / "ray.safetensors"), "--ray", "auto", "--workers", "2"]) == 0
    _assert_same(load_directions(tmp_path / "ray.safetensors"), load_directions(tmp_path / "one.safetensors"))
