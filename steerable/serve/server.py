"""Start-up: load the model and everything requests may use (each checked once, here), then run uvicorn."""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass

import torch
import uvicorn

from steerable.errors import SteerableError
from steerable.models.load import ModelHandle, load_model
from steerable.serve.admission import Admission
from steerable.serve.auth import ApiKeys
from steerable.serve.config import Limits, ServeConfig
from steerable.serve.engine import Engine
from steerable.serve.library import VectorLibrary
from steerable.serve.metrics import Metrics
from steerable.serve.plans import PlanBook
from steerable.serve.scheduler import Scheduler

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

    @classmethod
    def build(cls, handle: ModelHandle, config: ServeConfig) -> ServerState:
        """Everything but the model is loaded here; any bad file stops the server before it listens."""
        config.limits.check()
        library = VectorLibrary.load(config.vectors, handle)
        book = PlanBook.load(handle, library, config.presets, config.default_plan, config.limits.max_plan_entries)
        keys = ApiKeys.load(config.api_keys)
        scheduler_box: list[Scheduler] = []
        metrics = Metrics(queue_depth=lambda: scheduler_box[0].depth if scheduler_box else 0)
        scheduler = Scheduler(Engine(handle, metrics), config.limits, metrics)
        scheduler_box.append(scheduler)
        admission = Admission(handle, book, config.limits, config.model_id)
        return cls(config.model_id, handle, library, book, keys, config.limits, metrics, scheduler, admission,
                   int(time.time()))

    @classmethod
    def load(cls, config: ServeConfig) -> ServerState:
        if config.dtype not in DTYPES:
            raise SteerableError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
        handle = load_model(config.model, dtype=DTYPES[config.dtype], device=config.device)
        return cls.build(handle, config)

    def banner(self, url: str) -> str:
        lines = [f"steerable serve: {self.model_id} at {url}/v1 (OpenAI-compatible; /health, /metrics)",
                 f"  vectors ({self.library.directory}): {', '.join(self.library.names) or 'none'}",
                 f"  presets: {', '.join(sorted(self.book.presets)) or 'none'}",
                 f"  default plan: {self.book.default_name or 'none (requests are unsteered unless they ask)'}",
                 f"  API keys: {'required' if self.keys.enabled else 'off (anyone who can reach the port may call)'}",
                 f"  limits: max_tokens {self.limits.max_tokens}, max_prompt_tokens {self.limits.max_prompt_tokens}, "
                 f"max_batch {self.limits.max_batch}, max_queue {self.limits.max_queue}, "
                 f"timeout {self.limits.timeout:g} s, body {self.limits.max_body_bytes} bytes"]
        return "\n".join(lines)


def uvicorn_server(state: ServerState, host: str, port: int, log_level: str = "warning") -> uvicorn.Server:
    """The app on uvicorn, not yet running: `serve` runs it in the foreground, tests in a thread."""
    from steerable.serve.app import create_app

    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on")
    return uvicorn.Server(config)


def serve(config: ServeConfig) -> None:
    """Load, check, print where it listens and what it serves, and serve until interrupted."""
    state = ServerState.load(config)
    server = uvicorn_server(state, config.host, config.port)
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as e:
        raise SteerableError(f"cannot listen on {config.host}:{config.port}: {e.strerror}") from None
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(state.banner(f"http://{host}:{sock.getsockname()[1]}"), file=sys.stderr, flush=True)
    server.run(sockets=[sock])
