"""load_model: offline without touching os.environ, transformers quiet only while loading, typed errors."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

from steerable.errors import ArtifactError, SteerableError
from steerable.models import load as load_mod
from steerable.models.load import from_model, load_model, quiet_transformers
from tests.conftest import tiny_handle


def _hub_bar_states() -> dict[str, bool]:
    import sys

    return dict(sys.modules["huggingface_hub.utils.tqdm"].progress_bar_states)


@pytest.fixture
def loud_transformers() -> Iterator[None]:
    """transformers at INFO with progress bars on (not what conftest sets), restored afterwards."""
    root = logging.getLogger("transformers")
    level, bars = root.level, hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    yield
    root.setLevel(level)
    if bars:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def _settings() -> tuple[dict[str, str], int, int, bool, dict[str, bool]]:
    return (dict(os.environ), logging.getLogger("transformers").level, hf_logging.get_verbosity(),
            hf_logging.is_progress_bar_enabled(), _hub_bar_states())


@pytest.mark.usefixtures("loud_transformers")
def test_load_model_changes_no_process_wide_setting(model_dir: str) -> None:
    before = _settings()
    handle = load_model(model_dir)
    assert handle.n_layers == 4
    assert _settings() == before
    assert hf_logging.get_verbosity() == logging.INFO
    assert hf_logging.is_progress_bar_enabled()


def test_load_model_keeps_quiet_settings_too(model_dir: str) -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    before = _settings()
    load_model(model_dir)
    assert _settings() == before


@pytest.mark.usefixtures("loud_transformers")
def test_from_model_changes_no_process_wide_setting() -> None:
    h = tiny_handle("qwen2")
    before = _settings()
    wrapped = from_model(h.model, h.tokenizer, name="x")
    assert wrapped.n_layers == h.n_layers
    assert _settings() == before


def test_load_model_does_not_set_hf_hub_offline(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_model(model_dir)
    assert "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.usefixtures("loud_transformers")
def test_quiet_transformers_is_quiet_inside_and_restores_on_error() -> None:
    before = _settings()
    inside: list[tuple[int, bool]] = []

    def load() -> None:
        with quiet_transformers():
            inside.append((hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        load()
    assert inside == [(logging.ERROR, False)]
    assert _settings() == before


def test_missing_directory_raises_typed_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ArtifactError, match="unknown model") as err:
        load_model(str(missing))
    assert str(missing) in str(err.value)
    assert isinstance(err.value, SteerableError)


@pytest.mark.usefixtures("loud_transformers")
def test_garbage_directory_raises_typed_error_and_restores_settings(tmp_path: Path) -> None:
    bad = tmp_path / "garbage"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json", encoding="utf-8")
    before = _settings()
    with pytest.raises(ArtifactError, match="cannot load model from") as err:
        load_model(str(bad))
    assert str(bad) in str(err.value)
    assert _settings() == before


def test_config_without_weights_raises_typed_error(model_dir: str) -> None:
    for f in Path(model_dir).glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ArtifactError, match="cannot load model from") as err:
        load_model(model_dir)
    assert model_dir in str(err.value)


def test_dequantising_is_logged_not_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    h = tiny_handle("llama")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def fake_load(path: str | Path, dtype: torch.dtype, **kw: object) -> tuple[object, object]:
        assert Path(path) == tmp_path
        assert dtype == torch.float32
        assert kw == {"gguf_file": "m.gguf"}
        return h.model, h.tokenizer

    monkeypatch.setattr(load_mod, "_load_hf", fake_load)
    with caplog.at_level(logging.INFO, logger="steerable"):
        out = load_mod._cache_gguf_as_f32(gguf, tmp_path / "cache" / "m-f32")
    assert (out / "config.json").exists()
    assert [r.getMessage() for r in caplog.records if r.name == "steerable.models.load"] == [
        "dequantising m.gguf to a float32 cache (once) …"
    ]
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out == ""


@pytest.mark.usefixtures("loud_transformers")
def test_cli_shows_library_info_lines_on_stderr_and_restores_logging(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    from steerable.cli import main as cli

    inside: list[tuple[int, bool]] = []

    def fake_command(_args: argparse.Namespace) -> int:
        inside.append((hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()))
        logging.getLogger("steerable.models.load").info("dequantising %s (once) …", "m.gguf")
        logging.getLogger("steerable.models.load").debug("not shown")
        return 0

    def parser() -> argparse.ArgumentParser:
        ap = argparse.ArgumentParser()
        ap.set_defaults(fn=fake_command)
        return ap

    monkeypatch.setattr(cli, "build_parser", parser)
    lib = logging.getLogger("steerable")
    handlers, level = list(lib.handlers), lib.level
    before = _settings()
    assert cli.main([]) == 0
    captured = capsys.readouterr()
    assert captured.err == "steerable: dequantising m.gguf (once) …\n"
    assert captured.out == ""
    assert lib.handlers == handlers
    assert lib.level == level
    # the CLI keeps transformers quiet while a command runs (as loading a model used to for the whole process)
    assert inside == [(logging.ERROR, False)]
    assert _settings() == before


def test_importing_steerable_configures_no_logging() -> None:
    import subprocess
    import sys

    code = ("import logging, steerable, steerable.models.load, steerable.cli.main; "
            "print(len(logging.getLogger('steerable').handlers), len(logging.getLogger().handlers), "
            "logging.getLogger('steerable').level)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["0", "0", "0"]
