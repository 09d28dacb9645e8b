"""Hostile plans (issue 13): every plan the validator sees ends in a checked plan or a PlanError — never another
exception, never a hang, and no NaN reaches the logits from a plan it accepted. One named test per class of
failure an attacker found, then a fuzz test over random plans."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steerable.data.loaders import Example
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.errors import PlanError, SteerableError
from steerable.generation import generate
from steerable.models.batch import PromptBatch
from steerable.steering.cast import CONDITIONAL_KEYS
from steerable.steering.hooks import steer
from steerable.steering.methods import METHOD_NAMES
from steerable.steering.plan import PLAN_KEYS, build_plan, read_plan_file
from tests.conftest import tiny_handle

WORDS = ["hurt", "hug", "rob", "open", "poison", "dig", "burn", "build"]
EX = [Example(f"{w} someone now, {i}", None, j % 2, i * 4 + j // 2) for i in range(3) for j, w in enumerate(WORDS)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    handle = tiny_handle("llama")
    path = tmp_path_factory.mktemp("hostile") / "v.safetensors"
    save_directions(calibrate(handle, EX, position="last", progress=False), path)
    return handle, str(path)


def refused(world: tuple[Any, str], spec: Any, match: str) -> None:
    handle, v = world
    body = {"vector": v, **spec} if isinstance(spec, dict) and "vector" not in spec else spec
    with pytest.raises(PlanError, match=match):
        build_plan(body, handle)


def test_gate_counts_are_bounded_by_the_context(world):
    refused(world, {"gate": "first:99999999999999999999"}, "first:K")
    refused(world, {"gate": "first:100000"}, "more than the model's context of 256")
    refused(world, {"gate": "turns>=" + "9" * 5000}, "turns>=k")
    refused(world, {"layers": "top:" + "9" * 5000}, "cannot parse layers|top:K")


@pytest.mark.parametrize("key", ["strength", "angle", "cap_floor", "cap_ceiling", "threshold", "target"])
def test_numbers_too_large_for_a_float_are_refused(world, key):
    method = {"angle": "rotate", "cap_floor": "cap", "cap_ceiling": "cap", "threshold": "sttp", "target": "sttp"}
    spec = {"method": method.get(key, "add"), key: 10**400}
    if spec["method"] == "rotate" and key != "angle":
        spec["angle"] = 90
    refused(world, spec, "out of range")


def test_cap_bounds_that_would_overflow_the_logits_are_refused(world):
    refused(world, {"method": "cap", "cap_floor": 1e300}, "out of range")
    refused(world, {"method": "cap", "cap_floor": -1e300, "cap_ceiling": 1e300}, "out of range")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 10**400, "1e400", None, True])
def test_conditional_threshold_must_be_a_finite_number(world, bad):
    handle, v = world
    with pytest.raises(PlanError, match="threshold"):
        build_plan({"method": "conditional", "vector": v, "layer": 1, "threshold": bad,
                    "then": {"vector": v, "layers": [2]}}, handle)


def test_huge_layer_ranges_are_refused_before_they_are_expanded(world):
    t0 = time.perf_counter()
    refused(world, {"layers": "0-20000000"}, "out of range")
    refused(world, {"layers": ",".join(["1"] * 5000)}, "at most")
    refused(world, {"layers": list(range(5000))}, "at most")
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize(("spec", "match"), [
    ({"layers": "١٠"}, "cannot parse layers"),
    ({"layers": "1_0"}, "cannot parse layers"),
    ({"gate": "first:٣"}, "unknown gate"),
    ({"method": "cap", "cap_floor": "p٥"}, "percentile"),
    ({"method": "cap", "cap_floor": "p1_0"}, "percentile"),
    ({"gate": "first:1_0"}, "unknown gate"),
])
def test_numeric_syntax_is_ascii_only(world, spec, match):
    refused(world, spec, match)


def test_keys_that_do_not_apply_to_the_method_are_refused(world):
    refused(world, {"method": "add", "angle": 30}, r"\['angle'\] for method add")
    refused(world, {"method": "ablate", "cap_floor": "p5"}, r"\['cap_floor'\] for method ablate")
    refused(world, {"method": "add", "threshold": 1.0}, "allowed keys are")


def test_nesting_is_bounded_and_cycles_are_refused(world):
    handle, v = world
    loop: dict[str, Any] = {"method": "conditional", "vector": v, "layer": 1, "threshold": 0.1}
    loop["then"] = loop
    with pytest.raises(PlanError, match="nested too deeply"):
        build_plan(loop, handle)
    deep: Any = {"vector": v, "layers": [1]}
    for _ in range(3000):
        deep = {"method": "conditional", "vector": v, "layer": 1, "threshold": 0.1, "then": deep}
    with pytest.raises(PlanError, match="nested too deeply"):
        build_plan(deep, handle)
    nested: Any = [{"vector": v}]
    for _ in range(50):
        nested = [nested]
    with pytest.raises(PlanError, match="nested too deeply"):
        build_plan(nested, handle)
    text = "[" * 100_000 + "]" * 100_000
    with pytest.raises(PlanError, match="not valid JSON"):
        build_plan(text, handle)


def test_non_string_keys_are_refused(world):
    refused(world, {"method": "add", 1: 2}, "plan keys must be strings")


def test_plan_files_that_are_not_plans(tmp_path):
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(PlanError, match="not a regular file \\(a directory\\)"):
        read_plan_file(tmp_path / "dir.json")
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(PlanError, match="not a regular file"):  # refused without waiting for a writer
        read_plan_file(tmp_path / "fifo.json")
    (tmp_path / "latin1.json").write_bytes(b'{"strength": "\xe9"}')
    with pytest.raises(PlanError, match="not UTF-8"):
        read_plan_file(tmp_path / "latin1.json")
    (tmp_path / "digits.json").write_text('{"strength": ' + "9" * 5000 + "}")
    with pytest.raises(PlanError, match="not valid JSON"):
        read_plan_file(tmp_path / "digits.json")


def test_row_plan_errors_name_the_row(world):
    handle, v = world
    with pytest.raises(PlanError, match="row 1: unknown method"):
        generate(handle, ["a", "b"], plans=[{"vector": v}, {"vector": v, "method": "shout"}], max_new_tokens=1)


# -- fuzz ------------------------------------------------------------------------------------------

NASTY_STRINGS = ["p50", "n5", "p101", "p-1", "pNaN", "first:3", "first:99999999999", "turns>=1", "prompt+first:2",
                 "assistant", "generated", "all", "0-3", "3-0", "1,2", "0-20000000", "١", "1_0", "top:2", "top-d:1",
                 "discriminative", "global", "per-layer", "resid_pre", "attn_out", "mlp_in", "auto", ">", "<", "",
                 " ", "\x00", "\udc00", "../etc/passwd", "1e400", "nan", "inf"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.integers(10**300, 10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(NASTY_STRINGS), st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=12)
KEYS = sorted(PLAN_KEYS | set(CONDITIONAL_KEYS))
#: values each key takes when it is valid: the fuzzer mixes them with hostile ones so accepted plans occur too
GOOD: dict[str, list[Any]] = {
    "strength": [0.0, 0.5, 1.0, 3.0, -2.0], "angle": [0, 45.5, 180, 359], "cap_floor": ["p5", "p50", "n10", -1.0],
    "cap_ceiling": ["p95", "n90", 2.0], "threshold": ["p5", "p60", 0.5], "target": ["p50", "p95", 1.0],
    "layers": ["0-3", "1,2", [1], 2, "all", "top:2", "discriminative"],
    "gate": ["all", "prompt", "generated", "first:2", "prompt+first:1", "assistant", "turns>=1"],
    "direction": ["per-layer", "global", 1, 2], "site": ["resid_post", "resid_pre", "attn_out", "mlp_in"],
    "layer": [1, 2, "auto"], "recall": [0.5, 0.9], "compare": [">", "<"],
}


@st.composite
def plans(draw: st.DrawFn, vector: str) -> Any:
    method = draw(st.sampled_from([*METHOD_NAMES, *METHOD_NAMES, "shout", None]))
    entry: dict[Any, Any] = {"vector": draw(st.sampled_from([vector] * 6 + [[vector, vector], "nope", 3]))}
    if method is not None:
        entry["method"] = method
    own = (sorted(CONDITIONAL_KEYS) if method == "conditional" else
           [k for k in KEYS if k in PLAN_KEYS and k not in ("vector", "method")])
    for key in draw(st.lists(st.sampled_from(own if draw(st.booleans()) else KEYS), max_size=4, unique=True)):
        good = GOOD.get(key)
        entry[key] = draw(st.sampled_from(good)) if good and draw(st.integers(0, 3)) else draw(values)
    if method in ("rotate", "angular", "angular-adaptive") and "angle" not in entry and draw(st.booleans()):
        entry["angle"] = 90
    if method == "cap" and "cap_floor" not in entry and draw(st.booleans()):
        entry["cap_floor"] = "p50"
    if method == "conditional" and draw(st.integers(0, 3)):
        entry["then"] = {"vector": vector, "layers": draw(st.sampled_from([[1], "0-3", "all"])),
                         "gate": draw(st.sampled_from(GOOD["gate"]))}
    if draw(st.integers(0, 7)) == 0:
        entry[draw(st.one_of(st.text(max_size=5), st.integers()))] = draw(values)
    return draw(st.sampled_from([entry, entry, [entry], json.dumps(entry, default=str)]))


def test_fuzz_plans_validate_or_refuse_and_accepted_plans_keep_logits_finite(world):
    handle, v = world
    batch = PromptBatch.encode(handle, ["Say something nice", "Count to five"])
    accepted: list[Any] = []

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(plans(v))
    def check(spec: Any) -> None:
        try:
            plan = build_plan(spec, handle)
        except SteerableError:
            return
        if plan:
            accepted.append(spec)
            with torch.no_grad(), steer(handle, plan, batch=batch):
                logits = handle.model(**batch.inputs()).logits
            assert bool(torch.isfinite(logits).all()), spec

    check()
    # a fuzzer that only ever produced refusals would prove nothing about accepted plans
    assert len(accepted) >= 5, f"only {len(accepted)} of the fuzzed plans were valid"  # 13-29 of 400 seen


def test_fuzz_accepted_plans_generate(world):
    """Accepted plans also run through generation (gates see prompt and generated tokens)."""
    handle, v = world

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(plans(v))
    def check(spec: Any) -> None:
        try:
            plan = build_plan(spec, handle)
        except SteerableError:
            return
        try:
            out = generate(handle, ["Hi", "Count to five"], plan, max_new_tokens=2)
        except PlanError as e:  # turn gates need turns: steerable.generate has them, so this must not happen
            raise AssertionError(f"{spec}: {e}") from e
        assert len(out) == 2
        assert all(isinstance(t, str) for t in out)

    check()
