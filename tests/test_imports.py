"""Dependencies flow one way (docs/ARCHITECTURE.md): a module imports only its own stage or earlier ones, and no
library module imports the CLI. Every import is read with `ast`: relative ones, ones inside functions and ones
under `TYPE_CHECKING` count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "steerable"

# (stage, name, module prefixes); a module belongs to the longest matching prefix
STAGES: list[tuple[int, str, tuple[str, ...]]] = [
    (0, "base", ("steerable.errors", "steerable.fsutil", "steerable.tables", "steerable.sources", "steerable.data")),
    (1, "models", ("steerable.models",)),
    (2, "capture", ("steerable.capture",)),
    (3, "directions", ("steerable.directions",)),
    (4, "steering", ("steerable.steering",)),
    (5, "apply", ("steerable.generation", "steerable.bake", "steerable.train")),
    (6, "evaluate", ("steerable.evaluate",)),
    (7, "recipes", ("steerable.recipes",)),
    (8, "sweeps / serve / sim / scale", ("steerable.sweeps", "steerable.serve", "steerable.sim", "steerable.scale")),
    (9, "cli / demo", ("steerable.cli", "steerable.demo")),
]
EXEMPT = {"steerable"}  # the package root re-exports everything
FRONT_ENDS = ("steerable.cli", "steerable.demo")  # the only modules that may import steerable.cli

# The one backward import, by design: (importing module, imported module).
ALLOWED: set[tuple[str, str]] = {
    # DirectionSet.steer (issue 12's notebook API: `with ds.steer(handle, strength=…):`) is a thin facade over
    # steering.hooks.steer, imported inside the method; nothing in directions/ uses steering otherwise.
    ("steerable.directions.artifact", "steerable.steering.hooks"),
}


def _is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def stage_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, stage)
    for stage, _, prefixes in STAGES:
        for p in prefixes:
            if _is_under(module, p) and (best is None or len(p) > best[0]):
                best = (len(p), stage)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name a (possibly relative) `from ... import` refers to."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of a steerable module in `path`. For `from X import name`
    both X and X.name are candidates (name may be a submodule); X.name is kept only if it is a module file."""
    importer = module_name(path)
    is_package = path.name == "__init__.py"
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, is_package, node.level, node.module)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if _module_exists(sub) else base))
    return sorted((line, m) for line, m in out if _is_under(m, "steerable"))


def _module_exists(module: str) -> bool:
    p = ROOT.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def violations() -> tuple[list[str], list[str]]:
    """(layering violations, CLI imports from library modules), each 'file:line: importer (stage) imports ...'."""
    layering, cli = [], []
    for path in _modules():
        importer = module_name(path)
        if importer in EXEMPT:
            continue
        own = stage_of(importer)
        assert own is not None, f"{path.relative_to(ROOT)} belongs to no stage: add it to STAGES"
        for line, target in imports_of(path):
            where = f"{path.relative_to(ROOT)}:{line}: {importer}"
            if (importer, target) in ALLOWED:
                continue
            if any(_is_under(target, f) for f in ("steerable.cli",)) and not any(
                    _is_under(importer, f) for f in FRONT_ENDS):
                cli.append(f"{where} imports {target} (library code must not import the CLI)")
            if target in EXEMPT:
                layering.append(f"{where} imports the package root {target} (import the defining module)")
                continue
            theirs = stage_of(target)
            if theirs is None:
                layering.append(f"{where} imports {target}, which belongs to no stage")
            elif theirs > own:
                layering.append(f"{where} (stage {own} {STAGES[own][1]}) imports {target} "
                                f"(later stage {theirs} {STAGES[theirs][1]})")
    return layering, cli


def test_every_module_has_a_stage():
    missing = [str(p.relative_to(ROOT)) for p in _modules()
               if module_name(p) not in EXEMPT and stage_of(module_name(p)) is None]
    assert not missing, "modules in no stage:\n" + "\n".join(missing)


def test_imports_flow_one_way():
    layering, _ = violations()
    print("\n".join(layering))
    assert not layering, f"{len(layering)} import(s) against the flow:\n" + "\n".join(layering)


def test_library_does_not_import_the_cli():
    _, cli = violations()
    print("\n".join(cli))
    assert not cli, f"{len(cli)} library import(s) of steerable.cli:\n" + "\n".join(cli)


def test_allow_list_entries_are_still_needed():
    """An entry whose import is gone must be removed, so the list only ever shrinks."""
    found = {(module_name(p), target) for p in _modules() for _, target in imports_of(p)}
    stale = sorted(ALLOWED - found)
    assert not stale, f"allow-list entries no longer needed: {stale}"


@pytest.mark.parametrize(("importer", "is_package", "level", "module", "want"), [
    ("steerable.directions.axis", False, 1, "artifact", "steerable.directions.artifact"),
    ("steerable.directions.axis", False, 2, "generation", "steerable.generation"),
    ("steerable.directions", True, 1, "axis", "steerable.directions.axis"),
    ("steerable.directions", True, 2, None, "steerable"),
    ("steerable.cli.main", False, 0, "steerable.cli.table", "steerable.cli.table"),
])
def test_relative_imports_resolve(importer, is_package, level, module, want):
    assert _resolve(importer, is_package, level, module) == want


def test_the_checker_sees_imports_in_functions_and_type_checking(tmp_path, monkeypatch):
    pkg = tmp_path / "steerable" / "directions"
    pkg.mkdir(parents=True)
    (tmp_path / "steerable" / "__init__.py").write_text("")
    (tmp_path / "steerable" / "generation.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from steerable.cli.table import table\n"
        "def f():\n    from .. import generation\n    import steerable.evaluate.drift\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path / "steerable")
    got = imports_of(pkg / "x.py")
    assert got == [(3, "steerable.cli.table"), (5, "steerable.generation"), (6, "steerable.evaluate.drift")]
    layering, cli = violations()
    assert len(layering) == 3
    assert len(cli) == 1
    assert any("x.py:5" in v and "steerable.generation" in v for v in layering)
