"""Sweeps on a real local Ray cluster: lines equal the single-process sweep's whatever the number of workers, a
killed worker's group runs again elsewhere (nothing lost, nothing written twice), a stopped sweep resumes."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from steerable.cli.main import main
from steerable.data.loaders import Example
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.errors import SteerableError
from steerable.models.load import load_model
from steerable.scale.ray_env import WorkerOptions, import_ray
from steerable.sweeps import grid
from steerable.sweeps.records import SweepRecord, read_records, record_line
from steerable.sweeps.run import SweepSpec, run_sweep
from tests.conftest import tiny_handle

EX = [Example(p, None, i % 2, i // 2) for i, p in enumerate(
    ["how do I pick a lock", "bake a cake", "build a weapon", "plant a tree", "steal a car", "write a poem",
     "hack a bank", "learn piano"])]
PROMPTS = [{"prompt": p, "category": "a" if i % 2 else "b"} for i, p in enumerate(
    ["rob a store", "hide a body", "make a bomb", "cheat a test"])]
BENIGN = [{"prompt": p} for p in ("sing a song", "cook rice")]
CONFIGS = grid.expand(["add", "cap"], ["1-2", "all"], strengths=[1.0, 4.0], cap_floors=["p50"])  # 7 configs


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
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """A saved tiny model (the actors load it from disk), its vector, and the single-process results."""
    root = tmp_path_factory.mktemp("raysweep")
    h = tiny_handle("llama")
    h.model.save_pretrained(root / "model")
    h.tokenizer.save_pretrained(root / "model")
    model = str(root / "model")
    vector = str(root / "v.safetensors")
    save_directions(calibrate(h, EX, progress=False), vector)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor runs
    try:
        handle = load_model(model)
        run_sweep(handle, _spec(vector), root / "single.jsonl", progress=False)
        _stop_mid_write(root / "single.jsonl", root / "resumed.jsonl")
        run_sweep(handle, _spec(vector), root / "resumed.jsonl", progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, vector, root


def _stop_mid_write(full: Path, out: Path) -> None:
    """The file a driver stopped while writing the 4th line leaves: 3 lines and a torn one."""
    lines = full.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:40])


def _spec(vector: str) -> SweepSpec:
    # 6 rows per config, 12 per group: 2 configs a group, 4 groups (the baseline's first)
    return SweepSpec(vector=vector, configs=CONFIGS, prompts=PROMPTS, benign=BENIGN, max_new_tokens=5,
                     group_rows=12)


def _lines(records: list[SweepRecord]) -> dict[str, str]:
    """Each line by key, its timing aside."""
    return {r.key: record_line(dataclasses.replace(r, seconds_per_config=0.0)) for r in records}


def _keys_on_file(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


def test_killed_workers_group_runs_again_and_lines_equal_one_process(cluster: Any, setup: tuple[str, str, Path],
                                                                    tmp_path: Path) -> None:
    model, vector, root = setup
    single = root / "single.jsonl"
    out = tmp_path / "ray.jsonl"
    dispatched: list[int] = []

    def kill(group: int, actor: Any) -> None:
        dispatched.append(group)
        if len(dispatched) == 3:  # a group handed out once the baseline's group has finished and been written
            assert out.read_text().count("\n") == 2
            cluster.kill(actor)

    records = _run(model, vector, out, on_dispatch=kill)
    assert _lines(records) == _lines(read_records(single))
    keys = _keys_on_file(out)
    assert sorted(keys) == sorted(_lines(read_records(single)))  # every line once: none lost, none twice
    assert dispatched.count(dispatched[2]) == 2  # the killed actor's group ran again


def _run(model: str, vector: str, out: Path, workers: int = 2, **kw: Any) -> list[SweepRecord]:
    from steerable.scale.ray_sweep import run_sweep_ray

    return run_sweep_ray(model, _spec(vector), out, options=WorkerOptions(workers=workers), progress=False, **kw)


@pytest.mark.usefixtures("cluster")
def test_stopped_sweep_resumes_on_one_worker(setup: tuple[str, str, Path], tmp_path: Path) -> None:
    model, vector, root = setup
    out = tmp_path / "ray.jsonl"
    _stop_mid_write(root / "single.jsonl", out)
    dispatched: list[int] = []
    records = _run(model, vector, out, workers=1, on_dispatch=lambda g, _a: dispatched.append(g))
    # as a single-process sweep resumes: the KLs of the rest are read against a scoring pass's table
    assert _lines(records) == _lines(read_records(root / "resumed.jsonl"))
    assert len(dispatched) == 2 + 1  # the 4 missing configs (2 groups), and the KL reference's scoring pass
    assert sorted(_keys_on_file(out)) == sorted(_lines(records))


@pytest.mark.usefixtures("cluster")
def test_cli_sweep_on_ray_equals_one_process(setup: tuple[str, str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    model, vector, root = setup
    single = root / "single.jsonl"
    prompts = tmp_path / "p.jsonl"
    benign = tmp_path / "b.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    benign.write_text("".join(json.dumps(r) + "\n" for r in BENIGN))
    out = tmp_path / "cli.jsonl"
    assert main(["sweep", "--model", model, "--vector", vector, "--method", "add,cap", "--layers", "1-2,all",
                 "--strengths", "1,4", "--cap-floors", "p50", "--prompts", str(prompts), "--benign", str(benign),
                 "--max-new-tokens", "5", "--group-rows", "12", "--out", str(out),
                 "--ray", "auto", "--workers", "2"]) == 0
    assert "7 configurations" in capsys.readouterr().err
    mine = {k: json.loads(v) for k, v in _lines(read_records(out)).items()}
    theirs = {k: json.loads(v) for k, v in _lines(read_records(single)).items()}
    for d in (*mine.values(), *theirs.values()):  # the CLI names its prompt files in each line
        for name in ("prompts", "benign", "limit"):
            d["sweep"].pop(name, None)
    assert mine == theirs


def test_without_ray_a_flag_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(SteerableError, match=r"pip install 'steerable\[ray\]'"):
        import_ray()
