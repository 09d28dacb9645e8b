"""Hostile input never crashes the server (issue 13): every request ends in a valid answer or a 4xx with the
JSON error body (never a 500 for bad input), and every start-up fault ends in `steerable: error: …` and exit
status 2. One named regression test per class an attacker found, then a fuzz test over random bodies.

The server runs in this process on 127.0.0.1 (uvicorn in a thread, as in tests/test_serve.py), on the tiny
Llama built in memory.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steerable.cli.main import main
from steerable.directions.artifact import save_directions
from steerable.directions.calibrate import calibrate
from steerable.errors import PlanError, SteerableError
from steerable.serve.config import Limits, ServeConfig
from steerable.serve.server import ServerState, uvicorn_server
from steerable.steering.cast import CONDITIONAL_KEYS
from steerable.steering.methods import METHOD_NAMES
from steerable.steering.methods.add import Add
from steerable.steering.plan import PLAN_KEYS
from tests.conftest import tiny_handle
from tests.test_steering import EX

CHAT = [{"role": "user", "content": "Say something nice"}]
ERROR_KEYS = {"message", "type", "param", "code"}
POISON = 1.2345  # an `add` strength the poisoned tests make fail inside the hook


# -- a live server on an in-memory model ---------------------------------------------------------------


class Served:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.server = uvicorn_server(state, "127.0.0.1", 0)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def raw(self, method: str, path: str, body: bytes | str | dict | list | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        data = json.dumps(body).encode() if isinstance(body, dict | list) else body
        data = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        out = resp.status, resp.read()
        conn.close()
        return out

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        status, data = self.raw("POST", path, body)
        return status, json.loads(data)

    def stream(self, body: dict) -> tuple[int, str, list[dict]]:
        """A streamed request: (status, the text of its deltas, every chunk)."""
        status, data = self.raw("POST", "/v1/completions", {**body, "stream": True})
        chunks = [json.loads(line[6:]) for line in data.decode().splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
        return status, text, chunks

    def metric(self, name: str) -> float:
        _, text = self.raw("GET", "/metrics")
        m = re.search(rf"^{re.escape(name)} (\S+)$", text.decode(), re.M)
        return float(m.group(1)) if m else 0.0

    def answered(self) -> float:
        _, text = self.raw("GET", "/metrics")
        return sum(float(v) for v in re.findall(r"^steerable_serve_requests_total\{[^}]*\} (\S+)$", text.decode(),
                                                re.M))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-serve")
    h = tiny_handle("llama")
    vectors = root / "vectors"
    ds = calibrate(h, EX, position="last", progress=False)
    save_directions(ds, vectors / "nice.safetensors")
    # an imported control vector (NaN statistics); files whose axis metadata is malformed never load
    # (start-up refuses them)
    ds.percentiles = torch.full_like(ds.percentiles, float("nan"))
    save_directions(ds, vectors / "imported.safetensors")
    malformed = root / "malformed"
    malformed.mkdir()
    for name, axis in (("badaxis", {"monitor_layer": "middle"}), ("oddaxis", "not an object"),
                       ("boolaxis", {"monitor_layer": True}), ("faraxis", {"monitor_layer": 99})):
        lib = malformed / name
        lib.mkdir()
        _patched(vectors / "nice.safetensors", lib / f"{name}.safetensors", axis)
    return {"root": root, "vectors": vectors, "malformed": malformed}


def _patched(src: Path, dst: Path, axis: Any) -> None:
    """A copy of a direction file with `meta["axis"]` replaced, written past the validator."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    inner = json.loads(meta["steerable"])
    inner["axis"] = axis
    meta["steerable"] = json.dumps(inner)
    save_file(tensors, str(dst), metadata=meta)


def build(files: dict[str, Path], **limits: Any) -> ServerState:
    config = ServeConfig(model="tiny", vectors=files["vectors"],
                         limits=Limits(**{"max_tokens": 8, "max_prompt_tokens": 200, "max_batch": 8,
                                          "batch_window": 0.05, **limits}))
    return ServerState.build(tiny_handle("llama"), config)


@pytest.fixture(scope="module")
def live(files: dict[str, Path]) -> Any:
    served = Served(build(files))
    yield served
    served.stop()


def is_error(status: int, body: Any) -> bool:
    """`body` is the server's JSON error body, for a 4xx or 5xx `status`."""
    if status < 400:
        return False
    return isinstance(body, dict) and set(body) == {"error"} and set(body["error"]) == ERROR_KEYS \
        and isinstance(body["error"]["message"], str)


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`add` with strength POISON passes admission and then raises inside its hook (what it raises, and
    from which decoding step on, set by the test); every other plan is untouched."""
    setting: dict[str, Any] = {"error": PlanError("poisoned plan"), "from_step": 0, "calls": 0}
    apply = Add.apply.__func__  # type: ignore[attr-defined]

    def poisoned(cls: type[Add], h: torch.Tensor, gate: torch.Tensor | None, p: dict) -> torch.Tensor:
        v = p["vector"]
        if bool(torch.isclose(v.norm(dim=-1), torch.tensor(POISON * setting["norm"], dtype=v.dtype),
                              rtol=1e-4).any()):
            setting["calls"] += 1
            if setting["calls"] > setting["from_step"]:
                raise setting["error"]
        return apply(cls, h, gate, p)

    monkeypatch.setattr(Add, "apply", classmethod(poisoned))
    return setting


def _norm(state: ServerState) -> float:
    """|strength·scale·v̂| of an `add` of strength 1 with the nice vector on layer 1 (the poison's marker)."""
    ds = state.library.get("nice")
    return abs(float((ds.mean_pos[ds.row(1)] - ds.mean_neg[ds.row(1)]) @ ds.direction(1)))


# -- one request fails only itself ---------------------------------------------------------------------

VALID = [{"model": "tiny", "prompt": "Once upon", "max_tokens": 8},
         {"model": "tiny", "prompt": "Hello", "max_tokens": 6, "steering": {"vector": "nice", "method": "ablate"}},
         {"model": "tiny", "prompt": "The sea", "max_tokens": 8, "stop": ["zz"],
          "steering": {"vector": "nice", "strength": 2.0, "layers": "0-1"}}]
POISONED = {"model": "tiny", "prompt": "Bad plan", "max_tokens": 8,
            "steering": {"vector": "nice", "method": "add", "strength": POISON, "layers": "1"}}


def _together(live: Served, bodies: list[dict], stream: list[bool]) -> list[tuple[int, Any]]:
    """Send `bodies` so that they are decoded as one batch: a first request holds the worker until all of
    them wait in the queue."""
    results: list[Any] = [None] * len(bodies)
    holding, gate = threading.Event(), threading.Event()

    def held(*_: Any) -> None:  # the worker's next forward pass (the blocker's prefill) waits for the gate
        if not holding.is_set():
            holding.set()
            gate.wait(10)

    def send(i: int) -> None:
        results[i] = live.stream(bodies[i])[:2] if stream[i] else live.post("/v1/completions", bodies[i])

    hook = live.state.handle.model.register_forward_pre_hook(held)
    blocker = threading.Thread(target=live.post, args=("/v1/completions", {"model": "tiny", "prompt": "wait",
                                                                            "max_tokens": 1}))
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    try:
        blocker.start()
        assert holding.wait(10)
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while live.state.scheduler.depth < len(bodies):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        gate.set()
        for t in [blocker, *threads]:
            t.join(30)
        hook.remove()
    return results


def _alone(live: Served, body: dict, stream: bool) -> Any:
    return live.stream(body)[:2] if stream else live.post("/v1/completions", body)


@pytest.mark.parametrize(("error", "status", "from_step"), [(PlanError("poisoned plan"), 400, 0),
                                                            (RuntimeError("poisoned kernel"), 500, 0),
                                                            (PlanError("poisoned late"), 400, 3)],
                         ids=["plan-error-at-prefill", "engine-fault", "plan-error-mid-stream"])
def test_a_poisoned_request_fails_alone_its_batch_mates_complete(live: Served, poison: dict, error: Exception,
                                                                 status: int, from_step: int) -> None:
    poison.update(error=error, from_step=from_step, norm=_norm(live.state))
    stream = [False, True, True, False]  # streamed mates already hold some text when a late poison strikes
    alone = [_alone(live, b, s) for b, s in zip(VALID, stream, strict=False)]
    failures0 = live.metric("steerable_serve_batch_failures_total")
    answered0 = live.answered()
    poison["calls"] = 0
    results = _together(live, [*VALID, POISONED], stream)
    for i, (got, want) in enumerate(zip(results[:3], alone, strict=True)):
        assert got[0] == 200, (i, got)
        if stream[i]:
            assert got[1] == want[1], f"streamed request {i} differs from alone"
        else:
            assert got[1]["choices"][0]["text"] == want[1]["choices"][0]["text"], f"request {i} differs"
    got_status, body = results[3]
    assert got_status == status
    assert is_error(got_status, body)
    assert ("poisoned plan" in body["error"]["message"] or "poisoned late" in body["error"]["message"]) \
        if status == 400 else body["error"]["message"] == "internal error while generating"
    assert poison["calls"] > 0
    assert live.metric("steerable_serve_batch_failures_total") == failures0 + 1
    assert live.answered() == answered0 + 5  # the four, and the request that held the worker


# -- start-up ------------------------------------------------------------------------------------------


def test_a_default_plan_that_cannot_run_is_refused_at_start_up(files: dict[str, Path], tmp_path: Path,
                                                               poison: dict) -> None:
    handle = tiny_handle("llama")
    poison.update(norm=_norm(build(files)))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(POISONED["steering"]))
    config = ServeConfig(model="tiny", vectors=files["vectors"], default_plan=str(plan))
    with pytest.raises(SteerableError, match=r"default plan .* cannot run.*poisoned plan"):
        ServerState.build(handle, config)
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "bad.json").write_text(json.dumps(POISONED["steering"]))
    with pytest.raises(SteerableError, match="preset bad cannot run"):
        ServerState.build(handle, ServeConfig(model="tiny", vectors=files["vectors"], presets=presets))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("tiny-model") / "tiny"
    h = tiny_handle("llama")
    h.model.save_pretrained(d)
    h.tokenizer.save_pretrained(d)
    return str(d)


def test_start_up_faults_print_a_message_and_exit_2(files: dict[str, Path], model_dir: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    vectors = str(files["vectors"])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    good = (files["vectors"] / "nice.safetensors").read_bytes()
    (corrupt / "torn.safetensors").write_bytes(good[: len(good) // 2])
    odd_meta = tmp_path / "oddmeta"
    odd_meta.mkdir()
    header = json.dumps({"__metadata__": {"steerable": "[1, 2]"}}).encode()
    (odd_meta / "listmeta.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "broken.json").write_bytes(b"\xff\xfe not json")
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "deep.json").write_text("[" * 100000 + "]" * 100000)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"vector": "nice", "strength": "huge"}))
    keys = tmp_path / "keys.json"
    keys.write_bytes(b"\xff\xfe")
    cases = [
        (["--vectors", str(corrupt)], "torn.safetensors"),
        (["--vectors", str(odd_meta)], "listmeta.safetensors"),
        (["--vectors", vectors, "--presets", str(presets)], "broken.json"),
        (["--vectors", vectors, "--presets", str(deep)], "deep.json"),
        (["--vectors", vectors, "--default-plan", str(plan_file)], "default plan"),
        (["--vectors", vectors, "--default-plan", "nowhere"], "neither a plan file nor a preset"),
        (["--vectors", vectors, "--api-keys", str(keys)], "keys"),
        (["--vectors", vectors, "--port", "99999"], "--port"),
        (["--vectors", vectors, "--port", "-1"], "--port"),
        (["--vectors", vectors, "--max-batch", "0"], "--max-batch"),
        (["--vectors", vectors, "--max-queue", "-5"], "--max-queue"),
        (["--vectors", vectors, "--timeout", "nan"], "--timeout"),
        (["--vectors", vectors, "--batch-window", "inf"], "--batch-window"),
        (["--vectors", str(files["vectors"] / "nice.safetensors")], "not a directory"),
        (["--vectors", str(files["malformed"] / "badaxis")], "badaxis.safetensors"),
        (["--vectors", str(files["malformed"] / "oddaxis")], "oddaxis.safetensors"),
        (["--vectors", str(files["malformed"] / "boolaxis")], "boolaxis.safetensors"),
        (["--vectors", str(files["malformed"] / "faraxis")], "faraxis.safetensors"),
        (["--vectors", vectors, "--presets", str(plan_file)], "not a directory"),
    ]
    for args, message in cases:
        assert main(["serve", "--model", model_dir, *args]) == 2, args
        err = capsys.readouterr().err
        assert "steerable: error: " in err, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err, (args, err)


# -- text that is not Unicode --------------------------------------------------------------------------

SURROGATE = '"\\udc00"'  # the JSON escape of a lone surrogate, as a client sends it


def _body(text: str) -> str:
    return text.replace("@C", '"model": "tiny", "max_tokens": 2').replace("@S", SURROGATE)


@pytest.mark.parametrize(("body", "field"), [
    (_body('{@C, "messages": [{"role": "user", "content": @S}]}'), "messages[0].content"),
    (_body('{@C, "messages": [{"role": "user", "content": [{"type": "text", "text": @S}]}]}'),
     "messages[0].content[0].text"),
    (_body('{@C, "messages": [{"role": "user", "content": "hi"}], "stop": [@S]}'), "stop[0]"),
    (_body('{@C, "messages": [{"role": "user", "content": "hi"}], "user": @S}'), "user"),
    (_body('{@C, "messages": [{"role": "user", "content": "hi"}], @S: 1}'), "<key>"),
    (_body('{@C, "messages": [{"role": "user", "content": "hi"}], "steering": {"vector": @S}}'), "steering.vector"),
    (_body('{"model": "tiny", "prompt": @S}'), "prompt"),
    (_body('{"model": "tiny", "prompt": [@S]}'), "prompt[0]"),
    (_body('{"model": "tiny", "prompt": "x", "stop": @S}'), "stop"),
    (_body('{"model": @S, "prompt": "x"}'), "model"),
], ids=["content", "text-part", "stop-list", "user", "key", "plan", "prompt", "prompt-list", "stop", "model"])
def test_lone_surrogates_get_a_400_naming_the_field(live: Served, body: str, field: str) -> None:
    path = "/v1/completions" if '"prompt"' in body else "/v1/chat/completions"
    status, got = live.post(path, body.encode())
    assert status == 400, got
    assert is_error(status, got)
    assert field in got["error"]["message"]
    assert "not valid Unicode" in got["error"]["message"]


def test_bad_input_found_while_admitting_is_a_400(live: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SteerableError raised while a request is admitted (e.g. a chat template refusing the messages, which
    ModelHandle.render turns into a DataError) is the request's fault: 400, never 500."""
    from steerable.errors import DataError

    def refuse(*_args: Any, **_kwargs: Any) -> str:
        raise DataError("the chat template refused the messages: roles must alternate")
    monkeypatch.setattr(live.state.admission.handle, "render", refuse)
    status, got = live.post("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 2})
    assert status == 400, got
    assert is_error(status, got)
    assert "roles must alternate" in got["error"]["message"]


# -- steering_monitor on vectors it cannot apply to ----------------------------------------------------


@pytest.mark.parametrize(("axis", "message"), [
    ({"monitor_layer": "middle"}, "malformed axis metadata"), ({"monitor_layer": 99}, "malformed axis metadata"),
    ({"monitor_layer": True}, "malformed axis metadata"), ("not an object", "malformed axis metadata"),
    (None, None)], ids=["string-layer", "far-layer", "bool-layer", "not-an-object", "imported-nan-band"])
def test_monitor_with_malformed_metadata_or_nan_band(live: Served, monkeypatch: pytest.MonkeyPatch, axis: Any,
                                                     message: str | None) -> None:
    # malformed files never load (test_start_up_faults_print_a_message_and_exit_2); a set whose metadata went
    # bad in memory still gets a 400, not a 500
    vector = "imported" if axis is None else "nice"
    if axis is not None:
        monkeypatch.setitem(live.state.library.get("nice").meta, "axis", axis)
    got_status, body = live.post("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 4,
                                                          "steering_monitor": {"vector": vector}})
    assert got_status == (200 if message is None else 400), body
    if message is not None:
        assert is_error(got_status, body)
        assert message in body["error"]["message"]
        # naming a layer explicitly still works
        ok, body = live.post("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 4,
                                                      "steering_monitor": {"vector": vector, "layer": 1}})
        assert ok == 200, body
    report = body["steering"]["monitor"]
    assert report["band"] == [None, None] if vector == "imported" else all(isinstance(x, float)
                                                                            for x in report["band"])
    assert report["drift"] is None if vector == "imported" else report["drift"] is not None
    # the same through a stream
    status2, _, chunks = live.stream({"model": "tiny", "prompt": "x", "max_tokens": 3,
                                      "steering_monitor": {"vector": vector, "layer": 1}})
    assert status2 == 200
    assert any("monitor" in c.get("steering", {}) for c in chunks)


# -- metrics count every answer ------------------------------------------------------------------------


def test_metrics_count_every_answered_status_including_500s(live: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    before = live.answered()
    internal0 = live.metric('steerable_serve_errors_total{kind="internal"}')

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("handler bug")

    # a 500 from a handler (the exception handler answers), from the engine, a 404 and a 405
    monkeypatch.setattr(live.state.admission, "completion", broken)
    status, body = live.post("/v1/completions", {"model": "tiny", "prompt": "x"})
    assert status == 500
    assert is_error(status, body)
    monkeypatch.undo()
    hook = live.state.handle.model.register_forward_pre_hook(broken)
    try:
        status, body = live.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert status == 500
        status, _, _ = live.stream({"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert status == 500
    finally:
        hook.remove()
    assert live.raw("GET", "/nowhere")[0] == 404
    assert live.raw("GET", "/v1/completions")[0] == 405
    assert live.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})[0] == 200
    answered = live.answered() - before
    assert answered == 6 + 0  # every answer above (/metrics reads are not counted)
    assert live.metric('steerable_serve_errors_total{kind="internal"}') == internal0 + 3
    assert live.metric('steerable_serve_requests_total{endpoint="other",status="404"}') >= 1


# -- HTTP framing --------------------------------------------------------------------------------------


def test_malformed_http_framing_gets_the_json_error_body(live: Served) -> None:
    """h11 refuses malformed framing before the app sees the request; the server's protocol class answers
    it with the JSON error body (not uvicorn's plain text), closes the connection and goes on."""
    before = live.metric('steerable_serve_errors_total{kind="bad_http"}')
    garbled = (b"GARBAGE\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
               b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
               b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
               b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
               b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n{}")
    for raw in garbled:
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(raw)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), reply[:200]
        assert b"content-type: application/json" in head.lower(), head
        parsed = json.loads(body)
        assert is_error(400, parsed), parsed
        assert parsed["error"]["code"] == "invalid_http"
    assert live.metric('steerable_serve_errors_total{kind="bad_http"}') == before + len(garbled)
    assert live.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})[0] == 200


# -- numbers and nesting -------------------------------------------------------------------------------

HUGE = [10**18, 2**63, 2**64 + 1, -(2**63) - 1, 10**300, -(10**300), 1e308, -1e308, 5e-324]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "seed", "n", "temperature", "top_p",
                                   "frequency_penalty", "presence_penalty", "top_logprobs", "best_of"])
def test_huge_numbers_never_overflow(live: Served, field: str) -> None:
    for value in HUGE:
        status, body = live.post("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 2,
                                                          field: value})
        assert status in (200, 400), (field, value, body)
        assert status == 200 or is_error(status, body)
    for value in HUGE:  # inside a plan and a monitor
        for steering in ({"vector": "nice", "strength": value}, {"vector": "nice", "layers": value},
                         {"vector": "nice", "method": "rotate", "angle": value},
                         {"vector": "nice", "method": "cap", "cap_floor": value}):
            status, body = live.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                         "steering": steering})
            assert status in (200, 400), (steering, body)
        status, body = live.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                     "steering_monitor": {"vector": "nice", "layer": value}})
        assert status == 400, body


def test_a_content_length_too_long_to_be_a_number_is_refused(live: Served) -> None:
    for digits in (19, 40, 400):  # h11 refuses the longer ones as framing; the app checks the length it gets
        status, data = live.raw("POST", "/v1/completions", b"{}", headers={"Content-Length": "9" * digits})
        assert status in (400, 413), (digits, status)
        assert is_error(status, json.loads(data))


def test_nesting_depth_is_bounded(live: Served) -> None:
    deep: Any = "x"
    for _ in range(40):
        deep = {"a": deep}
    status, body = live.post("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "metadata": deep})
    assert status == 400
    assert "nested too deeply" in body["error"]["message"]
    status, body = live.post("/v1/chat/completions", b"[" * 5000 + b"]" * 5000)
    assert status == 400
    assert is_error(status, body)
    plan: Any = {"vector": "nice"}
    for _ in range(12):
        plan = {"method": "conditional", "vector": "nice", "threshold": 0.0, "layer": 1, "then": plan}
    status, body = live.post("/v1/completions", {"model": "tiny", "prompt": "x", "steering": plan})
    assert status == 400
    assert "nested too deeply" in body["error"]["message"]


# -- fuzz: random bodies never get a 500 ---------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                    st.sampled_from(["nice", "../etc/passwd", "nice.safetensors", "badaxis", "imported", "auto",
                                     "all", "0-1", "1", "p50", "n10", "prompt", "generated", "first:2", "assistant",
                                     "turns>=1", "resid_post", "mlp_in", ">", "<", "\udc00", "tiny", *METHOD_NAMES]))
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
PLAN_ENTRY = st.dictionaries(st.sampled_from(sorted(PLAN_KEYS | set(CONDITIONAL_KEYS) | {"preset", "junk"})),
                             st.one_of(SCALARS, JSONISH), max_size=6)
# near-valid plans reach the hooks: the nice vector, a real method with its own keys and sensible values,
# now and then one random key more
_BOUND = st.one_of(st.floats(-5, 5), st.sampled_from(["p5", "p50", "p95", "n10"]))
_OWN: dict[str, dict[str, st.SearchStrategy[Any]]] = {
        "add": {"strength": st.floats(-8, 8)}, "ablate": {}, "cap": {"cap_floor": _BOUND, "cap_ceiling": _BOUND},
        "rotate": {"angle": st.floats(-360, 360)}, "angular": {"angle": st.floats(-360, 360)},
        "angular-adaptive": {"angle": st.floats(-360, 360)}, "sttp": {"threshold": _BOUND, "target": _BOUND},
        "stmp": {"threshold": _BOUND, "target": _BOUND}}
_SHARED = {"layers": st.sampled_from(["all", "0-1", "1", "2-3", "discriminative", "top:2"]),
           "gate": st.sampled_from(["prompt", "generated", "first:2", "assistant", "turns>=1"]),
           "site": st.sampled_from(["resid_post", "mlp_in", "attn_in", "resid_pre"])}
NEAR_ENTRY = st.sampled_from(sorted(_OWN)).flatmap(
    lambda m: st.builds(lambda base, extra: {"method": m, **base, **extra},
                        st.fixed_dictionaries({"vector": st.sampled_from(["nice", "nice", "imported"]),
                                               **({"angle": _OWN[m]["angle"]} if "angle" in _OWN[m] else {})},
                                              optional={**{k: v for k, v in _OWN[m].items() if k != "angle"},
                                                        **_SHARED}),
                        st.one_of(st.just({}), st.just({}), st.just({}),
                                  st.dictionaries(st.sampled_from(sorted(PLAN_KEYS)), SCALARS, max_size=1))))
CONDITIONAL = st.builds(lambda then, extra: {"method": "conditional", "vector": "nice", "then": then, **extra},
                        NEAR_ENTRY, st.fixed_dictionaries({}, optional={
                            "layer": st.one_of(st.integers(0, 3), st.just("auto")),
                            "threshold": st.one_of(st.floats(-5, 5), st.just("auto")),
                            "compare": st.sampled_from([">", "<"]), "recall": st.floats(0.5, 1)}))
PLAN = st.one_of(st.none(), SCALARS, PLAN_ENTRY, st.lists(PLAN_ENTRY, max_size=3), NEAR_ENTRY, CONDITIONAL,
                 st.lists(st.one_of(NEAR_ENTRY, CONDITIONAL), min_size=1, max_size=3),
                 st.fixed_dictionaries({"preset": st.one_of(SCALARS, st.sampled_from(["none", "default", "x"]))}))
MONITOR = st.one_of(st.none(), SCALARS, st.dictionaries(st.sampled_from(["vector", "layer", "site"]), SCALARS,
                                                        max_size=3))
MESSAGE = st.one_of(JSONISH, st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), SCALARS)},
    optional={"content": st.one_of(SCALARS, st.lists(st.fixed_dictionaries(
        {"type": st.one_of(st.just("text"), SCALARS), "text": SCALARS}), max_size=2)), "name": SCALARS}))
COMMON = {"model": st.one_of(st.just("tiny"), SCALARS), "max_tokens": st.one_of(st.integers(-2, 12), SCALARS),
          "temperature": st.one_of(st.floats(0, 2), SCALARS), "top_p": st.one_of(st.floats(0, 1), SCALARS),
          "seed": SCALARS, "stop": st.one_of(SCALARS, st.lists(SCALARS, max_size=5)), "stream": SCALARS,
          "stream_options": st.one_of(SCALARS, st.dictionaries(st.sampled_from(["include_usage", "x"]), SCALARS)),
          "n": SCALARS, "user": SCALARS, "steering": PLAN, "steering_monitor": MONITOR,
          "logprobs": SCALARS, "tools": JSONISH, "response_format": JSONISH, "metadata": JSONISH,
          "frequency_penalty": SCALARS, "logit_bias": JSONISH, "echo": SCALARS, "best_of": SCALARS,
          "suffix": SCALARS, "unknown_field": SCALARS}
CHAT_BODY = st.fixed_dictionaries({}, optional={**COMMON, "messages": st.one_of(
    st.lists(MESSAGE, min_size=0, max_size=3), SCALARS), "max_completion_tokens": SCALARS})
COMPLETION_BODY = st.fixed_dictionaries({}, optional={**COMMON, "prompt": st.one_of(
    SCALARS, st.lists(SCALARS, max_size=2))})
# near-valid bodies reach admission and the engine: a valid request, then a few fields from the random ones
NEAR_CHAT = st.builds(lambda extra, messages: {"model": "tiny", "messages": messages, **extra},
                      st.dictionaries(st.sampled_from(sorted(COMMON)), st.one_of(*COMMON.values()), max_size=2),
                      st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                      "content": st.text(max_size=20)}), min_size=1, max_size=3))
NEAR_COMPLETION = st.builds(lambda extra, prompt: {"model": "tiny", "prompt": prompt, **extra},
                            st.dictionaries(st.sampled_from(sorted(COMMON)), st.one_of(*COMMON.values()),
                                            max_size=2), st.text(min_size=1, max_size=20))
@dataclass
class Tally:
    examples: int = 0
    seconds: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)


FUZZ = Tally()


def _check_answer(live: Served, path: str, body: Any) -> None:
    raw = json.dumps(body, ensure_ascii=True)  # lone surrogates travel as \udc00 escapes, as a client sends them
    status, data = live.raw("POST", path, raw.encode())
    FUZZ.examples += 1
    FUZZ.statuses[status] = FUZZ.statuses.get(status, 0) + 1
    assert status < 500, (path, body, data[:300])
    if body.get("stream") is True and status == 200:
        assert data.startswith(b"data: ")
        return
    parsed = json.loads(data)
    if status != 200:
        assert is_error(status, parsed), parsed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(chat=st.booleans(), chat_body=st.one_of(CHAT_BODY, NEAR_CHAT),
       completion_body=st.one_of(COMPLETION_BODY, NEAR_COMPLETION))
def test_fuzz_random_bodies_never_get_a_500(live: Served, chat: bool, chat_body: dict, completion_body: dict) -> None:
    t = time.monotonic()
    if chat:
        _check_answer(live, "/v1/chat/completions", chat_body)
    else:
        _check_answer(live, "/v1/completions", completion_body)
    FUZZ.seconds += time.monotonic() - t


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(plan=PLAN, monitor=MONITOR, prompt=st.sampled_from(["Hello", "Once upon", "x"]))
def test_fuzz_random_plans_never_get_a_500(live: Served, plan: Any, monitor: Any, prompt: str) -> None:
    t = time.monotonic()
    _check_answer(live, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 3, "steering": plan,
                                            **({} if monitor is None else {"steering_monitor": monitor})})
    FUZZ.seconds += time.monotonic() - t


def test_the_server_is_healthy_after_the_fuzz(live: Served) -> None:
    status, body = live.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert status == 200, body
    print(f"\nfuzz: {FUZZ.examples} requests in {FUZZ.seconds:.1f} s, statuses {sorted(FUZZ.statuses.items())}")
