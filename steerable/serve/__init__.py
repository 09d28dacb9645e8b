"""`steerable serve`: an OpenAI-compatible HTTP server that steers each request with its own plan.

Layout: config (limits), library (the vectors a request may name), plans (presets, default plan, request
plans), auth (API keys), monitor (drift projection), schemas (request bodies), admission (request → job),
engine (batched decoding with per-row plans), scheduler (queue + the one worker), metrics, app (HTTP),
server (start-up). docs/serving.md describes the API.
"""

from steerable.serve.config import Limits, ServeConfig

__all__ = ["Limits", "ServeConfig"]
