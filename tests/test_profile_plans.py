"""The `profile` plan key: per-user steering from a profile library through the one validator, per-row plans
that mix users in one batch, the fallback to the population vector, and the generate CLI (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steerable.cli.main import main
from steerable.directions.profiles import ProfileLibrary
from steerable.errors import ModelMismatchError, PlanError
from steerable.generation import generate
from steerable.models.load import ModelHandle, load_model
from steerable.steering.builders import add
from steerable.steering.hooks import steer
from steerable.steering.plan import build_plan, build_row_plans, with_user

LAYERS = (1, 2)
USERS = [f"u{i:02d}" for i in range(16)]


def tiny_library(handle: ModelHandle, users=USERS, layers=LAYERS, k: int = 3, seed: int = 0,
                 model: dict | None = None) -> ProfileLibrary:
    """A profile library with random orthonormal bases and ideal points far apart (each user steers visibly)."""
    g = torch.Generator().manual_seed(seed)
    n, d, u = len(layers), handle.hidden_size, len(users)
    basis = torch.linalg.qr(torch.randn(n, d, k, generator=g)).Q.transpose(1, 2).contiguous()  # [L, K, d]
    meta_model = model if model is not None else {"name": handle.name, "config_hash": handle.config_hash,
                                                  "hidden_size": d, "n_layers": handle.n_layers}
    return ProfileLibrary(
        layers=layers, population=torch.randn(n, d, generator=g), basis=basis,
        phi_mean=0.1 * torch.randn(n, k, generator=g), theta_pop=torch.zeros(n, k), users=users,
        pair_counts=[5] * u, meta={"model": meta_model, "site": "resid_post", "position": "response-mean"},
        theta=4.0 * torch.randn(u, n, k, generator=g), dislike=torch.randn(u, n, k, generator=g))


@pytest.fixture
def lib(llama) -> ProfileLibrary:
    return tiny_library(llama)


@pytest.fixture
def lib_path(lib, tmp_path) -> str:
    return str(lib.save(tmp_path / "profiles.safetensors"))


def test_profile_key_validates_records_the_user_and_round_trips(llama, lib_path):
    plan = build_plan({"method": "add", "profile": lib_path, "user": "u03", "strength": 2.0}, llama)
    (iv,) = plan.interventions
    assert iv.layers == LAYERS  # default: the library's layers
    assert (iv.user, iv.composition, iv.fallback) == ("u03", "personalised", False)
    want, fell_back = tiny_library(llama).vectors("u03")
    assert not fell_back
    for row, layer in enumerate(LAYERS):  # α = 1 adds exactly the user's vector
        torch.testing.assert_close(iv.prepare(layer)["vector"][0], 2.0 * want[row], rtol=1e-5, atol=1e-5)
    expected = [{"profile": lib_path, "method": "add", "strength": 2.0, "layers": [1, 2], "direction": "per-layer",
                 "gate": "all", "user": "u03", "composition": "personalised"}]
    assert plan.to_json() == expected
    assert build_plan(json.loads(json.dumps(expected)), llama).to_json() == expected
    assert [u.to_json() for u in plan.profile_uses] == [
        {"profile": lib_path, "user": "u03", "composition": "personalised", "fallback": False}]
    assert plan.profile_fallback is False

    dis = build_plan({"method": "add", "profile": lib_path, "user": "u03", "composition": "dislike_weighted",
                      "layers": "2"}, llama)
    assert dis.interventions[0].layers == (2,)
    assert not torch.equal(dis.interventions[0].prepare(2)["vector"], plan.interventions[0].prepare(2)["vector"])


def test_builder_takes_an_in_memory_library(llama, lib, tmp_path):
    plan = add(profile=lib, user="u01", strength=1.5, layers="1")
    assert plan.to_json()[0]["profile"].startswith("<in-memory ProfileLibrary")
    assert "vector" not in plan.to_json()[0]
    (iv,) = build_plan(plan, llama).interventions
    v, _ = lib.vectors("u01")
    torch.testing.assert_close(iv.prepare(1)["vector"][0], 1.5 * v[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(PlanError, match="names an in-memory ProfileLibrary"):
        build_plan(plan.to_json(), llama)
    lib.save(tmp_path / "p.safetensors")
    assert add(profile=lib, user="u01").to_json()[0]["profile"] == lib.path  # a saved library goes by its path
    with steer(llama, add(profile=lib, user="u01", strength=3.0)):
        pass  # steers and comes off like any plan


@pytest.mark.parametrize(("spec", "message"), [
    ({"vector": "v.safetensors", "profile": "P"}, 'give "vector" or "profile", not both'),
    ({"vector": "v.safetensors", "user": "u01"}, r"'user' .*need\(s\) \"profile\""),
    ({"vector": "v.safetensors", "composition": "population"}, r"'composition' .*need\(s\) \"profile\""),
    ({"method": "ablate", "profile": "P", "user": "u01"}, "belong.* to method add, not ablate"),
    ({"method": "cap", "profile": "P", "cap_floor": 1.0}, "belong.* to method add, not cap"),
    ({"profile": "P", "composition": "mean"}, "composition must be one of personalised, population"),
    ({"profile": "P", "user": 7}, "user must be a user id"),
    ({"profile": "P", "user": ""}, "user must be a user id"),
    ({"profile": "P", "user": "x" * 257}, "user must be a user id"),
    ({"profile": 5}, "must be the path or name of a profile library"),
    ({"profile": "P", "layers": "0-2"}, r"layer 0 is not in profile library .* \(its layers: 1-2\)"),
    ({"profile": "P", "layers": 3}, "layer 3 is not in profile library"),
    ({"profile": "P", "layers": "discriminative"}, "calibration statistics"),
    ({"profile": "P", "layers": "top:1"}, "calibration statistics"),
    ({"profile": "P", "direction": "global"}, "calibration statistics"),
    ({"profile": "P", "direction": 0}, "layer 0 is not in this direction set"),
    ({"profile": "P", "angle": 3}, r"unknown plan key\(s\) \['angle'\] for method add"),
])
def test_bad_profile_plans_are_refused(llama, lib_path, spec, message):
    spec = {k: lib_path if v == "P" else v for k, v in spec.items()}
    with pytest.raises(PlanError, match=message):
        build_plan({"method": "add", **spec}, llama)


def test_unknown_user_falls_back_to_the_population_and_says_so(llama, lib, lib_path):
    for user in ("nobody", None):
        spec = {"method": "add", "profile": lib_path, "strength": 1.0, **({"user": user} if user else {})}
        plan = build_plan(spec, llama)
        (iv,) = plan.interventions
        assert iv.fallback is True
        assert plan.profile_fallback is True
        assert plan.profile_uses[0].user == user
        for row, layer in enumerate(LAYERS):
            torch.testing.assert_close(iv.prepare(layer)["vector"][0], lib.population[row], rtol=1e-5, atol=1e-5)
    known = build_plan({"method": "add", "profile": lib_path, "user": "u00", "composition": "population"}, llama)
    assert known.profile_fallback is False  # asked for the population vector: not a fallback
    torch.testing.assert_close(known.interventions[0].prepare(1)["vector"][0], lib.population[0])


def test_a_library_for_another_model_is_refused(llama, tmp_path):
    other = tiny_library(llama, model={"name": "other", "config_hash": "0123456789abcdef", "n_layers": 4})
    with pytest.raises(ModelMismatchError, match="config hash"):
        build_plan(add(profile=other, user="u00"), llama)
    path = str(other.save(tmp_path / "other.safetensors"))
    with pytest.raises(ModelMismatchError, match="profile library was fitted on 'other'"):
        build_plan({"method": "add", "profile": path, "user": "u00"}, llama)
    deep = tiny_library(llama, model={"n_layers": 12})
    with pytest.raises(ModelMismatchError, match="layer count"):
        build_plan(add(profile=deep), llama)


PROMPTS = [f"Tell me about topic {i}{'!' * (i % 4)}" for i in range(17)]


def test_sixteen_users_in_one_batch_equal_each_user_alone(handle, tmp_path):
    """Each row of a batch mixing 16 users (and one unsteered row) gets exactly the tokens its plan gives when
    that prompt is generated alone; the unsteered row equals the unsteered batch bit for bit."""
    path = str(tiny_library(handle).save(tmp_path / "p.safetensors"))
    plans = [{"method": "add", "profile": path, "user": u, "strength": 3.0} for u in USERS] + [None]
    checked = build_row_plans(handle, plans)
    assert [p.profile_uses[0].user for p in checked[:16]] == USERS
    together = generate(handle, PROMPTS, plans=plans, max_new_tokens=6, batch_size=17)
    alone = [generate(handle, [p], plan=plan, max_new_tokens=6, batch_size=1)[0]
             for p, plan in zip(PROMPTS, plans, strict=True)]
    plain = generate(handle, PROMPTS, max_new_tokens=6, batch_size=17)
    assert together == alone
    assert together[16] == plain[16]
    assert sum(t != q for t, q in zip(together[:16], plain[:16], strict=True)) >= 12  # the users really steer
    assert len(set(together[:16])) >= 8  # and differently

    enc = handle.encode([handle.render(t) for t in PROMPTS])
    with torch.no_grad():
        bare = handle.model(**enc).logits
        with steer(handle, rows=plans):
            mixed = handle.model(**enc).logits
    assert torch.equal(mixed[16], bare[16])  # the unsteered row, bit for bit
    assert not torch.equal(mixed[0], bare[0])


def test_with_user_sets_the_user_of_profile_entries(lib_path):
    plan = [{"vector": "v", "method": "ablate"},
            {"method": "conditional", "vector": "c", "then": {"method": "add", "profile": lib_path}}]
    out = with_user(plan, "u05")
    assert out[1]["then"]["user"] == "u05"
    assert "user" not in out[0]
    with pytest.raises(PlanError, match="steers with no profile library"):
        with_user({"vector": "v"}, "u05")
    with pytest.raises(PlanError, match="conflicts with the plan's"):
        with_user({"profile": lib_path, "user": "u01"}, "u05")


# -- the CLI -----------------------------------------------------------------------------------------------

def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(path: str) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_generate_with_profiles_and_per_row_users(model_dir, tmp_path, capsys):
    lib = str(tiny_library(load_model(model_dir)).save(tmp_path / "p.safetensors"))
    prompts = _jsonl(tmp_path / "in.jsonl", [{"prompt": "hello", "id": 1}, {"prompt": "goodbye now", "id": 2}])
    out = str(tmp_path / "out.jsonl")
    assert main(["generate", "--model", model_dir, "--prompts", prompts, "--out", out, "--profiles", lib,
                 "--user", "u02", "--strength", "3", "--max-new-tokens", "5"]) == 0
    one = _rows(out)
    assert [(r["id"], r["profile_user"], r["profile_fallback"]) for r in one] == [(1, "u02", False), (2, "u02", False)]

    assert main(["generate", "--model", model_dir, "--prompts", prompts, "--out", out, "--profiles", lib,
                 "--user", "stranger", "--composition", "dislike_weighted", "--max-new-tokens", "5"]) == 0
    assert [r["profile_fallback"] for r in _rows(out)] == [True, True]
    assert "2 of 2 rows steered a user the library does not hold" in capsys.readouterr().err

    # per-row users: each row its own plan; a row without "user" takes the flags' (here: no --user →
    # population, a fallback); a row with "plan": null is unsteered and reports nothing
    rows = [{"prompt": "hello", "user": "u02"}, {"prompt": "goodbye now", "user": "u07"},
            {"prompt": "hello", "user": "ghost"}, {"prompt": "hello"}, {"prompt": "hello", "plan": None},
            {"prompt": "hello", "user": "u02", "plan": {"method": "add", "profile": lib, "strength": 3}}]
    per_row = _jsonl(tmp_path / "rows.jsonl", rows)
    assert main(["generate", "--model", model_dir, "--prompts", per_row, "--out", out, "--profiles", lib,
                 "--strength", "3", "--max-new-tokens", "5", "--batch-size", "6"]) == 0
    got = _rows(out)
    assert [(r.get("profile_user"), r.get("profile_fallback")) for r in got] == [
        ("u02", False), ("u07", False), ("ghost", True), (None, True), (None, None), ("u02", False)]
    assert got[0]["completion"] == one[0]["completion"]  # u02 in a mixed batch = u02 for the whole file
    assert got[5]["completion"] == one[0]["completion"]  # the row's own plan, with the row's user
    assert got[0]["user"] == "u02"  # the row's own fields are kept

    plan = tmp_path / "plan.json"  # --plan with a profile, and --user
    plan.write_text(json.dumps({"method": "add", "profile": lib, "strength": 3}))
    assert main(["generate", "--model", model_dir, "--prompts", prompts, "--out", out, "--plan", str(plan),
                 "--user", "u02", "--max-new-tokens", "5"]) == 0
    assert [r["completion"] for r in _rows(out)] == [r["completion"] for r in one]


def test_generate_profile_errors_are_clean(model_dir, tmp_path, capsys):
    handle = load_model(model_dir)
    lib = str(tiny_library(handle).save(tmp_path / "p.safetensors"))
    prompts = _jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    out = str(tmp_path / "out.jsonl")
    base = ["generate", "--model", model_dir, "--prompts", prompts, "--out", out, "--max-new-tokens", "2"]
    assert main([*base, "--user", "u01"]) == 2
    assert "--user and --composition need --profiles" in capsys.readouterr().err
    assert main([*base, "--profiles", lib, "--steer", lib]) == 2
    assert "give --profiles or --steer, not both" in capsys.readouterr().err
    assert main([*base, "--profiles", lib, "--method", "ablate"]) == 2
    assert "to method add, not ablate" in capsys.readouterr().err
    assert main([*base, "--profiles", lib, "--layers", "0"]) == 2
    assert "layer 0 is not in profile library" in capsys.readouterr().err
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "hello"}, {"prompt": "hi", "user": "u01"}])
    assert main([*base[:4], bad, *base[5:]]) == 2
    assert "bad.jsonl:2: \"user\": the row's plan steers with no profile library" in capsys.readouterr().err
    odd = _jsonl(tmp_path / "odd.jsonl", [{"prompt": "hi", "user": 3}])
    assert main([*base[:4], odd, *base[5:], "--profiles", lib]) == 2
    assert 'odd.jsonl:1: "user" must be a non-empty string' in capsys.readouterr().err
    assert not Path(out).exists()
    other = str(tiny_library(handle, model={"config_hash": "feedfacefeedface"}).save(tmp_path / "o.safetensors"))
    assert main([*base, "--profiles", other]) == 2
    assert "config hash" in capsys.readouterr().err


def test_sweep_over_one_users_vector(model_dir, tmp_path, capsys):
    """`sweep --profiles P --user U` sweeps α of the user's composed vector like any other sweep: the same line
    format, resumable, a report, and each line's plan usable by `generate --plan`."""
    lib = str(tiny_library(load_model(model_dir)).save(tmp_path / "p.safetensors"))
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"hurt someone {i}"} for i in range(3)])
    out = tmp_path / "results.jsonl"
    args = ["sweep", "--model", model_dir, "--profiles", lib, "--user", "u04", "--strengths", "2,8", "--layers",
            "1-2;2", "--prompts", prompts, "--max-new-tokens", "4", "--out", str(out)]
    assert main(args) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 1 + 2 * 2
    steered = [x for x in lines if x["plan"] is not None]
    assert all(x["plan"]["profile"] == lib and x["plan"]["user"] == "u04" and "vector" not in x["plan"]
               for x in steered)
    assert {x["sweep"]["vector"] for x in lines} == {lib}  # the sweep is named by the library
    before = out.read_text()
    assert main(args) == 0
    assert out.read_text() == before  # resumed: nothing left to run
    other = tmp_path / "other.jsonl"  # another user is another setting: its own keys
    assert main([*args[:6], "u05", *args[7:-1], str(other)]) == 0
    assert {json.loads(x)["key"] for x in other.read_text().splitlines()[1:]}.isdisjoint(x["key"] for x in steered)
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(steered[-1]["plan"]))
    gen = str(tmp_path / "gen.jsonl")
    assert main(["generate", "--model", model_dir, "--prompts", prompts, "--out", gen, "--plan", str(plan),
                 "--max-new-tokens", "4"]) == 0
    assert all(r["profile_user"] == "u04" for r in _rows(gen))

    capsys.readouterr()
    assert main([*args[:3], "--vector", lib, *args[3:]]) == 2
    assert "give --vector (a direction file) or --profiles (a profile library), not both" in capsys.readouterr().err
    assert main(["sweep", "--model", model_dir, "--prompts", prompts, "--out", str(out), "--user", "u1"]) == 2
    assert "not neither" in capsys.readouterr().err
