"""`steerable users eval`: choice accuracy by hand, zero plans, the report's contract, the CLI's files."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

import pytest
import torch

from steerable.directions.profiles import ProfileLibrary
from steerable.evaluate import preference_eval as pe
from steerable.recipes import users_eval as ue
from steerable.recipes.users_eval_report import write_report
from tests.conftest import tiny_handle


@dataclass(frozen=True)
class Row:
    user: str
    prompt: str
    chosen: str
    rejected: str
    category: str | None = None
    split: str | None = None
    seen: bool | None = None
    answer_token: bool = False


def library(handle, users=("u0", "u1", "u2"), layers=(1, 2), k=2, seed=0) -> ProfileLibrary:
    g = torch.Generator().manual_seed(seed)
    d, n = handle.hidden_size, len(layers)
    basis = torch.stack([torch.linalg.qr(torch.randn(d, k, generator=g))[0].T for _ in layers])
    return ProfileLibrary(
        layers=list(layers), population=torch.randn(n, d, generator=g), basis=basis,
        phi_mean=torch.randn(n, k, generator=g), theta_pop=torch.randn(n, k, generator=g), users=list(users),
        pair_counts=[3, 12, 25][: len(users)], theta=torch.randn(len(users), n, k, generator=g),
        dislike=torch.randn(len(users), n, k, generator=g), seen=[True, False, True][: len(users)],
        meta={"site": "resid_post", "position": "response-mean",
              "model": {"name": handle.name, "n_layers": handle.n_layers}})


ROWS = [Row("u0", "Do you like tea?", "Yes, very much.", "No."), Row("u1", "Pick one: (A) or (B)?", "(A)", "(B)",
                                                                     "ab", seen=False),
        Row("u2", "Is the sky green?", "No, it is blue.", "Yes it is green.", "facts"),
        Row("ghost", "Say hi.", "Hi!", "Go away.", "facts"), Row("u0", "Rain or sun?", "Sun", "Rain", "ab")]


def _hand_loglik(handle, prompt: str, tail: str) -> float:
    tok = handle.tokenizer
    p_ids = tok(handle.render(prompt), add_special_tokens=False)["input_ids"]
    t_ids = tok.encode(tail, add_special_tokens=False)
    ids = torch.tensor([p_ids + t_ids])
    with torch.no_grad():
        lp = handle.model(input_ids=ids).logits.float().log_softmax(-1)[0]
    return sum(float(lp[len(p_ids) + j - 1, t]) for j, t in enumerate(t_ids)) / len(t_ids)


def test_choice_accuracy_equals_a_hand_computation():
    h = tiny_handle("llama")
    ch, rj = pe.choice_logliks(h, [r.prompt for r in ROWS], [r.chosen for r in ROWS], [r.rejected for r in ROWS],
                               batch_size=3)
    want_c = [_hand_loglik(h, r.prompt, r.chosen) for r in ROWS]
    want_r = [_hand_loglik(h, r.prompt, r.rejected) for r in ROWS]
    assert ch == pytest.approx(want_c, abs=1e-4)
    assert rj == pytest.approx(want_r, abs=1e-4)
    hits = pe.hits_from(ch, rj)
    assert hits == [c > r for c, r in zip(want_c, want_r, strict=True)]
    acc = pe.accuracy([float(x) for x in hits], [r.user for r in ROWS])
    assert acc.value == pytest.approx(sum(hits) / len(hits))
    assert acc.n == 5
    assert acc.users == 4
    assert acc.lo <= acc.value <= acc.hi


def test_zero_and_empty_plans_give_the_unsteered_scores():
    h = tiny_handle("llama")
    lib = library(h)
    args = ([r.prompt for r in ROWS], [r.chosen for r in ROWS], [r.rejected for r in ROWS])
    base = pe.choice_logliks(h, *args)
    ds, _ = lib.direction_set("u1")
    zero = {"vector": ds, "method": "add", "strength": 0.0, "layers": [1, 2]}
    assert pe.choice_logliks(h, *args, plans=[None] * len(ROWS)) == base
    got = pe.choice_logliks(h, *args, plans=[zero] * len(ROWS))
    assert got[0] == pytest.approx(base[0], abs=1e-6)
    assert got[1] == pytest.approx(base[1], abs=1e-6)
    plans = ue.Plans(lib, [1, 2], population_strength=0.0)  # "ghost" falls back to the population at 0
    assert ue.condition_hits(h, ROWS, plans, "personalised", 0.0) == ue.condition_hits(h, ROWS, plans, "unsteered", 0)
    assert ue.condition_hits(h, ROWS, plans, "personalised", 0.0) == pe.hits_from(*base)
    # a strong personalised plan changes the scores (so the equality above is not vacuous)
    strong = pe.choice_logliks(h, *args, plans=[plans.plan(r.user, "personalised", 50.0) for r in ROWS])
    assert strong[0] != pytest.approx(base[0], abs=1e-3)


def test_per_row_plans_equal_each_user_alone_and_fallback_is_the_population():
    h = tiny_handle("llama")
    lib = library(h)
    plans = ue.Plans(lib, [1, 2], population_strength=0.7)
    ps = [plans.plan(r.user, "personalised", 5.0) for r in ROWS]
    assert ps[0] is ps[4]  # one object per user: checked once
    assert ps[3] is plans.plan(None, "population", 0.7)  # "ghost" is served as the population
    args = ([r.prompt for r in ROWS], [r.chosen for r in ROWS], [r.rejected for r in ROWS])
    mixed = pe.choice_logliks(h, *args, plans=ps, batch_size=8)
    for i, r in enumerate(ROWS):
        alone = pe.choice_logliks(h, [r.prompt], [r.chosen], [r.rejected], plan=ps[i])
        assert alone[0][0] == pytest.approx(mixed[0][i], abs=1e-4)
        assert alone[1][0] == pytest.approx(mixed[1][i], abs=1e-4)


def test_chance_bootstrap_and_peaks():
    users, prompts = ["a", "b"] * 50, [f"p{i}" for i in range(100)]
    hits = pe.chance_hits(users, prompts, ["x"] * 100, ["y"] * 100)
    assert hits == pe.chance_hits(users, prompts, ["x"] * 100, ["y"] * 100)  # seeded by the pair
    assert 0.3 < sum(hits) / 100 < 0.7
    # the coin cannot see which text is chosen: swapping the labels flips every hit
    assert pe.chance_hits(users, prompts, ["y"] * 100, ["x"] * 100) == [not x for x in hits]
    one = pe.accuracy([1.0] * 10 + [0.0] * 10, ["a"] * 10 + ["b"] * 10)  # two users: all-or-nothing clusters
    assert one.value == 0.5
    assert one.lo == 0.0
    assert one.hi == 1.0
    assert math.isnan(pe.accuracy([]).value)
    shape = pe.peaks([0, 1, 2, 3, 4], [0.5, 0.6, 0.5, 0.62, 0.55], noise=0.02)
    assert shape["peaks"] == [1, 3]
    assert shape["bimodal"]
    assert not pe.peaks([0, 1, 2, 3, 4], [0.5, 0.6, 0.59, 0.6, 0.55], noise=0.02)["bimodal"]
    assert pe.peaks([0, 1, 2], [0.7, 0.6, 0.5], noise=0.0)["peaks"] == [0]
    assert pe.peaks([0, 0.5, 1, 2, 4], [0.48, 0.5, 0.5, 0.58, 0.62], noise=0.0)["peaks"] == [4]  # plateau, then rise


def _small_cfg(**kw) -> ue.EvalConfig:
    return ue.EvalConfig(**{"sweep_composed": (0.0, 2.0), "sweep_population": (0.0, 0.5), "capability": "none",
                            "gen_prompts": 2, "max_new_tokens": 3, "batch_size": 8, **kw})


def test_report_has_the_contract_keys_and_types(tmp_path):
    h = tiny_handle("llama")
    lib = library(h)
    report = ue.evaluate_users(h, lib, ROWS, _small_cfg(), tune_rows=ROWS[:3])
    for c in ("chance", "unsteered", "population", "personalised", "dislike_weighted", "bt_model"):
        a = report["accuracy"][c]
        assert isinstance(a["value"], float)
        assert isinstance(a["n"], int)
        assert a["n"] == len(ROWS)
        assert len(a["ci95"]) == 2
        assert all(isinstance(x, float) for x in a["ci95"])
    assert isinstance(report["strength"], float)
    assert report["strengths"]["personalised"] in (0.0, 2.0)
    assert report["strengths_from"]["population"] == "sweep"
    assert set(report["by_pairs_per_user"]) <= {b for _, _, b in ue.PAIR_BINS}
    assert "0 (not in library)" in report["by_pairs_per_user"]
    assert set(report["by_category"]) == {"none", "ab", "facts"}
    assert set(report["by_seen"]) >= {"seen", "unseen"}
    assert report["fallback"] == {**report["fallback"], "pairs": 1, "users": 1}
    assert set(report["sweep"]) == {"population", "personalised", "dislike_weighted"}
    assert isinstance(report["sweep"]["personalised"]["bimodal"], bool)
    assert set(report["gating"]["gates"]) == {"all", "prompt", "prompt+first:4"}
    assert report["generation"]["prompts"] == 2
    json.dumps(report, allow_nan=True)
    out = write_report(tmp_path / "r", report)
    for name in ("report.json", "index.html", "accuracy.png", "sweep.png", "breakdown.png"):
        assert (out / name).stat().st_size > 0
    assert "data:image/png;base64," in (out / "index.html").read_text()


def test_given_strengths_skip_the_choice_and_layers_are_checked():
    h = tiny_handle("llama")
    lib = library(h)
    rep = ue.evaluate_users(h, lib, ROWS[:2], _small_cfg(strength=3.0, population_strength=0.25, sweep=False,
                                                         gen_prompts=0, layers="2"))
    assert rep["strengths"] == {"population": 0.25, "personalised": 3.0, "dislike_weighted": 3.0}
    assert rep["layers"] == [2]
    assert rep["sweep"] is None
    assert rep["generation"] is None
    from steerable.errors import SteerableError
    with pytest.raises(SteerableError, match="not in the profile library"):
        ue.evaluate_users(h, lib, ROWS[:2], _small_cfg(sweep=False, layers="0-1"))


def test_cli_writes_report_index_and_pngs(tmp_path, model_dir):
    from steerable.cli import users_eval_cmd
    from steerable.models.load import load_model

    h = load_model(model_dir)
    lib = library(h)
    lib.meta["model"] = {"name": h.name, "n_layers": h.n_layers, "config_hash": h.config_hash}
    lib.save(tmp_path / "p.safetensors")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"user": r.user, "prompt": r.prompt, "chosen": r.chosen,
                                         "rejected": r.rejected, **({"category": r.category} if r.category else {})})
                             + "\n" for r in ROWS))
    parser = argparse.ArgumentParser()
    users_eval_cmd.add_parser(parser.add_subparsers())
    out = tmp_path / "eval"
    args = parser.parse_args(["eval", "--model", model_dir, "--profiles", str(tmp_path / "p.safetensors"),
                              "--preferences", str(prefs), "--out", str(out), "--sweep-composed", "0,2",
                              "--sweep-population", "0,0.5", "--capability", "none", "--gen-prompts", "2",
                              "--max-new-tokens", "3", "--limit", "4"])
    assert args.fn is users_eval_cmd.run
    assert args.fn(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pairs"] == 4
    assert report["sweep_on"].startswith("evaluation pairs")
    for name in ("index.html", "accuracy.png", "sweep.png", "breakdown.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("gate", ["all", "prompt", "prompt+first:1"])
def test_cached_scoring_equals_full_forward_passes_under_gates(handle, gate):
    """choice_logliks scores both tails from one prompt pass; it equals scoring prompt + tail from scratch
    (score_batches, as generate lays it out), token gates included, on every tiny family."""
    from steerable.evaluate.logits import score_batches

    lib = library(handle)
    plan = {"vector": lib.direction_set("u2")[0], "method": "add", "strength": 20.0, "layers": [1, 2], "gate": gate}
    prompts = [r.prompt for r in ROWS]
    got = pe.choice_logliks(handle, prompts, [r.chosen for r in ROWS], [r.rejected for r in ROWS], plan, batch_size=2)
    for side, texts in enumerate(([r.chosen for r in ROWS], [r.rejected for r in ROWS])):
        want = [0.0] * len(ROWS)
        for b in score_batches(handle, prompts, texts, plan, 2):
            target, real = b.ids[:, b.width :], b.mask[:, b.width :].bool()
            lp = b.logprobs[:, :-1].gather(-1, target.unsqueeze(-1)).squeeze(-1)
            mean = torch.where(real, lp, 0.0).sum(1) / real.sum(1)
            for r, i in enumerate(b.rows):
                want[i] = float(mean[r])
        assert got[side] == pytest.approx(want, abs=1e-4)
