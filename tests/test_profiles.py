"""The profile library (directions/profiles.py), the users fit recipe and `steerable users fit / show`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from steerable.cli.main import main
from steerable.data.preferences import PreferenceRow
from steerable.directions.profiles import COMPOSITIONS, ProfileLibrary, load_profiles
from steerable.errors import ArtifactError, DataError, ModelMismatchError, SteerableError
from steerable.recipes.users_fit import build_basis, capture_texts, default_layers, fit_users
from tests.conftest import tiny_handle


def make_library(n_users: int = 5, layers=(1, 2), k: int = 3, d: int = 32, seed: int = 0, **meta) -> ProfileLibrary:
    gen = torch.Generator().manual_seed(seed)
    n = len(layers)
    q = torch.linalg.qr(torch.randn(n, d, k, generator=gen))[0]  # [L, d, K] orthonormal columns
    return ProfileLibrary(
        layers=list(layers), population=torch.randn(n, d, generator=gen), basis=q.transpose(1, 2).contiguous(),
        phi_mean=torch.randn(n, k, generator=gen), theta_pop=torch.randn(n, k, generator=gen),
        theta=torch.randn(n_users, n, k, generator=gen), dislike=torch.randn(n_users, n, k, generator=gen),
        users=[f"user{i}" for i in range(n_users)], pair_counts=list(range(n_users)),
        seen=[i % 2 == 0 for i in range(n_users)],
        meta={"model": {"name": "tiny-llama", "hidden_size": d, "n_layers": 4}, "site": "resid_post",
              "position": "response-mean", **meta})


def test_vectors_compose_the_basis_and_fall_back_to_the_population():
    lib = make_library()
    v, fallback = lib.vectors("user2")
    w = lib._theta[2] - lib.phi_mean
    assert not fallback
    assert torch.allclose(v, torch.einsum("lk,lkd->ld", w, lib.basis), atol=1e-6)
    v, fallback = lib.vectors("user2", "dislike_weighted")
    assert not fallback
    assert torch.allclose(v, torch.einsum("lk,lkd->ld", lib._dislike[2], lib.basis), atol=1e-6)
    v, fallback = lib.vectors("user2", "population")
    assert not fallback
    assert torch.equal(v, lib.population)
    for user in ("nobody", None):
        for comp in COMPOSITIONS:
            v, fallback = lib.vectors(user, comp)
            assert fallback
            assert torch.equal(v, lib.population)
    theta, fallback = lib.theta("nobody")
    assert fallback
    assert torch.equal(theta, lib.theta_pop)
    with pytest.raises(SteerableError, match="unknown composition"):
        lib.vectors("user1", "mean")
    assert lib.pair_count("user3") == 3
    assert lib.pair_count("nobody") == 0
    assert lib.seen("user2") is True
    assert lib.seen("user1") is False
    assert lib.seen("nobody") is None


def test_direction_set_adds_exactly_alpha_times_v():
    handle = tiny_handle("llama")
    lib = make_library(d=handle.hidden_size)
    ds, fallback = lib.direction_set("user1")
    ds.validate()
    v, _ = lib.vectors("user1")
    assert not fallback
    assert torch.allclose(ds.scales[:, None] * ds.directions, v, atol=1e-5)
    ids = handle.encode([handle.render("hello there")])
    seen: dict[str, torch.Tensor] = {}

    def block_1_output(name):  # registered after the steering hook, so it sees the steered output
        def hook(_mod, _args, out):
            seen[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return handle.layout.layers[1].register_forward_hook(hook)

    with torch.inference_mode():
        hk = block_1_output("base")
        handle.model(**ids)
        hk.remove()
        with ds.steer(handle, method="add", strength=2.5, layers=[1]):
            hk = block_1_output("steered")
            handle.model(**ids)
            hk.remove()
    diff = seen["steered"] - seen["base"]
    assert torch.allclose(diff, (2.5 * v[0]).expand_as(diff), atol=1e-4)


def test_save_load_round_trips_lazily(tmp_path):
    lib = make_library(n_users=50, data={"preferences": "x.jsonl"}, basis={"kind": "svd", "k": 3})
    path = lib.save(tmp_path / "p.safetensors")
    got = load_profiles(path)
    assert got._theta is None
    assert got._dislike is None
    assert got.layers == lib.layers
    assert got.k == 3
    assert got.site == "resid_post"
    assert list(got.users) == list(lib.users)
    assert got.meta["data"] == {"preferences": "x.jsonl"}
    assert got.meta["basis"]["kind"] == "svd"
    assert [got.pair_count(u) for u in got.users] == list(range(50))
    for user in ("user0", "user17", "user49", "nobody"):
        for comp in COMPOSITIONS:
            a, fa = lib.vectors(user, comp)
            b, fb = got.vectors(user, comp)
            assert fa == fb
            assert torch.allclose(a, b)
    again = got.save(tmp_path / "q.safetensors")  # a lazily loaded library saves whole
    assert torch.equal(load_profiles(again).theta("user9")[0], lib.theta("user9")[0])
    assert got.summary()["users"] == 50


def test_direction_files_and_broken_libraries_are_refused(tmp_path):
    from steerable.directions.artifact import DirectionSet, save_directions

    lib = make_library()
    ds, _ = lib.direction_set("user1")
    ds.meta = {"model": ds.meta["model"]}
    save_directions(DirectionSet(**{**ds.__dict__, "path": None}), tmp_path / "d.safetensors")
    with pytest.raises(ArtifactError, match="not a profile library"):
        load_profiles(tmp_path / "d.safetensors")
    with pytest.raises(ArtifactError, match="no such profile library"):
        load_profiles(tmp_path / "missing.safetensors")
    path = lib.save(tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    tensors["theta"] = tensors["theta"][:3]
    save_file(tensors, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(ArtifactError, match="'theta' has shape"):
        load_profiles(tmp_path / "short.safetensors")
    tensors["theta"] = torch.full((5, 2, 3), float("nan"))
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    bad = load_profiles(tmp_path / "nan.safetensors")  # rows are checked when read
    with pytest.raises(ArtifactError, match="NaN"):
        bad.vectors("user0")
    with pytest.raises(ArtifactError, match="orthonormal"):
        ProfileLibrary(**{**_fields(lib), "basis": lib.basis * 2})


def _fields(lib: ProfileLibrary) -> dict:
    return {"layers": lib.layers, "population": lib.population, "basis": lib.basis, "phi_mean": lib.phi_mean,
            "theta_pop": lib.theta_pop, "theta": lib._theta, "dislike": lib._dislike, "users": list(lib.users),
            "pair_counts": [lib.pair_count(u) for u in lib.users], "meta": lib.meta}


def test_profiles_reject_a_mismatched_model(tmp_path):
    handle = tiny_handle("llama")
    lib = make_library(d=handle.hidden_size)
    lib.meta["model"]["config_hash"] = handle.config_hash
    lib.check_model(handle)
    with pytest.raises(ModelMismatchError, match="hidden size mismatch: profile library has d=16"):
        make_library(d=16).check_model(handle)
    wrong = make_library(d=handle.hidden_size)
    wrong.meta["model"]["config_hash"] = "0123abcd"
    with pytest.raises(ModelMismatchError, match="config hash 0123abcd"):
        wrong.check_model(handle)
    far = make_library(d=handle.hidden_size, layers=(2, 7))
    far.meta["model"].pop("n_layers")
    with pytest.raises(ModelMismatchError, match="layer 7 of the profile library is out of range"):
        far.check_model(handle)
    path = far.save(tmp_path / "far.safetensors")
    with pytest.raises(ModelMismatchError, match=str(path)):
        load_profiles(path, model=handle)


def rows(n_users: int = 6, pairs: int = 4) -> list[PreferenceRow]:
    """Two behaviours; even users like the first answer of "kind" items and odd users the second."""
    out = []
    for u in range(n_users):
        for j in range(pairs):
            cat = "kind" if j % 2 == 0 else "brief"
            good, bad = (f"Sure, happy to help with {j}.", f"No. {j}") if cat == "kind" else \
                (f"{j}.", f"Let me explain {j} at great length first.")
            if u % 2:
                good, bad = bad, good
            out.append(PreferenceRow(f"u{u}", f"question {j}?", good, bad, category=cat, split="train",
                                     seen=u < n_users - 1))
    return out


def test_fit_users_builds_a_library():
    handle = tiny_handle("llama")
    data = rows()
    fit = fit_users(handle, data, users=[*(f"u{i}" for i in range(6)), "late"], folds=2, progress=False)
    lib = fit.library
    assert lib.layers == default_layers(handle.n_layers) == [1, 2]
    assert lib.k == 2
    assert lib.meta["basis"]["kind"] == "category"
    assert lib.meta["basis"]["labels"] == ["brief", "kind"]
    assert len(fit.texts) == 8  # 4 prompts × 2 answers, each read once for all 6 users
    assert lib.pair_count("u0") == 4
    assert lib.pair_count("late") == 0
    assert torch.allclose(lib.theta("late")[0], lib.theta_pop)  # no pairs: the prior mean
    assert lib.seen("u5") is False
    assert lib.meta["data"]["shared_rows"] == 20
    assert len(lib.meta["prior"]["tau"]) == 2
    assert lib.meta["prior"]["how"].startswith("2-fold")
    gram = torch.einsum("lkd,ljd->lkj", lib.basis, lib.basis)
    assert torch.allclose(gram, torch.eye(2).expand_as(gram), atol=1e-5)
    # the population vector is the seen users' mean difference; φ the basis projections of the texts
    h = capture_texts(handle, fit.texts, lib.layers, progress=False)
    seen = torch.tensor([r.seen for r in data])
    diff = (h[:, fit.chosen] - h[:, fit.rejected])[:, seen]
    assert torch.allclose(lib.population, diff.mean(1), atol=1e-5)
    raw_phi = torch.einsum("lnd,lkd->nlk", h, lib.basis)
    # auto on a per-category basis: each text's φ minus the mean φ of its prompt's texts (here its two answers),
    # kept on its own category's axis only ("question j?" is a "kind" item for even j, "brief" for odd)
    prompt_of = torch.tensor([int(p.split()[1].rstrip("?")) for p, _ in fit.texts])
    centre = torch.stack([raw_phi[prompt_of == int(g)].mean(0) for g in prompt_of])
    own = torch.tensor([lib.meta["basis"]["labels"].index("kind" if int(g) % 2 == 0 else "brief") for g in prompt_of])
    mask = torch.nn.functional.one_hot(own, 2).float()[:, None, :]
    assert lib.meta["features"] == lib.features == "category-masked"
    assert torch.allclose(fit.phi, (raw_phi - centre) * mask, atol=1e-4)
    assert torch.allclose(fit.phi[fit.chosen], -fit.phi[fit.rejected], atol=1e-4)  # two answers: ±Δ/2
    centred = fit_users(handle, data, folds=2, progress=False, feature_kind="prompt-centred")
    assert torch.allclose(centred.phi, raw_phi - centre, atol=1e-4)
    raw = fit_users(handle, data, folds=2, progress=False, feature_kind="raw")
    assert raw.library.features == "raw"
    assert torch.allclose(raw.phi, raw_phi, atol=1e-4)
    with pytest.raises(SteerableError, match="features 'centred'"):
        fit_users(handle, data, progress=False, feature_kind="centred")
    svd = fit_users(handle, data, basis=1, tau=0.5, progress=False, features=None, position="response-mean")
    assert svd.library.k == 1
    assert svd.library.meta["basis"]["kind"] == "svd"
    assert svd.library.meta["prior"]["how"] == "given"


def test_fit_users_refuses_bad_input():
    handle = tiny_handle("llama")
    with pytest.raises(DataError, match="no preference rows"):
        fit_users(handle, [], progress=False)
    with pytest.raises(DataError, match="answer letters"):
        fit_users(handle, rows(), position="answer-token", progress=False)
    with pytest.raises(SteerableError, match="layers must lie"):
        fit_users(handle, rows(), layers=[9], progress=False)


def test_basis_choices():
    gen = torch.Generator().manual_seed(0)
    diff = torch.randn(1, 40, 8, generator=gen) + torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0])
    basis, info = build_basis(diff, [None] * 40, "auto")
    assert info["kind"] == "svd"
    assert 1 <= info["k"] <= 8
    assert "energy" in info["how"]
    assert float(basis[0, 0, 0]) > 0.9  # the dominant direction, signed along the mean difference
    basis, info = build_basis(diff, ["a", "b"] * 20, "auto")
    assert info["kind"] == "category"
    assert info["k"] == 2
    with pytest.raises(DataError, match="category"):
        build_basis(diff, [None] * 40, "category")


def test_users_fit_and_show_cli(model_dir, tmp_path, capsys):
    prefs = tmp_path / "prefs.jsonl"
    data = rows()
    test_row = {"user": "held", "prompt": "question 0?", "chosen": "a", "rejected": "b", "split": "test"}
    prefs.write_text("".join(json.dumps({"user": r.user, "prompt": r.prompt, "chosen": r.chosen,
                                         "rejected": r.rejected, "category": r.category, "split": r.split,
                                         "seen": r.seen}) + "\n" for r in data) + json.dumps(test_row) + "\n")
    out = tmp_path / "profiles.safetensors"
    assert main(["users", "fit", "--model", model_dir, "--preferences", str(prefs), "--out", str(out),
                 "--layers", "1-2", "--folds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "K=2 category" in printed
    assert f"wrote {out}" in printed
    lib = load_profiles(out)
    assert "held" in lib
    assert lib.pair_count("held") == 0
    assert main(["users", "show", str(out)]) == 0
    assert "7 (1 without pairs" in capsys.readouterr().out
    assert main(["users", "show", str(out), "--user", "u1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["pair_count"] == 4
    assert shown["in_library"]
    assert len(shown["norms"]["personalised"]) == 2
    assert main(["users", "show", str(out), "--user", "stranger"]) == 0
    assert "falls back to the population" in capsys.readouterr().out
    assert main(["users", "fit", "--model", model_dir, "--preferences", str(tmp_path / "none.jsonl"),
                 "--out", str(out)]) == 2
    assert "no such preferences file" in capsys.readouterr().err


def test_tau_per_axis_is_recorded_and_refused_where_it_cannot_apply():
    handle, data = tiny_handle("llama"), rows()
    fit = fit_users(handle, data, basis="category", feature_kind="category-masked", tau_per_axis=True, folds=2,
                    progress=False)
    tau = fit.library.meta["prior"]["tau"]
    assert len(tau) == len(fit.library.layers)
    assert all(len(t) == fit.library.k for t in tau)
    assert fit.library.meta["prior"]["per_axis"] is True
    with pytest.raises(SteerableError, match="combined with a given"):
        fit_users(handle, data, basis="category", tau=1.0, tau_per_axis=True, progress=False)
    with pytest.raises(SteerableError, match="needs category-masked"):
        fit_users(handle, data, basis="category", feature_kind="raw", tau_per_axis=True, progress=False)
