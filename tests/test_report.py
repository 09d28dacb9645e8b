"""sweep → report → tune through the CLI on a tiny model, and the report rendered in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import pytest
from PIL import Image

from steerable.cli.main import main
from tests.test_cli import _jsonl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
Swept = tuple[str, str, str, str, Path, list[str]]  # model dir, vector, prompts, benign, results, sweep arguments


@pytest.fixture
def swept(model_dir: str, tmp_path: Path) -> Swept:
    pos = _jsonl(tmp_path / "pos.jsonl", [{"prompt": f"do harm {i}"} for i in range(6)])
    neg = _jsonl(tmp_path / "neg.jsonl", [{"prompt": f"be kind {i}"} for i in range(6)])
    vec = str(tmp_path / "v.safetensors")
    assert main(["calibrate", "--model", model_dir, "--positive", pos, "--negative", neg, "--out", vec]) == 0
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"hurt someone {i}", "category": f"c{i % 3}"}
                                            for i in range(6)])
    benign = _jsonl(tmp_path / "b.jsonl", [{"prompt": f"help someone {i}"} for i in range(4)])
    out = tmp_path / "results.jsonl"
    args = ["sweep", "--model", model_dir, "--vector", vec, "--method", "add,rotate", "--strengths", "0,1,4",
            "--angles", "90,180", "--layers", "1-2,all", "--prompts", prompts, "--benign", benign,
            "--max-new-tokens", "6", "--out", str(out)]
    assert main(args) == 0
    return model_dir, vec, prompts, benign, out, args


def test_sweep_cli_writes_one_line_per_config_and_resumes(swept: Swept, capsys: pytest.CaptureFixture[str]) -> None:
    *_, out, args = swept
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 2 * 3 + 2 * 2  # baseline + add (2 layers × 3 strengths) + rotate (2 layers × 2 angles)
    assert len({json.loads(x)["key"] for x in lines}) == len(lines)
    capsys.readouterr()
    assert main(args) == 0  # same arguments: nothing left to run, same file
    assert out.read_text().splitlines() == lines
    printed = capsys.readouterr().out
    assert "unsteered" in printed
    assert "coherent compl." in printed.splitlines()[0]  # beside refusal in the summary table


def test_report_files(swept: Swept, tmp_path: Path) -> None:
    *_, out, _ = swept
    d = tmp_path / "report"
    assert main(["report", str(out), "--out", str(d)]) == 0
    names = {p.name for p in d.iterdir()}
    assert {"index.html", "dose_response.png", "tradeoff.png", "categories.png", "layers.png"} <= names
    page = (d / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "http" not in page.split("<body>")[1]
    assert "Operating point" in page
    assert 'class="chosen"' in page
    assert "hurt someone 0" in page
    assert "<th>refusal</th><th>coherent compliance</th>" in page
    first = json.loads(out.read_text().splitlines()[0])
    cc = first["prompts"]["coherent_compliance"]
    assert f"{cc['rate']:.1%} [{cc['ci95'][0]:.0%}, {cc['ci95'][1]:.0%}]" in page
    assert "pass every coherence check (language consistency ≥ " in page


OLD = Path(__file__).resolve().parents[1] / "experiments/results/smollm2_tune.jsonl"


@pytest.mark.skipif(not OLD.exists(), reason="no stored sweep from before coherent compliance")
def _without_coherence(x: object) -> object:
    """A sweep record as written before coherent compliance existed: its coherence keys dropped."""
    if isinstance(x, dict):
        return {k: _without_coherence(v) for k, v in x.items()
                if k not in ("coherent_compliance", "coherent", "coherence_bounds")}
    if isinstance(x, list):
        return [_without_coherence(v) for v in x]
    return x


def test_report_of_lines_without_coherent_compliance(tmp_path: Path) -> None:
    old = tmp_path / "old.jsonl"  # real sweep lines, stripped back to the older format
    old.write_text("".join(json.dumps(_without_coherence(json.loads(line))) + "\n"
                           for line in OLD.read_text().splitlines() if line.strip()))
    assert "coherent_compliance" not in old.read_text()
    d = tmp_path / "old"
    assert main(["report", str(old), "--out", str(d)]) == 0
    page = (d / "index.html").read_text()
    assert "<th>coherent compliance</th>" in page
    assert "coherent compliance was not measured" in page


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (make test installs Debian's chromium)")
def test_report_renders_in_headless_chromium(swept: Swept, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    *_, out, _ = swept
    d = tmp_path / "report"
    assert main(["report", str(out), "--out", str(d)]) == 0
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,2400", "--hide-scrollbars"]
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", (d / "index.html").as_uri()], check=True,
                   capture_output=True, timeout=120)
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", (d / "index.html").as_uri()], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    assert "Dose-response" in dom
    assert dom.count("<img") == 4
    img = Image.open(shot).convert("RGB")
    assert img.size == (1300, 2400)
    px = list(cast("Iterable[tuple[int, int, int]]", img.get_flattened_data()))
    # matplotlib's first line colour (#1f77b4) drawn by the plots: an error page has none of it
    blue = sum(1 for r, g, b in px if abs(r - 31) < 25 and abs(g - 119) < 25 and abs(b - 180) < 25)
    non_white = sum(1 for r, g, b in px if r + g + b < 700)
    assert blue > 500, blue
    assert non_white > 0.05 * len(px)


def test_tune_writes_a_plan_generate_accepts(swept: Swept, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mdir, vec, prompts, benign, *_ = swept
    plan = tmp_path / "plan.json"
    args = ["tune", "--model", mdir, "--vector", vec, "--method", "add", "--prompts", prompts, "--benign", benign,
            "--strengths", "0.5,1,400", "--layers", "1-2,all", "--max-kl", "0.003", "--max-new-tokens", "6",
            "--out", str(plan)]
    assert main(args) == 0
    printed = capsys.readouterr()
    chosen = json.loads(plan.read_text())
    assert chosen["method"] == "add"
    assert chosen["vector"] == vec
    results = [json.loads(x) for x in plan.with_suffix(".sweep.jsonl").read_text().splitlines()]
    assert all(r["kl"] <= 0.003 for r in results)
    assert len(results) < 7  # the KL pre-pass dropped α=400
    assert "KL pre-pass" in printed.err
    assert "chosen (budget" in printed.out
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", mdir, "--prompts", prompts, "--plan", str(plan), "--out", str(out),
                 "--max-new-tokens", "4"]) == 0
    assert len(out.read_text().splitlines()) == 6
