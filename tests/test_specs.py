"""Each method owns its spec: keys, CLI flags, sweep knobs, builders and docs/plans.md all follow from it."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from steerable.cli.main import build_parser
from steerable.data.loaders import Example
from steerable.directions.calibrate import calibrate
from steerable.errors import PlanError
from steerable.steering import builders
from steerable.steering.cast import CONDITIONAL_KEYS
from steerable.steering.methods import METHOD_NAMES, METHODS
from steerable.steering.plan import PLAN_KEYS, build_plan, plan_flags
from steerable.steering.spec import COMMON_KEYS
from steerable.steering.values import Percentile
from steerable.sweeps.grid import Config

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plans.md"


def _table_keys(section: str) -> set[str]:
    text = DOCS.read_text(encoding="utf-8").split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return {m.group(1) for m in re.finditer(r"^\| `([a-z_-]+)`", text, re.MULTILINE)}


def test_docs_list_every_key_and_method():
    assert _table_keys("Keys") == set(PLAN_KEYS)
    assert _table_keys("Conditional keys") == set(CONDITIONAL_KEYS)
    assert _table_keys("Methods") == set(METHODS)


def test_every_method_declares_its_keys_and_knob():
    config_fields = {f.name for f in dataclasses.fields(Config)}
    for name, cls in METHODS.items():
        assert cls.method == name
        assert set(COMMON_KEYS) <= set(cls.keys())
        assert cls.knob in config_fields, name
        assert cls.knob == "strength" or cls.knob in cls.options(), name
    assert frozenset(k for cls in METHODS.values() for k in cls.keys()) == PLAN_KEYS  # noqa: SIM118
    assert set(METHOD_NAMES) == {*METHODS, "conditional"}


def test_generate_has_a_flag_for_every_key():
    sub = build_parser()._subparsers._group_actions[0].choices["generate"]  # type: ignore[union-attr]
    flags = {a.dest for a in sub._actions}
    assert {f.key for f in plan_flags()} == set(PLAN_KEYS) - {"vector", "method"}
    assert set(PLAN_KEYS) - {"vector"} <= flags
    method = next(a for a in sub._actions if a.dest == "method")
    assert set(method.choices) == set(METHODS)


def test_builders_take_only_keys_of_their_methods():
    renamed = {"floor": "cap_floor", "ceiling": "cap_ceiling"}
    switches = {"mirror", "adaptive"}  # pick between the builder's methods
    for name, methods in builders.BUILDERS.items():
        params = set(inspect.signature(getattr(builders, name)).parameters) - switches
        keys = {renamed.get(p, p) for p in params} - {"then", "condition"}
        allowed = set(CONDITIONAL_KEYS) if methods == ("conditional",) else set().union(
            *(METHODS[m].keys() for m in methods))
        assert keys <= allowed | {"vector"}, (name, keys - allowed)


EX = [Example(f"{w} someone now, {i}", None, j % 2, i * 4 + j // 2)
      for i in range(3) for j, w in enumerate(["hurt", "hug", "rob", "open", "poison", "dig", "burn", "build"])]


def test_plan_normalises_to_the_json_it_stands_for(llama, tmp_path):
    """Round trip against the input: what build_plan reads is what to_json writes back, key for key."""
    from steerable.directions.artifact import save_directions

    v = str(save_directions(calibrate(llama, EX, position="last", progress=False), tmp_path / "v.safetensors"))
    given = [
        {"vector": v, "method": "cap", "cap_floor": "p25", "cap_ceiling": 3.5, "layers": "1-2", "gate": "prompt"},
        {"vector": v, "method": "rotate", "angle": 90, "layers": [0, 3], "gate": "prompt+first:4"},
        {"vector": v, "method": "sttp", "threshold": "n10", "layers": 2, "strength": 0.5, "direction": 2},
        {"method": "conditional", "vector": v, "layer": 2, "threshold": 0.1, "compare": "<", "recall": 0.9,
         "then": {"vector": v, "method": "ablate", "layers": "3", "gate": "turns>=1", "site": "attn_out"}},
    ]
    expected = [
        {"vector": v, "method": "cap", "strength": 1.0, "layers": [1, 2], "direction": "per-layer", "gate": "prompt",
         "cap_floor": "p25", "cap_ceiling": 3.5},
        {"vector": v, "method": "rotate", "strength": 1.0, "layers": [0, 3], "direction": "global",
         "gate": "prompt+first:4", "angle": 90.0},
        {"vector": v, "method": "sttp", "strength": 0.5, "layers": [2], "direction": 2, "gate": "all",
         "threshold": "n10"},
        {"method": "conditional", "vector": v, "layer": 2, "threshold": 0.1, "compare": "<", "recall": 0.9,
         "then": [{"vector": v, "method": "ablate", "strength": 1.0, "layers": [3], "direction": "per-layer",
                   "gate": "turns>=1", "site": "attn_out"}]},
    ]
    plan = build_plan(given, llama)
    assert plan.to_json() == expected
    assert build_plan(expected, llama).to_json() == expected
    assert plan.interventions[0].cap_floor == Percentile("pos", 25.0)


@pytest.mark.parametrize(("spec", "message"), [
    ({"method": "cap", "cap_floor": "p25", "angle": 3}, r"unknown plan key\(s\) \['angle'\] for method cap"),
    ({"method": "rotate", "angle": 90, "cap_floor": "p5"}, r"\['cap_floor'\] for method rotate"),
    ({"method": "sttp", "threshold": ["p5", "p6"]}, "takes one value"),
    ({"method": "add", 3: 1}, "plan keys must be strings"),
    ({"method": 7}, "unknown method '7'"),
])
def test_inapplicable_keys_are_refused(llama, tmp_path, spec, message):
    from steerable.directions.artifact import save_directions

    v = str(save_directions(calibrate(llama, EX, position="last", progress=False), tmp_path / "v.safetensors"))
    with pytest.raises(PlanError, match=message):
        build_plan({"vector": v, **spec}, llama)
