"""What `steerable serve` is told at start-up: the model, its files and the limits every request obeys."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from steerable.errors import SteerableError

BATCHING = ("continuous", "dynamic")


@dataclass(frozen=True)
class Limits:
    """Per-request and per-server bounds. A request beyond one gets a 4xx naming the limit."""

    max_tokens: int = 512  # generated tokens per request; also the default when a request gives none
    max_prompt_tokens: int = 4096
    max_batch: int = 16  # rows decoded together
    max_queue: int = 64  # requests waiting for a batch; one more gets 429
    timeout: float = 300.0  # seconds from arrival to the last token, queueing included
    max_body_bytes: int = 1 << 20
    # A batch starts once no request has arrived for this long (at most 4× this after the first one): a
    # burst of clients arriving within a few ms then shares one batch instead of starting one batch each.
    batch_window: float = 0.01
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    max_plan_entries: int = 32  # interventions one request may ask for, conditionals' `then` included
    max_messages: int = 512
    # "continuous": a request joins the running batch at its next decoding step (its own prefill, merged into
    # the batch's KV cache); "dynamic": it waits for the running batch to end (the server before issue 17)
    batching: str = "continuous"

    def check(self) -> None:
        for name in ("max_tokens", "max_prompt_tokens", "max_batch", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise SteerableError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.timeout > 0:
            raise SteerableError(f"--timeout must be positive, got {self.timeout}")
        if self.batching not in BATCHING:
            raise SteerableError(f"--batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if not 0 <= self.batch_window <= 1:
            raise SteerableError(f"--batch-window must be within 0 … 1 s, got {self.batch_window}")


@dataclass(frozen=True)
class ServeConfig:
    model: str
    vectors: Path
    presets: Path | None = None
    default_plan: str | None = None  # a plan file, or the name of a preset
    api_keys: Path | None = None
    profiles: tuple[Path, ...] = ()  # profile library files (or directories of them): per-user steering
    host: str = "127.0.0.1"
    port: int = 8000
    served_name: str | None = None  # the model id clients send; default: the --model name (a directory's name)
    dtype: str = "float32"
    device: str | None = None
    limits: Limits = field(default_factory=Limits)
    adapter: Path | None = None  # a `steerable train` output directory, loaded onto the model at start-up

    def check(self) -> None:
        """Start-up arguments that cannot work: a SteerableError naming the flag (the CLI exits 2)."""
        self.limits.check()
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise SteerableError(f"--port must be within 0 … 65535 (0: any free port), got {self.port}")
        if not self.host or any(c.isspace() or not c.isprintable() for c in self.host):
            raise SteerableError(f"--host {self.host!r} is not a host name or address")
        if self.vectors.exists() and not self.vectors.is_dir():
            raise SteerableError(f"--vectors {self.vectors}: not a directory (it is a file)")
        if self.presets is not None and self.presets.exists() and not self.presets.is_dir():
            raise SteerableError(f"--presets {self.presets}: not a directory (it is a file)")
        for p in self.profiles:
            if not Path(p).exists():
                raise SteerableError(f"--profiles {p}: no such file or directory")
        if self.adapter is not None and not Path(self.adapter).is_dir():
            raise SteerableError(f"--adapter {self.adapter}: no such directory (a `steerable train` output)")

    @property
    def model_id(self) -> str:
        if self.served_name:
            return self.served_name
        p = Path(self.model)
        return p.name if p.exists() else self.model
