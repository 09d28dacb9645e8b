"""`steerable.scale.ray_serve` on a real local Ray cluster (`ray.init(num_cpus=2)`, loopback), driven with the
official `openai` client: two replicas of the server behind Serve's proxy answer exactly as the single-process
server does (greedy and seeded, streamed and not), API key grants and bad input are the same code, and a
replica killed under load fails only its own in-flight requests, with a clear error, while the other keeps
serving. One cluster and one Serve application for the whole module (starting them is most of its time).
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'steerable[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'steerable[ray]')")

from steerable.data.loaders import Example  # noqa: E402
from steerable.directions.artifact import save_directions  # noqa: E402
from steerable.directions.calibrate import calibrate  # noqa: E402
from steerable.errors import SteerableError  # noqa: E402
from steerable.scale import ray_serve  # noqa: E402
from steerable.serve.config import Limits, ServeConfig  # noqa: E402
from steerable.serve.server import ServerState, uvicorn_server  # noqa: E402
from tests.conftest import tiny_handle  # noqa: E402
from tests.test_steering import EX  # noqa: E402

ADMIN, LIMITED = "sk-admin-0123456789", "sk-limited-0123456789"
OTHER_EX = [Example(p, None, i % 2, i // 2) for i, p in enumerate(
    ["sing a song", "shout a song", "whisper softly", "yell loudly", "calm waters", "stormy waters"])]
LIMITS = Limits(max_tokens=500, max_prompt_tokens=200, max_batch=4, max_queue=16, timeout=60, batch_window=0.01)
CALL_TIMEOUT = 60.0  # no request of this module may take longer: nothing hangs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray_serve")
    h = tiny_handle("llama")
    h.model.config.max_position_embeddings = 1024  # room for the long generations of the kill test
    h.model.save_pretrained(root / "tiny")
    h.tokenizer.save_pretrained(root / "tiny")
    vectors = root / "vectors"
    save_directions(calibrate(h, EX, position="last", progress=False), vectors / "nice.safetensors")
    save_directions(calibrate(h, OTHER_EX, position="last", progress=False), vectors / "other.safetensors")
    presets = root / "presets"
    presets.mkdir()
    (presets / "calm.json").write_text(json.dumps({"vector": "nice", "method": "ablate", "layers": "all"}))
    default = root / "default-plan.json"
    default.write_text(json.dumps({"vector": str(vectors / "nice.safetensors"), "strength": 3.0, "layers": "1-2"}))
    keys = root / "keys.json"
    keys.write_text(json.dumps({ADMIN: "*", LIMITED: {"vectors": ["nice"], "presets": []}}))
    return {"model": root / "tiny", "vectors": vectors, "presets": presets, "default": default, "keys": keys}


def config(files: dict[str, Path], port: int = 0) -> ServeConfig:
    return ServeConfig(model=str(files["model"]), vectors=files["vectors"], presets=files["presets"],
                       default_plan=str(files["default"]), api_keys=files["keys"], port=port, limits=LIMITS)


class Single:
    """The single-process server (uvicorn in a thread of this process), the reference."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.server = uvicorn_server(ServerState.load(cfg), "127.0.0.1", 0)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the single-process server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def single(files):
    s = Single(config(files))
    yield s.url
    s.stop()


@pytest.fixture(scope="module")
def cluster(files):
    """Ray on this machine (2 CPUs, loopback), Serve on a free port, two replicas of one CPU each."""
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        url = ray_serve.start(config(files, port=free_port()), ray_serve.RayServeOptions(replicas=2, threads=1))
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def client(url: str, key: str | None = ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=0, timeout=CALL_TIMEOUT)


CHAT = [{"role": "user", "content": "Say something nice"}]
# (endpoint, extra_body, sampling): every kind of plan a request can ask for
CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("chat", {}, {}),  # the server's default plan
    ("chat", {"steering": None}, {}),
    ("chat", {"steering": {"preset": "calm"}}, {}),
    ("chat", {"steering": {"vector": "nice", "method": "add", "strength": 4, "layers": "1-2",
                           "gate": "generated"}}, {"stop": ["q"]}),
    ("chat", {"steering": [{"vector": "other", "method": "ablate", "layers": "all"},
                           {"vector": "nice", "method": "add", "strength": -2, "layers": "2"}],
              "steering_monitor": {"vector": "nice", "layer": 2}}, {}),
    ("completions", {"steering": {"vector": "nice", "method": "add", "strength": 2, "layers": "0-3"}}, {}),
    ("chat", {"steering": None}, {"temperature": 0.9, "top_p": 0.95, "seed": 7}),
]


def ask(url: str, case: tuple[str, dict[str, Any], dict[str, Any]], stream: bool, max_tokens: int = 24,
        prompt: str = "Say something nice", key: str = ADMIN) -> dict[str, Any]:
    """One request; the parts of the answer that must not depend on where it ran."""
    endpoint, extra, sampling = case
    c = client(url, key)
    if endpoint == "chat":
        kw: dict[str, Any] = dict(model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                  extra_body=extra, **sampling)
        if not stream:
            r = c.chat.completions.create(**kw)
            return {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                    "usage": (r.usage.prompt_tokens, r.usage.completion_tokens), "steering": r.model_extra["steering"]}
        parts, out = [], {}
        for chunk in c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                if chunk.choices[0].finish_reason:
                    out["finish"] = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                out["usage"] = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                out["steering"] = chunk.model_extra["steering"]
        return {"text": "".join(parts), **out}
    kw = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, extra_body=extra, **sampling)
    if not stream:
        r = c.completions.create(**kw)
        return {"text": r.choices[0].text, "finish": r.choices[0].finish_reason,
                "usage": (r.usage.prompt_tokens, r.usage.completion_tokens), "steering": r.model_extra["steering"]}
    parts, out = [], {}
    for chunk in c.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].text)
            if chunk.choices[0].finish_reason:
                out["finish"] = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            out["usage"] = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
            out["steering"] = chunk.model_extra["steering"]
    return {"text": "".join(parts), **out}


def raw(url: str, path: str, body: bytes, key: str = ADMIN) -> tuple[int, dict[str, Any]]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=CALL_TIMEOUT)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                   "Authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    status, data = resp.status, resp.read()
    conn.close()
    return status, json.loads(data)


def same(got: Any, want: Any) -> bool:
    """Equal, except that floats (the monitor's projections) may differ in the last digits: a replica batches
    concurrent requests differently from the single server, and a different batch shape rounds differently."""
    if isinstance(want, float) and isinstance(got, float):
        return got == pytest.approx(want, rel=1e-4, abs=1e-5)
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want, strict=True))
    return bool(got == want) and type(got) is type(want)


# -- tests -----------------------------------------------------------------------------------------------


def test_responses_equal_the_single_process_servers(cluster, single):
    jobs = [(case, stream) for case in CASES for stream in (False, True)]
    with ThreadPoolExecutor(8) as pool:  # concurrent: the two replicas share the load
        got = list(pool.map(lambda j: ask(cluster, *j), jobs))
    want = [ask(single, *j) for j in jobs]
    for (case, stream), g, w in zip(jobs, got, want, strict=True):
        assert same(g, w), (case, stream, g, w)
    assert {w["steering"]["plan"] for w in want} == {"default", "none", "preset", "request"}
    assert "monitor" in want[8]["steering"]
    models = client(cluster).models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["steering"] == {"vectors": ["nice", "other"], "presets": ["calm"],
                                                 "default_plan": True}


def test_api_key_grants_are_enforced(cluster):
    with pytest.raises(openai.AuthenticationError):
        ask(cluster, CASES[1], False, key="sk-unknown-0123456789")
    with pytest.raises(openai.PermissionDeniedError, match="other"):
        ask(cluster, ("chat", {"steering": {"vector": "other", "strength": 1}}, {}), False, key=LIMITED)
    with pytest.raises(openai.PermissionDeniedError):
        ask(cluster, CASES[2], False, key=LIMITED)  # the preset was not granted
    ok = ask(cluster, ("chat", {"steering": {"vector": "nice", "strength": 1}}, {}), False, key=LIMITED)
    assert ok["steering"] == {"plan": "request"}
    limited = client(cluster, LIMITED).models.list().data[0].model_extra["steering"]
    assert limited == {"vectors": ["nice"], "presets": [], "default_plan": True}


@pytest.mark.parametrize(("body", "needle"), [
    (b'{"model": "tiny", "messages": [', "not valid JSON"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "NaN"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "bogus": 1}', "bogus"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "steering": {"vector": "../x"}}',
     "file paths are refused"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "steering": {"vector": "nice", '
     b'"strength": 1, "layers": "99"}}', "layer"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}', "max_tokens"),
])
def test_bad_input_is_a_400_with_the_openai_error_body(cluster, single, body, needle):
    status, got = raw(cluster, "/v1/chat/completions", body)
    assert status == 400
    assert needle in got["error"]["message"]
    assert (status, got) == raw(single, "/v1/chat/completions", body)


def test_serve_run_builder_arguments(files, tmp_path):
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"model": "m", "vectors": str(files["vectors"]), "max_tokens": 9, "replicas": 3}))
    config_, options = ray_serve.parse_builder_args({"config": str(cfg), "max_tokens": "7", "threads": "2"})
    assert (config_.model, config_.limits.max_tokens, options.replicas, options.threads) == ("m", 7, 3, 2)
    with pytest.raises(SteerableError, match="bogus"):
        ray_serve.parse_builder_args({"model": "m", "vectors": "v", "bogus": "1"})
    with pytest.raises(SteerableError, match="vectors"):
        ray_serve.parse_builder_args({"model": "m"})
    with pytest.raises(SteerableError, match="replicas"):
        ray_serve.build_app(config(files), ray_serve.RayServeOptions(replicas=0))
    with pytest.raises(SteerableError, match="--port 0"):
        ray_serve.start(config(files, port=0), ray_serve.RayServeOptions())


def test_a_client_that_leaves_stops_its_generation(cluster):
    # under Ray Serve a client that leaves cancels the handler's task; its row must stop, as on one process
    c = openai.OpenAI(base_url=cluster + "/v1", api_key=ADMIN, max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me about maps"}],
                                  max_tokens=LIMITS.max_tokens, extra_body={"steering": None})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # /metrics is per replica: ask until the one that served it answers
        with urllib.request.urlopen(cluster + "/metrics", timeout=CALL_TIMEOUT) as r:
            text = r.read().decode()
        if 'steerable_serve_cancelled_total{reason="disconnect"} 1' in text:
            return
        time.sleep(0.2)
    pytest.fail("the generation was not cancelled when its client left")


def test_a_killed_replica_fails_only_its_own_requests_and_the_other_keeps_serving(cluster, single):
    # long greedy generations (they run to max_tokens), so that both replicas are busy when one is killed
    case = CASES[1]
    prompts = [f"Tell me about {w}" for w in ("rivers", "maps", "owls", "salt", "glass", "ropes", "tides", "moss",
                                              "bells", "kites", "reeds", "stars")]
    with ThreadPoolExecutor(len(prompts)) as pool:
        ref = list(pool.map(lambda p: ask(single, case, False, max_tokens=LIMITS.max_tokens, prompt=p), prompts))
    long = [(p, r) for p, r in zip(prompts, ref, strict=True) if r["finish"] == "length"][:8]
    assert len(long) >= 4, [r["usage"] for r in ref]

    outcomes: dict[int, Any] = {}
    started = threading.Semaphore(0)

    def run(i: int, prompt: str) -> None:
        try:
            if i % 2:
                started.release()  # (sent right after)
                outcomes[i] = ask(cluster, case, False, max_tokens=LIMITS.max_tokens, prompt=prompt)
            else:  # streamed: wait for its first chunk before killing
                c = client(cluster)
                parts, first = [], True
                for chunk in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                       max_tokens=LIMITS.max_tokens, stream=True,
                                                       extra_body=case[1]):
                    if first:
                        started.release()
                        first = False
                    if chunk.choices:
                        parts.append(chunk.choices[0].delta.content or "")
                outcomes[i] = {"text": "".join(parts)}
        except openai.APIError as e:
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i, p), daemon=True) for i, (p, _) in enumerate(long)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=CALL_TIMEOUT)
    time.sleep(0.2)  # the non-streamed requests reach their replicas
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA")]
    assert len(replicas) == 2
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))
    t0 = time.monotonic()
    for t in threads:
        t.join(CALL_TIMEOUT)
        assert not t.is_alive(), "a request hung after its replica was killed"

    failed = [o for o in outcomes.values() if isinstance(o, Exception)]
    for i, (_, want) in enumerate(long):
        got = outcomes[i]
        if isinstance(got, Exception):  # the killed replica's: a clear error, 502 or an SSE error event
            assert "replica serving this request stopped" in str(got), got
            if isinstance(got, openai.APIStatusError):  # not streamed: a 502 that clients may retry
                assert got.status_code == 502
                assert got.response.headers.get("x-should-retry") == "true"
        else:  # the other replica's: complete and unchanged
            assert got["text"] == want["text"]
    assert failed, f"the killed replica had no request in flight ({len(long)} requests)"
    assert len(failed) < len(long), "every request failed: the other replica did not keep serving"
    # new requests go to the surviving replica at once
    for _ in range(4):
        assert ask(cluster, case, False, max_tokens=4)["finish"] in ("length", "stop")
    assert time.monotonic() - t0 < CALL_TIMEOUT


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    with pytest.raises(SteerableError, match=r"pip install 'steerable\[ray\]'"):
        ray_serve.import_serve()


def test_replicas_without_ray_is_refused(files, capsys):
    from steerable.cli.main import main

    code = main(["serve", "--model", str(files["model"]), "--vectors", str(files["vectors"]), "--replicas", "2"])
    assert code == 2
    assert "--replicas and --replica-threads need --ray" in capsys.readouterr().err
