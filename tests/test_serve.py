"""`steerable serve`, driven live on 127.0.0.1 with the official `openai` client and raw HTTP.

Two servers run in this process (each its own model copy and worker thread) on the tiny Llama saved as a
Hugging Face directory: `main` (presets, a default plan, API keys, batches of 16) and `small` (batches of
1, a queue of 2, a short timeout) for back-pressure, disconnects and timeouts.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from steerable.cli.main import main
from steerable.data.loaders import Example
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.generation import generate
from steerable.models.load import load_model
from steerable.serve.config import Limits, ServeConfig
from steerable.serve.server import ServerState, uvicorn_server
from tests.conftest import tiny_handle
from tests.test_steering import EX

ADMIN, LIMITED = "sk-admin-0123456789", "sk-limited-0123456789"
OTHER_EX = [Example(p, None, i % 2, i // 2) for i, p in enumerate(
    ["sing a song", "shout a song", "whisper softly", "yell loudly", "calm waters", "stormy waters"])]
DEFAULT = {"strength": 3.0, "layers": "1-2"}
CALM = {"vector": "nice", "method": "ablate", "layers": "all"}
CHAT = [{"role": "user", "content": "Say something nice"}]


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    h = tiny_handle("llama")
    h.model.save_pretrained(root / "tiny")
    h.tokenizer.save_pretrained(root / "tiny")
    vectors = root / "vectors"
    save_directions(calibrate(h, EX, position="last", progress=False), vectors / "nice.safetensors")
    save_directions(calibrate(h, OTHER_EX, position="last", progress=False), vectors / "other.safetensors")
    presets = root / "presets"
    presets.mkdir()
    (presets / "calm.json").write_text(json.dumps(CALM))
    # as `steerable tune --out` writes it: the vector as a path, matched to the library by file name
    default = root / "default-plan.json"
    default.write_text(json.dumps({"vector": str(vectors / "nice.safetensors"), **DEFAULT}))
    keys = root / "keys.json"
    keys.write_text(json.dumps({ADMIN: "*", LIMITED: {"vectors": ["nice"], "presets": []}}))
    return {"root": root, "model": root / "tiny", "vectors": vectors, "presets": presets, "default": default,
            "keys": keys}


class Live:
    def __init__(self, config: ServeConfig) -> None:
        self.state = ServerState.load(config)
        self.server = uvicorn_server(self.state, "127.0.0.1", 0)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, key: str | None = ADMIN, **kw) -> openai.OpenAI:
        return openai.OpenAI(api_key=key or "none", base_url=self.url, max_retries=0, **kw)

    def raw(self, method: str, path: str, body: bytes | str | dict | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        data = json.dumps(body).encode() if isinstance(body, dict | list) else body
        data = data.encode() if isinstance(data, str) else data
        hdrs = {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN}", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        conn.close()
        return out

    def metric(self, name: str) -> float:
        _, _, text = self.raw("GET", "/metrics")
        m = re.search(rf"^{re.escape(name)} (\S+)$", text.decode(), re.M)
        return float(m.group(1)) if m else 0.0

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def main_server(files):
    live = Live(ServeConfig(model=str(files["model"]), vectors=files["vectors"], presets=files["presets"],
                            default_plan=str(files["default"]), api_keys=files["keys"],
                            limits=Limits(max_tokens=64, max_prompt_tokens=200, max_batch=16, max_queue=64,
                                          max_body_bytes=64 * 1024, batch_window=0.05)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def small_server(files):
    live = Live(ServeConfig(model=str(files["model"]), vectors=files["vectors"],
                            limits=Limits(max_tokens=200, max_batch=1, max_queue=2, timeout=1.5)))
    yield live
    live.stop()


def chat(live: Live, steering=..., key: str = ADMIN, messages=CHAT, **kw):
    extra = {} if steering is ... else {"steering": steering}
    extra.update(kw.pop("extra", {}))
    return live.client(key).chat.completions.create(model="tiny", messages=messages,
                                                    max_tokens=kw.pop("max_tokens", 12), extra_body=extra, **kw)


# -- the OpenAI surface --------------------------------------------------------------------------------


def test_models_health_and_metrics(main_server):
    models = main_server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    steering = models.data[0].model_extra["steering"]
    assert steering == {"vectors": ["nice", "other"], "presets": ["calm"], "default_plan": True}
    limited = main_server.client(LIMITED).models.list().data[0].model_extra["steering"]
    assert limited["vectors"] == ["nice"]
    assert limited["presets"] == []
    status, _, body = main_server.raw("GET", "/health", headers={"Authorization": ""})
    assert status == 200
    assert json.loads(body)["status"] == "ok"
    status, headers, body = main_server.raw("GET", "/metrics", headers={"Authorization": ""})
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    for name in ("requests_total", "generated_tokens_total", "queue_depth", "batch_size_bucket",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket", "errors_total"):
        assert f"steerable_serve_{name}" in body.decode()


def test_chat_stream_and_plain_agree_and_match_the_library(main_server, files):
    plan = {"vector": "nice", "strength": 4.0, "layers": "1-3"}
    plain = chat(main_server, plan, max_tokens=10)
    assert plain.object == "chat.completion"
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 10
    assert plain.usage.prompt_tokens > 0
    assert plain.model_extra["steering"] == {"plan": "request"}
    chunks = list(main_server.client().chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=10, stream=True, extra_body={"steering": plan},
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    # the server's tokens are the library's: generate() with the same plan on the same model
    handle = load_model(str(files["model"]))
    lib = generate(handle, [CHAT], {**plan, "vector": str(files["vectors"] / "nice.safetensors")},
                   max_new_tokens=10)
    assert lib[0] == plain.choices[0].message.content
    unsteered = chat(main_server, None, max_tokens=10).choices[0].message.content
    assert unsteered == generate(handle, [CHAT], max_new_tokens=10)[0] != lib[0]


def test_completions_endpoint_plain_and_streamed(main_server):
    client = main_server.client()
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8,
                                     extra_body={"steering": None})
    assert done.object == "text_completion"
    assert done.usage.completion_tokens <= 8
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, stream=True,
                                            extra_body={"steering": None}))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    assert chunks[-1].model_extra["steering"] == {"plan": "none"}


def test_default_plan_presets_and_switching_off(main_server):
    default = chat(main_server)  # no steering field: the server's default plan
    assert default.model_extra["steering"] == {"plan": "default"}
    same = chat(main_server, {"vector": "nice", **DEFAULT})
    assert default.choices[0].message.content == same.choices[0].message.content
    assert chat(main_server, {"preset": "default"}).choices[0].message.content == same.choices[0].message.content
    off = chat(main_server, None)
    assert off.model_extra["steering"] == {"plan": "none"}
    assert chat(main_server, {"preset": "none"}).choices[0].message.content == off.choices[0].message.content
    assert off.choices[0].message.content != default.choices[0].message.content
    calm = chat(main_server, {"preset": "calm"})
    assert calm.model_extra["steering"] == {"plan": "preset", "preset": "calm"}
    assert calm.choices[0].message.content == chat(main_server, CALM).choices[0].message.content


def test_monitor_projection_in_response_and_final_chunk(main_server):
    r = chat(main_server, None, max_tokens=8, extra={"steering_monitor": {"vector": "nice", "layer": 2}})
    mon = r.model_extra["steering"]["monitor"]
    assert mon["vector"] == "nice"
    assert mon["layer"] == 2
    assert mon["site"] == "resid_post"
    assert isinstance(mon["projection"], float)
    assert mon["tokens"] == r.usage.completion_tokens - 1
    assert len(mon["band"]) == 2
    assert mon["drift"] >= 0
    chunks = list(main_server.client().chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=8, stream=True,
        extra_body={"steering": None, "steering_monitor": {"vector": "nice", "layer": 2}}))
    assert chunks[-1].model_extra["steering"]["monitor"] == mon
    steered = chat(main_server, {"vector": "nice", "strength": 8.0, "layers": [1]}, max_tokens=8,
                   extra={"steering_monitor": {"vector": "nice", "layer": 2}})
    assert steered.model_extra["steering"]["monitor"]["projection"] != mon["projection"]


def test_stop_strings_and_seeded_sampling(main_server):
    full = chat(main_server, None, max_tokens=20).choices[0].message.content
    stop = full[6:8]
    cut = full[: full.find(stop)]
    r = chat(main_server, None, max_tokens=20, stop=[stop, "never-seen"])
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    streamed = main_server.client().chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, stop=stop,
                                                            stream=True, extra_body={"steering": None})
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    a = chat(main_server, None, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    b = chat(main_server, None, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_api_keys(main_server):
    with pytest.raises(openai.AuthenticationError):
        main_server.client("sk-wrong-000000000").models.list()
    status, _, body = main_server.raw("POST", "/v1/chat/completions", {"model": "tiny", "messages": CHAT},
                                      headers={"Authorization": ""})
    assert status == 401
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert chat(main_server, {"vector": "nice"}, key=LIMITED).choices  # granted
    with pytest.raises(openai.PermissionDeniedError, match="other"):
        chat(main_server, {"vector": "other"}, key=LIMITED)
    with pytest.raises(openai.PermissionDeniedError, match="other"):  # a condition's vector counts too
        chat(main_server, {"method": "conditional", "vector": "other", "layer": 1, "threshold": 0.0,
                           "then": {"vector": "nice"}}, key=LIMITED)
    with pytest.raises(openai.PermissionDeniedError, match="calm"):
        chat(main_server, {"preset": "calm"}, key=LIMITED)
    with pytest.raises(openai.PermissionDeniedError):
        chat(main_server, None, key=LIMITED, extra={"steering_monitor": {"vector": "other"}})
    with pytest.raises(openai.PermissionDeniedError):  # not granted: refused before the library is consulted
        chat(main_server, {"vector": "no-such-vector"}, key=LIMITED)
    # the operator's default plan applies whatever the key
    assert chat(main_server, key=LIMITED).model_extra["steering"] == {"plan": "default"}


# -- the batching invariant ----------------------------------------------------------------------------

PLANS = [
    ..., None, {"preset": "calm"}, {"preset": "none"}, {"vector": "nice", "strength": 1.0},
    {"vector": "nice", "strength": 6.0, "layers": "1-2"},
    {"vector": "other", "method": "ablate", "layers": "all"},
    {"vector": "nice", "method": "cap", "cap_floor": "p50"},
    {"vector": "other", "strength": 4.0, "gate": "generated"},
    {"vector": "nice", "strength": 4.0, "gate": "prompt+first:3"},
    {"vector": "nice", "strength": 5.0, "gate": "assistant"},
    {"method": "conditional", "vector": "other", "layer": 1, "threshold": 0.0,
     "then": {"vector": "nice", "strength": 5.0}},
    [{"vector": "nice", "strength": 2.0}, {"vector": "other", "method": "ablate", "layers": [3]}],
    {"vector": "nice", "method": "angular", "angle": 60, "layers": "all", "strength": 0.5},
]
PROMPTS = ["Say something nice", "What is the capital of France?", "Count to five", "hi",
           "Tell me a long story about a dragon who learns to paint", "Why is the sky blue?"]


def _request(i: int) -> dict:
    """Request i of the mix: chat or completion, streamed or not, with its own plan, length and stop."""
    plan = PLANS[i % len(PLANS)]
    body: dict = {"model": "tiny", "max_tokens": 4 + (i * 7) % 21}
    if i % 5 == 4:
        body["prompt"] = PROMPTS[i % len(PROMPTS)]
    else:
        msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        if i % 3 == 0:  # multi-turn, so the assistant gate has an earlier reply to steer
            msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                    {"role": "assistant", "content": "hi there"}, *msgs]
        body["messages"] = msgs
    extra = {} if plan is ... else {"steering": plan}
    if i % 4 == 1:
        extra["steering_monitor"] = {"vector": "other", "layer": 2}
    if i % 6 == 2:
        body["stop"] = ["\x13L"]
    body["stream"] = i % 2 == 1
    return {"body": body, "extra": extra}


async def _send(client: openai.AsyncOpenAI, req: dict) -> tuple[str, str, int, dict | None]:
    body, extra = dict(req["body"]), req["extra"]
    stream = body.pop("stream")
    api = client.completions if "prompt" in body else client.chat.completions
    if not stream:
        r = await api.create(**body, extra_body=extra)
        c = r.choices[0]
        return (c.text if "prompt" in body else c.message.content), c.finish_reason, r.usage.completion_tokens, \
            r.model_extra["steering"].get("monitor")
    text, finish, mon = "", None, None
    async for ch in await api.create(**body, stream=True, stream_options={"include_usage": True}, extra_body=extra):
        if ch.choices:
            c = ch.choices[0]
            text += (c.text if "prompt" in body else c.delta.content) or ""
            finish = c.finish_reason or finish
        else:
            usage, mon = ch.usage.completion_tokens, ch.model_extra["steering"].get("monitor")
    return text, finish, usage, mon


def test_concurrent_responses_equal_each_served_alone(main_server):
    requests = [_request(i) for i in range(40)]
    batches_before = main_server.metric("steerable_serve_batches_total")

    async def together():
        async with openai.AsyncOpenAI(api_key=ADMIN, base_url=main_server.url, max_retries=0) as client:
            return await asyncio.gather(*(_send(client, r) for r in requests))

    steps_before = main_server.metric("steerable_serve_decode_steps_total")
    tokens_before = main_server.metric("steerable_serve_generated_tokens_total")
    concurrent = asyncio.run(together())
    batches = main_server.metric("steerable_serve_batches_total") - batches_before
    steps = main_server.metric("steerable_serve_decode_steps_total") - steps_before
    tokens = main_server.metric("steerable_serve_generated_tokens_total") - tokens_before
    # (continuous batching admits the later requests as rows free up, a few at a time: more admissions)
    assert batches < 40, f"40 concurrent requests ran in {batches} batches: they were not batched"
    assert steps * 3 < tokens, f"{tokens} tokens took {steps} forward passes: the requests did not share them"

    async def alone():
        async with openai.AsyncOpenAI(api_key=ADMIN, base_url=main_server.url, max_retries=0) as client:
            return [await _send(client, r) for r in requests]

    serial = asyncio.run(alone())
    assert main_server.metric("steerable_serve_batches_total") - batches_before == batches + 40
    for i, (a, b) in enumerate(zip(concurrent, serial, strict=True)):
        assert a[:3] == b[:3], f"request {i} ({requests[i]}) differs under concurrency"
        if a[3] is not None:
            assert a[3]["tokens"] == b[3]["tokens"]
            assert a[3]["projection"] == pytest.approx(b[3]["projection"], abs=1e-4)
    assert len({a[0] for a in concurrent}) > 10  # the plans really differ


# -- hostile and malformed payloads --------------------------------------------------------------------

OK = {"model": "tiny", "messages": CHAT, "max_tokens": 2}
BAD = [
    (b'{"model": "tiny", "messages": ', 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "not UTF-8"),
    ([1, 2, 3], 400, "must be a JSON object"),
    ({**OK, "messages": "hi"}, 400, "messages"),
    ({**OK, "messages": []}, 400, "messages"),
    ({**OK, "messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ({**OK, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages"),
    ({**OK, "max_tokens": "5"}, 400, "max_tokens"),
    ({**OK, "max_tokens": 1e12}, 400, "max_tokens"),
    ({**OK, "max_tokens": 10**12}, 400, "at most 64"),
    ({**OK, "max_tokens": 10**400}, 400, "max_tokens"),
    ({**OK, "max_tokens": -1}, 400, "max_tokens"),
    ({**OK, "max_tokens": True}, 400, "max_tokens"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "NaN"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 1e999}', 400, "out of range"),
    ({**OK, "temperature": 7}, 400, "temperature"),
    ({**OK, "top_p": 0}, 400, "top_p"),
    ({**OK, "seed": 2**80}, 400, "seed"),
    ({**OK, "n": 2}, 400, "n"),
    ({**OK, "stream": "yes"}, 400, "stream"),
    ({**OK, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({**OK, "stop": [""]}, 400, "stop"),
    ({**OK, "colour": "blue"}, 400, "Unrecognized request argument supplied: colour"),
    ({**OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools is not supported"),
    ({**OK, "logprobs": True}, 400, "logprobs is not supported"),
    ({**OK, "model": "gpt-4"}, 404, "does not exist"),
    ({**OK, "messages": [{"role": "user", "content": "x" * 5000}]}, 400, "at most 200"),
    ({**OK, "steering": {"vector": "../x"}}, 400, "file paths are refused"),
    ({**OK, "steering": {"vector": "/etc/passwd"}}, 400, "file paths are refused"),
    ({**OK, "steering": {"vector": "..\\..\\x"}}, 400, "file paths are refused"),
    ({**OK, "steering": {"vector": "nice.safetensors/../../etc"}}, 400, "file paths are refused"),
    ({**OK, "steering": {"vector": ["nice", "/etc/passwd"], "method": "cap"}}, 400, "file paths are refused"),
    ({**OK, "steering": {"vector": "nope"}}, 400, "unknown vector 'nope'"),
    ({**OK, "steering": {"vector": "nice", "colour": 1}}, 400, "unknown plan key"),
    ({**OK, "steering": {"vector": "nice", "strength": 1e300}}, 400, "out of range"),
    ({**OK, "steering": {"vector": "nice", "strength": "big"}}, 400, "strength must be a number"),
    ({**OK, "steering": {"vector": "nice", "layers": "0-99"}}, 400, "out of range"),
    ({**OK, "steering": {"vector": "nice", "method": "shout"}}, 400, "unknown method"),
    ({**OK, "steering": "nice"}, 400, "steering must be a plan"),
    ({**OK, "steering": 5}, 400, "steering must be a plan"),
    ({**OK, "steering": []}, 400, "empty list"),
    ({**OK, "steering": [{"vector": "nice"}] * 40}, 400, "more than 32"),
    ({**OK, "steering": {"preset": "../calm"}}, 400, "unknown preset"),
    ({**OK, "steering": {"preset": "calm", "strength": 2}}, 400, "takes no other keys"),
    ({**OK, "steering_monitor": {"vector": "nice", "layer": 99}}, 400, "calibrated layers"),
    ({**OK, "steering_monitor": {"vector": "../../etc/passwd"}}, 400, "file paths are refused"),
    ({**OK, "steering_monitor": "nice"}, 400, "steering_monitor"),
    (b"[" * 20000 + b"]" * 20000, 400, "not valid JSON"),
    ({**OK, "messages": [{"role": "user", "content": "x" * 70000}]}, 413, "exceeds this server's limit"),
]


@pytest.mark.parametrize(("payload", "status", "message"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_hostile_payloads_get_a_clear_4xx(main_server, payload, status, message):
    got, _headers, body = main_server.raw("POST", "/v1/chat/completions", payload)
    err = json.loads(body)["error"]
    assert got == status, err
    assert message in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_server_keeps_serving_after_abuse(main_server):
    for path in ("/v1/nowhere", "/etc/passwd"):
        status, _, body = main_server.raw("GET", path)
        assert status == 404
        assert json.loads(body)["error"]["message"]
    status, _, body = main_server.raw("GET", "/v1/chat/completions")
    assert status == 405
    assert "error" in json.loads(body)
    status, _, body = main_server.raw("POST", "/v1/completions", {"model": "tiny", "prompt": ["a", "b"]})
    assert status == 400
    assert "exactly one" in json.loads(body)["error"]["message"]
    # a lying Content-Length far beyond the limit is refused before any body is read
    status, _, _ = main_server.raw("POST", "/v1/chat/completions", b"{}", headers={"Content-Length": "999999999"})
    assert status == 413
    assert chat(main_server, None, max_tokens=3).choices[0].message.content is not None
    assert main_server.metric('steerable_serve_errors_total{kind="invalid_request"}') >= len(BAD) - 3


# -- back-pressure, disconnects, timeouts --------------------------------------------------------------


def test_full_queue_answers_429_with_retry_after(small_server):
    gate = threading.Event()
    # the worker's first forward pass waits for the gate (either batching mode: the worker is held)
    def hold(*_):
        gate.wait(10)  # (a pre-hook returning a value would replace the forward's arguments)

    hook = small_server.state.handle.model.register_forward_pre_hook(hold)
    results: list = []
    try:
        threads = [threading.Thread(target=lambda: results.append(
            small_server.raw("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})))
            for _ in range(3)]
        for t in threads:  # one is taken by the (held) worker, two wait: the queue is full
            t.start()
            time.sleep(0.15)
        deadline = time.monotonic() + 10
        while small_server.state.scheduler.depth < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        status, headers, body = small_server.raw("POST", "/v1/completions", {"model": "tiny", "prompt": "x"})
        assert status == 429
        assert int(headers["retry-after"]) >= 1
        assert json.loads(body)["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            small_server.client().completions.create(model="tiny", prompt="x")
    finally:
        gate.set()
        hook.remove()
    for t in threads:
        t.join(20)
    assert [r[0] for r in results] == [200, 200, 200]


def _slow(live: Live, seconds: float):
    """Make every forward pass of the server's model take `seconds` longer (registered while it is idle)."""
    return live.state.handle.model.register_forward_pre_hook(lambda *_: time.sleep(seconds))


def test_disconnecting_stream_stops_its_generation(small_server):
    tokens0 = small_server.metric("steerable_serve_generated_tokens_total")
    cancelled0 = small_server.metric('steerable_serve_cancelled_total{reason="disconnect"}')
    hook = _slow(small_server, 0.01)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", small_server.port, timeout=10)
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": "tiny", "prompt": "Once", "max_tokens": 200, "stream": True}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 10
        while small_server.metric('steerable_serve_cancelled_total{reason="disconnect"}') == cancelled0:
            assert time.monotonic() < deadline, "the server did not notice the client leaving"
            time.sleep(0.05)
        while small_server.metric("steerable_serve_running_rows") > 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        hook.remove()
    generated = small_server.metric("steerable_serve_generated_tokens_total") - tokens0
    assert generated < 150, f"the abandoned stream went on generating ({generated} tokens)"
    assert small_server.client().completions.create(model="tiny", prompt="x", max_tokens=2).choices


def test_disconnecting_plain_request_stops_its_generation(small_server):
    cancelled0 = small_server.metric('steerable_serve_cancelled_total{reason="disconnect"}')
    hook = _slow(small_server, 0.01)
    try:
        sock = socket.create_connection(("127.0.0.1", small_server.port))
        body = json.dumps({"model": "tiny", "prompt": "Once", "max_tokens": 200}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 10
        while small_server.metric("steerable_serve_running_rows") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        sock.close()
        while small_server.metric('steerable_serve_cancelled_total{reason="disconnect"}') == cancelled0:
            assert time.monotonic() < deadline, "the server did not notice the client leaving"
            time.sleep(0.05)
        while small_server.metric("steerable_serve_running_rows") > 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        hook.remove()


def test_a_failing_batch_answers_500_and_the_server_goes_on(small_server):
    def boom(*_):
        raise RuntimeError("simulated device failure")

    hook = small_server.state.handle.model.register_forward_pre_hook(boom)
    try:
        with pytest.raises(openai.InternalServerError, match="internal error"):
            small_server.client().completions.create(model="tiny", prompt="x", max_tokens=2)
    finally:
        hook.remove()
    assert small_server.client().completions.create(model="tiny", prompt="x", max_tokens=2).choices


def test_slow_request_times_out_with_504(small_server):
    hook = _slow(small_server, 0.3)
    try:
        t = time.monotonic()
        status, _, body = small_server.raw("POST", "/v1/completions", {"model": "tiny", "prompt": "Once",
                                                                       "max_tokens": 200})
        assert status == 504
        assert json.loads(body)["error"]["code"] == "timeout"
        assert time.monotonic() - t < 4
    finally:
        hook.remove()
    time.sleep(0.1)
    assert small_server.metric('steerable_serve_cancelled_total{reason="timeout"}') >= 1 or \
        small_server.metric('steerable_serve_errors_total{kind="timeout"}') >= 1
    assert small_server.client().completions.create(model="tiny", prompt="x", max_tokens=2).choices


# -- pieces --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stop", "expected"), [((), "héllo wörld ☃!"), (("wö",), "héllo "),
                                                (("d ☃", "x"), "héllo wörl"), (("☃!",), "héllo wörld ")])
def test_text_stream_whole_characters_and_stop_strings(stop, expected):
    from steerable.serve.text import TextStream
    from tests.conftest import byte_tokenizer

    tok = byte_tokenizer(chat=True)
    stream = TextStream(tok, stop)
    deltas = []
    for t in tok("héllo wörld ☃!", add_special_tokens=False)["input_ids"]:  # one token per byte
        deltas.append(stream.push(t))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    assert "".join(deltas) == expected
    assert not any("\ufffd" in d for d in deltas)


# -- start-up ------------------------------------------------------------------------------------------


def test_cli_serves_until_terminated(files, tmp_path):
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "steerable.cli.main", "serve", "--model", str(files["model"]),
                                 "--vectors", str(files["vectors"]), "--presets", str(files["presets"]),
                                 "--port", "0", "--max-tokens", "8"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"at (http://127\.0\.0\.1:\d+/v1)", log.read_text())):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        banner = log.read_text()
        assert "vectors" in banner
        assert "nice, other" in banner
        assert "presets: calm" in banner
        client = openai.OpenAI(api_key="none", base_url=m.group(1), max_retries=2)
        reply = client.chat.completions.create(model="tiny", messages=CHAT, extra_body={"steering": {"preset": "calm"}})
        assert reply.usage.completion_tokens <= 8
        assert reply.model_extra["steering"]["preset"] == "calm"
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert proc.wait(20) in (0, -15)
        assert "Traceback" not in log.read_text()


def test_cli_refuses_bad_start_up_files(files, tmp_path, capsys):
    model = str(files["model"])
    assert main(["serve", "--model", model, "--vectors", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    bad = tmp_path / "lib"
    bad.mkdir()
    (bad / "broken.safetensors").write_bytes(b"not a tensor file")
    assert main(["serve", "--model", model, "--vectors", str(bad)]) == 2
    assert "broken.safetensors" in capsys.readouterr().err
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"vector": "/somewhere/else.safetensors"}))
    assert main(["serve", "--model", model, "--vectors", str(files["vectors"]), "--default-plan", str(plan)]) == 2
    assert "not in the vector library" in capsys.readouterr().err
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"short": "*"}))
    assert main(["serve", "--model", model, "--vectors", str(files["vectors"]), "--api-keys", str(keys)]) == 2
    assert "shorter than 8" in capsys.readouterr().err
    assert main(["serve", "--model", model, "--vectors", str(files["vectors"]), "--max-batch", "0"]) == 2
