"""Serving on Ray Serve: N replicas of the OpenAI server behind Serve's HTTP proxy (docs/scaling.md).

Each replica is a Ray actor that loads the model once (`ServerState.load`, every file checked as in the
single-process server) with a bounded number of torch threads, then builds its routes with the same
`create_app` factory: chat, completions, SSE, models, health, metrics, API keys, limits and per-request
plans are the same code, and so are their errors. Serve's proxy spreads requests over the replicas and
its health checks replace one that dies.

    steerable serve --model smollm2-135m --vectors runs/vectors --ray auto --replicas 2
    serve run steerable.scale.ray_serve:app_builder model=smollm2-135m vectors=runs/vectors replicas=2 \
        profiles=runs/profiles adapter=runs/aux

Ray is imported only when a function here runs; without it they raise a `SteerableError` saying
`pip install 'steerable[ray]'`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from steerable.errors import SteerableError
from steerable.scale.ray_env import INSTALL, connect, import_ray
from steerable.serve.config import Limits, ServeConfig

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)
APP_NAME = "steerable"
DEPLOYMENT = "SteerableServer"


def import_serve() -> Any:
    """`ray.serve`, or a SteerableError saying how to install it."""
    import_ray("serving on Ray")
    try:
        from ray import serve
    except ImportError as e:
        raise SteerableError(f"serving on Ray needs Ray Serve, which is not installed ({e.name or e}); "
                             f"install it with: {INSTALL}") from None
    return serve


@dataclass(frozen=True)
class RayServeOptions:
    """How the replicas are laid out; everything a request sees comes from the `ServeConfig`."""

    replicas: int = 1
    threads: int = 1  # torch threads per replica, also the CPUs Ray reserves for it
    gpus: float | None = None  # GPUs per replica; None: 1 when the config's device is CUDA, else 0
    app_name: str = APP_NAME
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 30.0
    constructor_retries: int = 1  # a replica whose start-up fails (a bad file) is not retried for ever

    def check(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise SteerableError(f"--replicas must be at least 1, got {self.replicas}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise SteerableError(f"--replica-threads must be at least 1, got {self.threads}")
        if self.gpus is not None and not 0 <= self.gpus <= 64:
            raise SteerableError(f"GPUs per replica must be within 0 … 64, got {self.gpus}")

    def gpus_for(self, config: ServeConfig) -> float:
        if self.gpus is not None:
            return self.gpus
        return 1.0 if (config.device or "").startswith("cuda") else 0.0


class SteerableReplica:
    """One replica: the model and everything requests may use, loaded once; the routes come from
    `create_app` (Serve calls `__serve_build_asgi_app__` after the constructor, then runs the app's
    lifespan, which starts the scheduler's worker thread)."""

    def __init__(self, config: ServeConfig, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        from steerable.serve.server import ServerState

        self.state = ServerState.load(config)
        log.info("replica ready: %s, %d torch thread(s)", self.state.model_id, threads)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from steerable.serve.app import create_app

        return create_app(self.state)


def deployment_options(config: ServeConfig, options: RayServeOptions) -> dict[str, Any]:
    """The `@serve.deployment` arguments. A replica takes up to max_batch + max_queue + 1 requests, so its
    own queue answers 429 when full, exactly as the single-process server does."""
    limits = config.limits
    return {
        "name": DEPLOYMENT,
        "num_replicas": options.replicas,
        "ray_actor_options": {"num_cpus": options.threads, "num_gpus": options.gpus_for(config)},
        "max_ongoing_requests": limits.max_batch + limits.max_queue + 1,
        "health_check_period_s": options.health_check_period_s,
        "health_check_timeout_s": options.health_check_timeout_s,
        "max_constructor_retry_count": options.constructor_retries,
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},
    }


def build_app(config: ServeConfig, options: RayServeOptions | None = None) -> Any:
    """The Serve application (`serve.run(build_app(...))`): `options.replicas` replicas of the server."""
    options = options or RayServeOptions()
    options.check()
    config.check()
    serve = import_serve()
    ingress = serve.ingress()(SteerableReplica)  # no app here: each replica builds its own
    deployment = serve.deployment(ingress, **deployment_options(config, options))
    return deployment.bind(config, options.threads)


class ReplicaLostMiddleware:
    """In Serve's proxy: a request whose replica died (or failed outside the app) before it answered gets
    a 502 with the OpenAI error body, and a stream cut off mid-way ends with an SSE error event and
    `[DONE]`, instead of a bare 500 or a dropped connection. Anything the replica did answer passes
    through unchanged."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"started": False, "finished": False, "sse": False}

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                state["sse"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                   for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["finished"] = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("the proxy failed while answering %s", scope.get("path"))
        if state["finished"] or (state["started"] and not state["sse"]):
            return  # answered, or a JSON body cut off: nothing valid can follow it
        body = {"error": {"message": REPLICA_LOST, "type": "server_error", "param": None, "code": "replica_lost"}}
        data = json.dumps(body).encode()
        with contextlib.suppress(Exception):  # the client may be gone too
            if not state["started"]:
                await send({"type": "http.response.start", "status": 502, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                    (b"x-should-retry", b"true")]})  # (OpenAI's clients read it; they retry a 502 anyway)
                await send({"type": "http.response.body", "body": data})
            else:
                await send({"type": "http.response.body", "body": b"data: " + data + b"\n\ndata: [DONE]\n\n"})


REPLICA_LOST = ("the replica serving this request stopped before it finished (it died or was restarted); "
                "the request was not completed: retry it")


def proxy_middlewares() -> list[Any]:
    """Serve's proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`): `ReplicaLostMiddleware`."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLostMiddleware)]


PROXY_CALLBACK = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": f"{__name__}:proxy_middlewares"}
# Serve's own proxy checks (5 s to become ready, 10 s per health check, 3 misses) kill a proxy that starts slowly
# on a busy machine, and the whole start fails; these looser values apply unless the environment sets them.
PROXY_CHECKS = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def controller_env() -> dict[str, str]:
    """Environment of Serve's controller (which runs the proxy checks): the proxy callback and the checks'
    timeouts (an operator's own values win)."""
    return {**PROXY_CALLBACK, **{k: os.environ.get(k, v) for k, v in PROXY_CHECKS.items()}}


def http_options(config: ServeConfig) -> dict[str, Any]:
    """Serve's proxy: the server's host and port; its end-to-end timeout a little beyond the server's own,
    so that a slow request gets the server's 504, not the proxy's 408."""
    return {"host": config.host, "port": config.port, "request_timeout_s": config.limits.timeout + 10}


def start(config: ServeConfig, options: RayServeOptions, address: str = "auto") -> str:
    """Connect to Ray (`address`: "auto", a cluster address, or "local" to start one here; a process already
    connected stays on its cluster), start Serve's
    proxy on the config's host and port, deploy the replicas and wait until they are ready. Returns the
    base URL. A replica that cannot start (a bad vector file, say) is a SteerableError."""
    options.check()
    config.check()
    if config.port == 0:
        raise SteerableError("--port 0 (any free port) does not work with --ray: Serve's proxies listen on one fixed "
                             "port on every node; name it")
    serve = import_serve()
    connect(address)
    # (the proxy options and its middleware apply when this call starts Serve; a running Serve keeps its own)
    serve.start(http_options=http_options(config), controller_options={"runtime_env": {"env_vars": controller_env()}})
    try:
        serve.run(build_app(config, options), name=options.app_name, route_prefix="/")
    except RuntimeError as e:  # Serve reports a deployment whose replicas failed to start this way
        raise SteerableError(f"the replicas did not start: {replica_error(serve, options) or first_line(str(e))}"
                             ) from None
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{config.port}"


def stop(options: RayServeOptions) -> None:
    """Remove this application (other Serve applications on the cluster keep running)."""
    serve = import_serve()
    serve.delete(options.app_name)


def replica_error(serve: Any, options: RayServeOptions) -> str | None:
    """The error a replica's constructor raised, from Serve's status of the deployment (its message ends with
    the replica's traceback; the line naming a SteerableError is the one a user can act on)."""
    try:
        message = str(serve.status().applications[options.app_name].deployments[DEPLOYMENT].message)
    except Exception:  # the status is best effort: fall back to Serve's own one-liner
        return None
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    named = [ln for ln in lines if "SteerableError:" in ln]
    if named:
        return named[-1].split("SteerableError:", 1)[1].strip()[:1000]
    return lines[-1][:1000] if lines else None


def first_line(text: str, limit: int = 400) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else text)[:limit]


def banner(config: ServeConfig, options: RayServeOptions, url: str) -> str:
    return "\n".join([
        f"steerable serve: {config.model_id} at {url}/v1 on Ray Serve (OpenAI-compatible; /health, /metrics "
        "per replica)",
        f"  replicas: {options.replicas} × ({options.threads} CPU, {options.gpus_for(config):g} GPU)",
        *([f"  adapter: {config.adapter} (LoRA, from `steerable train`)"] if config.adapter else []),
        *([f"  profiles: {', '.join(str(p) for p in config.profiles)}"] if config.profiles else []),
        f"  vectors: {config.vectors}; presets: {config.presets or 'none'}; default plan: "
        f"{config.default_plan or 'none'}; API keys: {'required' if config.api_keys else 'off'}",
        f"  limits per replica: max_tokens {config.limits.max_tokens}, max_batch {config.limits.max_batch}, "
        f"max_queue {config.limits.max_queue}, timeout {config.limits.timeout:g} s",
    ])


# -- `serve run steerable.scale.ray_serve:app_builder key=value ...` -------------------------------------


class BuilderArgs(BaseModel):
    """The `key=value` arguments of `serve run`. `config` names a JSON file holding any of these keys
    (the limits among them); keys given on the command line win."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    vectors: str | None = None
    config: str | None = None
    adapter: str | None = None  # a `steerable train` directory every node can read
    # profile libraries (or directories of them): a list in a config file; on the command line one path, or several
    # joined with commas
    profiles: str | list[str] | None = None
    presets: str | None = None
    default_plan: str | None = None
    api_keys: str | None = None
    served_name: str | None = None
    dtype: str | None = None
    device: str | None = None
    host: str | None = None
    port: int | None = None
    replicas: int | None = None
    threads: int | None = None
    gpus: float | None = None
    max_tokens: int | None = None
    max_prompt_tokens: int | None = None
    max_batch: int | None = None
    max_queue: int | None = None
    timeout: float | None = None
    max_body_bytes: int | None = None
    batch_window: float | None = None  # seconds
    batching: str | None = None  # continuous | dynamic


LIMIT_KEYS = ("max_tokens", "max_prompt_tokens", "max_batch", "max_queue", "timeout", "max_body_bytes",
              "batch_window", "batching")
CONFIG_KEYS = ("presets", "default_plan", "api_keys", "served_name", "dtype", "device", "host", "port", "adapter")


def parse_builder_args(args: dict[str, Any]) -> tuple[ServeConfig, RayServeOptions]:
    """`serve run`'s arguments (strings) → the config and layout; a SteerableError names a bad one."""
    from pydantic import ValidationError

    try:
        given = BuilderArgs.model_validate(args)
        merged: dict[str, Any] = {}
        if given.config is not None:
            try:
                loaded = json.loads(Path(given.config).read_text("utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SteerableError(f"config={given.config}: cannot read it as JSON ({e})") from None
            if not isinstance(loaded, dict):
                raise SteerableError(f"config={given.config}: must hold a JSON object")
            merged.update(BuilderArgs.model_validate({**loaded, "config": None}).model_dump(exclude_none=True))
        merged.update(given.model_dump(exclude_none=True, exclude={"config"}))
        final = BuilderArgs.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        raise SteerableError(f"serve run argument {where}: {err['msg']}") from None
    if final.model is None or final.vectors is None:
        raise SteerableError("serve run needs model=NAME_OR_DIR and vectors=DIR (or a config= file naming them)")
    limits = Limits(**{k: getattr(final, k) for k in LIMIT_KEYS if getattr(final, k) is not None})
    extra = {k: getattr(final, k) for k in CONFIG_KEYS if getattr(final, k) is not None}
    for k in ("presets", "api_keys", "adapter"):
        if k in extra:
            extra[k] = Path(extra[k])
    if final.profiles is not None:  # (before issue 16 the builder dropped them: replicas served without profiles)
        given_profiles = final.profiles.split(",") if isinstance(final.profiles, str) else final.profiles
        extra["profiles"] = tuple(Path(p.strip()) for p in given_profiles if p.strip())
    config = ServeConfig(model=final.model, vectors=Path(final.vectors), limits=limits, **extra)
    d = RayServeOptions()
    return config, RayServeOptions(replicas=d.replicas if final.replicas is None else final.replicas,
                                   threads=d.threads if final.threads is None else final.threads, gpus=final.gpus)


def app_builder(args: dict[str, Any]) -> Any:
    """For `serve run steerable.scale.ray_serve:app_builder model=... vectors=... [config=FILE] [replicas=N]
    [profiles=P[,P...]] [adapter=DIR]`
    (host and port then come from `serve run`'s own options or a Serve config file)."""
    config, options = parse_builder_args(args)
    return build_app(config, options)
