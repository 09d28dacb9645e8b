"""README's Python section runs as written, on the real bundled model, and steers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from steerable.directions.artifact import DirectionSet
from steerable.evaluate.refusal import is_refusal
from steerable.generation import generate

README = Path(__file__).resolve().parents[1] / "README.md"


def python_section_code() -> str:
    section = README.read_text(encoding="utf-8").split("## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "README's Python section holds one code block"
    return blocks[0]


@pytest.mark.integration
def test_readme_python_section_runs_and_steers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(python_section_code(), "README.md", "exec"), scope)
    assert isinstance(scope["refusal"], DirectionSet)
    assert (tmp_path / "refusal.safetensors").is_file()
    printed = capsys.readouterr().out
    assert printed.strip()
    handle, harmful, plan = scope["handle"], scope["harmful"], scope["plan"]
    steered = generate(handle, harmful, plan, max_new_tokens=30)
    unsteered = generate(handle, harmful, max_new_tokens=30)
    assert sum(map(is_refusal, steered)) > sum(map(is_refusal, unsteered))
