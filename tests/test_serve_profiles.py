"""Per-user steering in `steerable serve` (`--profiles`), driven live with the official `openai` client.

The tiny Llama saved as a Hugging Face directory serves two small profile libraries (`prefs`, 20 users, and
`other`, 4 users) built from seeded random bases and weights; a preset and the default plan name `prefs`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
import pytest
import torch

from steerable.cli.main import main
from steerable.directions.calibrate import calibrate, model_meta
from steerable.directions.profiles import ProfileLibrary, save_profiles
from steerable.generation import generate
from steerable.models.load import load_model
from steerable.serve.auth import ApiKeys
from steerable.serve.config import Limits, ServeConfig
from steerable.serve.profiles import ProfileShelf
from tests.conftest import tiny_handle
from tests.test_serve import CHAT, Live
from tests.test_steering import EX

ADMIN, LIMITED, NOPROF = "sk-admin-0123456789", "sk-limited-0123456789", "sk-noprof-0123456789"
PERSONAL = {"profile": "prefs", "strength": 4.0, "layers": "1-2"}
USERS = [f"u{i}" for i in range(20)]


def make_library(handle, users: list[str], seed: int, layers=(1, 2), k: int = 3) -> ProfileLibrary:
    g = torch.Generator().manual_seed(seed)
    n, d = len(layers), handle.hidden_size
    basis = torch.linalg.qr(torch.randn(n, d, k, generator=g)).Q.transpose(1, 2).contiguous()  # [L, K, d]
    return ProfileLibrary(
        layers=list(layers), population=torch.randn(n, d, generator=g), basis=basis,
        phi_mean=0.1 * torch.randn(n, k, generator=g), theta_pop=torch.zeros(n, k), users=users,
        pair_counts=[5] * len(users), theta=2.0 * torch.randn(len(users), n, k, generator=g),
        dislike=torch.randn(len(users), n, k, generator=g),
        meta={"model": model_meta(handle), "site": "resid_post", "position": "response-mean"})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-profiles")
    h = tiny_handle("llama")
    h.model.save_pretrained(root / "tiny")
    h.tokenizer.save_pretrained(root / "tiny")
    from steerable.directions.artifact import save_directions

    vectors = root / "vectors"
    save_directions(calibrate(h, EX, position="last", progress=False), vectors / "nice.safetensors")
    profiles = root / "profiles"
    save_profiles(make_library(h, USERS, 1), profiles / "prefs.safetensors")
    save_profiles(make_library(h, ["a", "b", "c", "d"], 2), profiles / "other.safetensors")
    presets = root / "presets"
    presets.mkdir()
    # as an operator writes it: the library by its path, matched to the served one by file name
    (presets / "personal.json").write_text(json.dumps({**PERSONAL, "profile": str(profiles / "prefs.safetensors")}))
    keys = root / "keys.json"
    keys.write_text(json.dumps({ADMIN: "*",
                                LIMITED: {"vectors": ["nice"], "presets": ["personal"], "profiles": ["other"]},
                                NOPROF: {"vectors": ["nice"], "presets": []}}))
    return {"model": root / "tiny", "vectors": vectors, "profiles": profiles, "presets": presets, "keys": keys,
            "prefs": profiles / "prefs.safetensors", "root": root}


def _config(files, batching: str) -> ServeConfig:
    return ServeConfig(model=str(files["model"]), vectors=files["vectors"], presets=files["presets"],
                       default_plan="personal", api_keys=files["keys"],
                       profiles=(files["prefs"], files["profiles"] / "other.safetensors"),
                       limits=Limits(max_tokens=32, max_batch=16, max_queue=64, batch_window=0.05, batching=batching))


@pytest.fixture(scope="module")
def server(files):
    live = Live(_config(files, "continuous"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def dynamic_server(files):
    live = Live(_config(files, "dynamic"))
    yield live
    live.stop()


def chat(live: Live, steering=..., key: str = ADMIN, user: str | None = None, max_tokens: int = 10, **extra):
    body = {} if steering is ... else {"steering": steering}
    body.update(extra)
    kw = {} if user is None else {"user": user}
    return live.client(key).chat.completions.create(model="tiny", messages=CHAT, max_tokens=max_tokens,
                                                    extra_body=body, **kw)


def text(reply) -> str:
    return reply.choices[0].message.content


def use(user: str | None, fallback: bool, profile: str = "prefs", composition: str = "personalised") -> dict:
    return {"profile": profile, "user": user, "composition": composition, "fallback": fallback}


# -- the user field ------------------------------------------------------------------------------------


def test_models_list_the_profile_libraries_a_key_may_use(server):
    assert server.client().models.list().data[0].model_extra["steering"]["profiles"] == ["other", "prefs"]
    assert server.client(LIMITED).models.list().data[0].model_extra["steering"]["profiles"] == ["other"]
    assert server.client(NOPROF).models.list().data[0].model_extra["steering"]["profiles"] == []


def test_the_user_field_picks_the_users_vector_as_the_library_composes_it(server, files):
    r = chat(server, PERSONAL, user="u3")
    assert r.model_extra["steering"] == {"plan": "request", "user": "u3", "profile_fallback": False,
                                         "profiles": [use("u3", False)]}
    handle = load_model(str(files["model"]))
    offline = generate(handle, [CHAT], {**PERSONAL, "profile": str(files["prefs"]), "user": "u3"}, max_new_tokens=10)
    assert text(r) == offline[0]
    # steering.user (the plan entry's own user) wins over the OpenAI field
    own = chat(server, {**PERSONAL, "user": "u7"}, user="u3")
    assert own.model_extra["steering"]["user"] == "u7"
    assert text(own) == text(chat(server, PERSONAL, user="u7"))
    replies = {text(chat(server, PERSONAL, user=u)) for u in USERS[:8]}
    assert len(replies) >= 4, "the users' vectors should steer differently"
    dislike = chat(server, {**PERSONAL, "composition": "dislike_weighted"}, user="u3")
    assert dislike.model_extra["steering"]["profiles"] == [use("u3", False, composition="dislike_weighted")]


def test_a_user_not_in_the_library_falls_back_to_the_population_and_is_told(server):
    r = chat(server, PERSONAL, user="nobody")
    assert r.model_extra["steering"]["profile_fallback"] is True
    assert r.model_extra["steering"]["profiles"] == [use("nobody", True)]
    population = chat(server, {**PERSONAL, "composition": "population"}, user="u3")
    assert population.model_extra["steering"]["profile_fallback"] is False  # asked for: not a fallback
    assert text(r) == text(population)
    no_user = chat(server, PERSONAL)
    assert no_user.model_extra["steering"]["profiles"] == [use(None, True)]
    assert text(no_user) == text(r)
    assert text(chat(server, PERSONAL, user="")) == text(r)  # an empty OpenAI user is no user
    assert text(r) != text(chat(server, PERSONAL, user="u3"))


def test_preset_and_default_plan_with_a_profile_are_composed_per_request(server):
    explicit = text(chat(server, PERSONAL, user="u5"))
    default = chat(server, user="u5")  # no steering field: the default plan, preset "personal"
    assert default.model_extra["steering"]["plan"] == "default"
    assert default.model_extra["steering"]["user"] == "u5"
    assert text(default) == explicit
    preset = chat(server, {"preset": "personal"}, user="u5")
    assert preset.model_extra["steering"] == {"plan": "preset", "preset": "personal", "user": "u5",
                                              "profile_fallback": False, "profiles": [use("u5", False)]}
    assert text(preset) == explicit
    assert text(chat(server, {"preset": "personal", "user": "u5"}, user="u9")) == explicit
    assert chat(server, user="stranger").model_extra["steering"]["profile_fallback"] is True
    assert chat(server, None, user="u5").model_extra["steering"] == {"plan": "none"}


async def _send(client: openai.AsyncOpenAI, user: str, stream: bool) -> tuple[str, dict]:
    kw = {"model": "tiny", "messages": CHAT, "max_tokens": 12, "user": user, "extra_body": {"steering": PERSONAL}}
    if not stream:
        r = await client.chat.completions.create(**kw)
        return r.choices[0].message.content or "", r.model_extra["steering"]
    out, steering = "", {}
    async for ch in await client.chat.completions.create(**kw, stream=True):
        if ch.choices:
            out += ch.choices[0].delta.content or ""
            steering = ch.model_extra.get("steering") or steering
    return out, steering


@pytest.mark.parametrize("mode", ["continuous", "dynamic"])
def test_a_batch_of_16_users_each_equals_that_user_served_alone(mode, request):
    live = request.getfixturevalue("server" if mode == "continuous" else "dynamic_server")
    users = [*USERS[:14], "nobody", "stranger"]  # two fall back, in the same batch
    before = live.metric("steerable_serve_batches_total")

    async def together():
        async with openai.AsyncOpenAI(api_key=ADMIN, base_url=live.url, max_retries=0) as client:
            return await asyncio.gather(*(_send(client, u, i % 3 == 0) for i, u in enumerate(users)))

    batched = asyncio.run(together())
    batches = live.metric("steerable_serve_batches_total") - before
    assert batches < len(users), f"{len(users)} requests ran in {batches} batches: they were not batched"

    async def alone():
        async with openai.AsyncOpenAI(api_key=ADMIN, base_url=live.url, max_retries=0) as client:
            return [await _send(client, u, False) for u in users]

    for u, a, b in zip(users, batched, asyncio.run(alone()), strict=True):
        assert a[0] == b[0], f"user {u}: batched reply differs from the reply served alone"
        assert a[1] == b[1]
        assert a[1]["profile_fallback"] is (u in ("nobody", "stranger"))
    assert len({a[0] for a in batched}) >= 6


# -- keys and bad input --------------------------------------------------------------------------------


def test_keys_may_be_limited_to_profile_libraries(server):
    assert chat(server, {**PERSONAL, "profile": "other"}, key=LIMITED, user="a").choices
    with pytest.raises(openai.PermissionDeniedError, match="prefs"):
        chat(server, PERSONAL, key=LIMITED, user="u1")
    with pytest.raises(openai.PermissionDeniedError, match="no-such"):  # refused before existence is checked
        chat(server, {**PERSONAL, "profile": "no-such"}, key=LIMITED)
    with pytest.raises(openai.PermissionDeniedError):
        chat(server, {**PERSONAL, "profile": "other"}, key=NOPROF)
    # the operator's preset and default plan name `prefs`: a key granted the preset may use it
    assert chat(server, {"preset": "personal"}, key=LIMITED, user="u1").model_extra["steering"]["user"] == "u1"
    assert chat(server, key=NOPROF, user="u1").model_extra["steering"]["plan"] == "default"


BAD = [
    ({"steering": {**PERSONAL, "profile": "no-such"}}, "unknown profile library"),
    ({"steering": {**PERSONAL, "profile": "../prefs"}}, "file paths are refused"),
    ({"steering": {**PERSONAL, "profile": 5}}, "profile"),
    ({"steering": {**PERSONAL, "user": 5}}, "user"),
    ({"steering": {**PERSONAL, "user": ""}}, "user"),
    ({"steering": {**PERSONAL, "user": ["u1"]}}, "user"),
    ({"steering": {**PERSONAL, "user": "x" * 300}}, "user"),
    ({"steering": {**PERSONAL, "vector": "nice"}}, "not both"),
    ({"steering": {**PERSONAL, "composition": "bogus"}}, "composition"),
    ({"steering": {"vector": "nice", "user": "u1"}}, "profile"),
    ({"steering": {**PERSONAL, "method": "ablate"}}, "add"),
    ({"steering": {**PERSONAL, "layers": "top:1"}}, "layers"),
    ({"steering": {**PERSONAL, "layers": [3]}}, "layer 3"),
    ({"steering": {"method": "conditional", "vector": "nice", "layer": 1, "threshold": 0.0,
                   "then": {**PERSONAL, "user": 7}}}, "user"),
    ({"steering": {"preset": "personal", "user": 5}}, "steering.user"),
    ({"steering": {"preset": "personal", "user": "u1", "strength": 2}}, "no other keys"),
    ({"user": 5}, "user"),
    ({"user": {"id": "u1"}}, "user"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_profile_input_is_a_400_naming_it(server, extra, message):
    status, _, body = server.raw("POST", "/v1/chat/completions",
                                 {"model": "tiny", "messages": CHAT, "max_tokens": 2, "user": "u1", **extra})
    err = json.loads(body)["error"]
    assert status == 400, err
    assert message in err["message"], err["message"]


def test_unknown_profile_through_the_openai_client(server):
    with pytest.raises(openai.BadRequestError, match="unknown profile library 'nope'"):
        chat(server, {**PERSONAL, "profile": "nope"}, user="u1")


# -- start-up and memory -------------------------------------------------------------------------------


def test_start_up_checks_each_library_against_the_model(files, tmp_path, capsys):
    model, vectors = str(files["model"]), str(files["vectors"])
    serve = ["serve", "--model", model, "--vectors", vectors]
    wrong = make_library(tiny_handle("qwen2"), ["x"], 3)
    save_profiles(wrong, tmp_path / "wrong.safetensors")
    assert main([*serve, "--profiles", str(tmp_path / "wrong.safetensors")]) == 2
    assert "mismatch" in capsys.readouterr().err
    assert main([*serve, "--profiles", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    assert main([*serve, "--profiles", str(tmp_path / "junk.safetensors")]) == 2
    assert "junk.safetensors" in capsys.readouterr().err
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({**PERSONAL, "profile": "unserved"}))
    assert main([*serve, "--default-plan", str(plan)]) == 2
    assert "unserved" in capsys.readouterr().err
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({ADMIN: {"profiles": ["../x"]}}))
    assert main([*serve, "--api-keys", str(keys)]) == 2
    assert "profile library" in capsys.readouterr().err
    assert ApiKeys.load(files["keys"]).check(f"Bearer {LIMITED}").profiles == frozenset({"other"})


def test_the_composed_vectors_are_cached_in_a_small_lru(files):
    handle = load_model(str(files["model"]))
    shelf = ProfileShelf.load([files["profiles"]], handle, cache_size=4)
    assert shelf.names == ["other", "prefs"]
    for u in USERS + [f"stranger{i}" for i in range(50)]:
        _, fallback = shelf.compose("prefs", u, "personalised")
        assert fallback is (u not in USERS)
    assert len(shelf._cache) == 4
    # strangers share the population's entry: no per-user state for users the library lacks
    assert shelf.compose("prefs", "stranger1", "personalised")[0] is shelf.compose("prefs", "zzz", "personalised")[0]
    a = shelf.compose("prefs", "u3", "personalised")[0]
    assert torch.allclose(a.mean_pos, shelf.library("prefs").vectors("u3")[0])
