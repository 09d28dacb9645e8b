"""Start-up: load the model and everything requests may use (each checked once, here), then run uvicorn."""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import dataclass

import h11
import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from steerable.errors import SteerableError
from steerable.models.load import Messages, ModelHandle
from steerable.serve.admission import Admission
from steerable.serve.auth import ApiKeys
from steerable.serve.config import Limits, ServeConfig
from steerable.serve.engine import Engine
from steerable.serve.errors import ApiError
from steerable.serve.jobs import Job
from steerable.serve.library import VectorLibrary
from steerable.serve.metrics import Metrics
from steerable.serve.plans import PlanBook
from steerable.serve.profiles import ProfileShelf
from steerable.serve.scheduler import Scheduler
from steerable.steering.plan import SteeringPlan
from steerable.train.adapter import load_adapted

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ServerState:
    model_id: str
    handle: ModelHandle
    library: VectorLibrary
    book: PlanBook
    keys: ApiKeys
    limits: Limits
    metrics: Metrics
    scheduler: Scheduler
    admission: Admission
    started: int
    adapter: str | None = None  # the `steerable train` adapter directory on the served model (--adapter)

    @classmethod
    def build(cls, handle: ModelHandle, config: ServeConfig) -> ServerState:
        """Everything but the model is loaded here; any bad file stops the server before it listens."""
        config.check()
        library = VectorLibrary.load(config.vectors, handle)
        shelf = ProfileShelf.load(config.profiles, handle)
        book = PlanBook.load(handle, library, config.presets, config.default_plan, config.limits.max_plan_entries,
                             shelf)
        keys = ApiKeys.load(config.api_keys)
        scheduler_box: list[Scheduler] = []
        metrics = Metrics(queue_depth=lambda: scheduler_box[0].depth if scheduler_box else 0)
        scheduler = Scheduler(Engine(handle, metrics), config.limits, metrics)
        scheduler_box.append(scheduler)
        admission = Admission(handle, book, config.limits, config.model_id)
        # a preset or default plan that cannot run is refused now, not at every request that uses it
        trial = Engine(handle, Metrics())
        # (a preset naming a profile library runs for a user the library lacks: its population vector)
        for name, plan in sorted(book.presets.items()):
            trial_run(trial, admission, book.instance(plan, None), f"preset {name}")
        if book.default is not None and all(book.default is not p for p in book.presets.values()):
            trial_run(trial, admission, book.instance(book.default, None), f"default plan {book.default_name}")
        return cls(config.model_id, handle, library, book, keys, config.limits, metrics, scheduler, admission,
                   int(time.time()), None if config.adapter is None else str(config.adapter))

    @classmethod
    def load(cls, config: ServeConfig) -> ServerState:
        if config.dtype not in DTYPES:
            raise SteerableError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
        # the adapter goes on once, here, before the files are checked against the model: every request (and every
        # preset's trial run) sees the adapted model
        handle = load_adapted(config.model, config.adapter, dtype=DTYPES[config.dtype], device=config.device)
        return cls.build(handle, config)

    def banner(self, url: str) -> str:
        lines = [f"steerable serve: {self.model_id} at {url}/v1 (OpenAI-compatible; /health, /metrics)",
                 *([f"  adapter: {self.adapter} (LoRA, from `steerable train`)"] if self.adapter else []),
                 f"  vectors ({self.library.directory}): {', '.join(self.library.names) or 'none'}",
                 f"  presets: {', '.join(sorted(self.book.presets)) or 'none'}",
                 *([f"  profiles (per-user, from the request's user): {', '.join(self.book.shelf.describe())}"]
                   if self.book.shelf else []),
                 f"  default plan: {self.book.default_name or 'none (requests are unsteered unless they ask)'}",
                 f"  API keys: {'required' if self.keys.enabled else 'off (anyone who can reach the port may call)'}",
                 f"  limits: max_tokens {self.limits.max_tokens}, max_prompt_tokens {self.limits.max_prompt_tokens}, "
                 f"max_batch {self.limits.max_batch}, max_queue {self.limits.max_queue}, "
                 f"timeout {self.limits.timeout:g} s, body {self.limits.max_body_bytes} bytes"]
        return "\n".join(lines)


def trial_run(engine: Engine, admission: Admission, plan: SteeringPlan, origin: str) -> None:
    """Decode two tokens of a short chat and of a raw completion prompt under `plan`, as admission prepares
    them; a SteerableError naming `origin` if it cannot run."""
    handle = engine.handle
    messages: Messages = [{"role": "user", "content": "Hello"}]
    try:
        text = handle.render(messages)
        for ids, chat in ((handle.tokenizer(text, add_special_tokens=not handle.has_chat_template), messages),
                          (handle.tokenizer("Hello", add_special_tokens=True), None)):
            prompt = list(ids["input_ids"])
            turns = admission.turns(chat, len(prompt)) if plan.needs_turns else None
            engine.trial(Job(prompt, plan, 2, turns=turns))
    except Exception as e:
        kind = "" if isinstance(e, SteerableError) else f"{type(e).__name__}: "
        raise SteerableError(f"{origin} cannot run on {handle.name}: {kind}{e}") from None


def json_http_protocol(metrics: Metrics) -> type[H11Protocol]:
    """uvicorn's h11 protocol, but a request whose HTTP framing h11 cannot parse (a garbled request line,
    a bad Content-Length or chunk size, …) gets the server's JSON error body instead of plain text, and is
    counted in /metrics. Everything else is uvicorn's own."""

    class JsonErrorsH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            metrics.answered("other", 400, error="bad_http")
            body = json.dumps(ApiError(400, f"malformed HTTP request: {msg}", code="invalid_http",
                                       kind="bad_http").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                       (b"content-length", str(len(body)).encode())]
            try:
                self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers,
                                                                 reason=b"Bad Request")) or b"")
                self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
                self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
            except h11.LocalProtocolError:  # a response had already started: nothing more can be said
                pass
            self.transport.close()

    return JsonErrorsH11Protocol


def uvicorn_server(state: ServerState, host: str, port: int, log_level: str = "warning") -> uvicorn.Server:
    """The app on uvicorn, not yet running: `serve` runs it in the foreground, tests in a thread."""
    from steerable.serve.app import create_app

    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on", http=json_http_protocol(state.metrics))
    return uvicorn.Server(config)


def serve(config: ServeConfig) -> None:
    """Load, check, print where it listens and what it serves, and serve until interrupted."""
    state = ServerState.load(config)
    server = uvicorn_server(state, config.host, config.port)
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except (OSError, OverflowError, UnicodeError) as e:
        sock.close()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SteerableError(f"cannot listen on {config.host}:{config.port}: {reason}") from None
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(state.banner(f"http://{host}:{sock.getsockname()[1]}"), file=sys.stderr, flush=True)
    server.run(sockets=[sock])
