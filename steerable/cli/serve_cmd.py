"""`steerable serve`: the OpenAI-compatible server with per-request steering (docs/serving.md)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from steerable.cli.train_cmd import add_adapter_flag
from steerable.errors import SteerableError
from steerable.models.builtin import DEFAULT_MODEL
from steerable.serve.config import BATCHING, Limits, ServeConfig

_D = Limits()


def add_serve_parser(sub: Any) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with per-request steering")
    s.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, Hugging Face directory or .gguf")
    add_adapter_flag(s)  # loaded once, at start-up, onto the served model (each Ray replica's too)
    s.add_argument("--vectors", required=True, type=Path,
                   help="directory of *.safetensors direction files: the only vectors requests may name")
    s.add_argument("--presets", type=Path, help="directory of plan JSON files (e.g. from `steerable tune --out`)")
    s.add_argument("--default-plan", help="plan JSON file or preset name applied to requests that send no steering")
    s.add_argument("--profiles", type=Path, nargs="+", action="extend", default=[], metavar="P",
                   help="profile libraries (`steerable users fit --out`, or directories of them) for per-user "
                        "steering: a plan entry {\"profile\": NAME, ...} is composed for the request's user")
    s.add_argument("--api-keys", type=Path,
                   help='JSON {"KEY": {"vectors": [...], "presets": [...], "profiles": [...]} | "*"}')
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-name", help="model id clients send (default: the --model name)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--device", help="e.g. cuda (default: CPU)")
    s.add_argument("--max-tokens", type=int, default=_D.max_tokens,
                   help="generated tokens per request (also the default)")
    s.add_argument("--max-prompt-tokens", type=int, default=_D.max_prompt_tokens)
    s.add_argument("--max-batch", type=int, default=_D.max_batch, help="requests decoded together")
    s.add_argument("--max-queue", type=int, default=_D.max_queue, help="waiting requests; beyond: 429")
    s.add_argument("--timeout", type=float, default=_D.timeout, help="seconds per request, queueing included")
    s.add_argument("--max-body-bytes", type=int, default=_D.max_body_bytes)
    s.add_argument("--batch-window", type=float, default=_D.batch_window * 1000, metavar="MS",
                   help="how long a batch waits for more requests after its first one arrives (ms)")
    s.add_argument("--batching", default=_D.batching, choices=BATCHING,
                   help="continuous: requests join the running batch at the next step; dynamic: they wait for it")
    s.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="serve on Ray Serve (docs/scaling.md): a running cluster ('auto', the default when the "
                        "flag has no value, or ADDRESS), or 'local' for a new one on this machine")
    s.add_argument("--replicas", type=int, default=1, help="with --ray: server replicas, each with its own model")
    s.add_argument("--replica-threads", type=int, default=1,
                   help="with --ray: torch threads (and CPUs reserved) per replica")
    s.set_defaults(fn=cmd_serve)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, max_batch=args.max_batch,
                    max_queue=args.max_queue, timeout=args.timeout, max_body_bytes=args.max_body_bytes,
                    batch_window=args.batch_window / 1000, batching=args.batching)
    return ServeConfig(model=args.model, vectors=args.vectors, presets=args.presets, default_plan=args.default_plan,
                       api_keys=args.api_keys, profiles=tuple(args.profiles), host=args.host, port=args.port,
                       served_name=args.served_name, dtype=args.dtype, device=args.device, limits=limits,
                       adapter=None if args.adapter is None else Path(args.adapter))


def cmd_serve(args: argparse.Namespace) -> int:
    from steerable.serve.server import serve

    config = config_from_args(args)
    config.check()  # before the model loads: a bad flag costs nothing
    if args.ray is not None:
        return serve_on_ray(config, args)
    if args.replicas != 1 or args.replica_threads != 1:
        raise SteerableError("--replicas and --replica-threads need --ray")
    serve(config)
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def serve_on_ray(config: ServeConfig, args: argparse.Namespace) -> int:
    import time

    from steerable.scale.ray_serve import RayServeOptions, banner, start, stop

    options = RayServeOptions(replicas=args.replicas, threads=args.replica_threads)
    options.check()
    url = start(config, options, address=args.ray)
    print(banner(config, options, url), file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop removes the app too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop(options)
    return 0
