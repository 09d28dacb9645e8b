"""The HTTP surface (FastAPI on uvicorn): OpenAI-compatible completions with per-request steering, plus
/v1/models, /health and /metrics. Handlers validate and admit; the scheduler's worker generates."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from steerable.errors import SteerableError
from steerable.serve import schemas
from steerable.serve.admission import Admitted, usage
from steerable.serve.errors import ApiError, bad_request
from steerable.serve.jobs import Delta, Done, Event, Failed, Job

if TYPE_CHECKING:
    from steerable.serve.server import ServerState

log = logging.getLogger("steerable.serve")
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
DISCONNECTED = 499  # nginx's "client closed request": counted, never sent
MAX_DEPTH = 32  # JSON nesting a request body may have (a plan with 8 nested conditionals needs about 20)
ENDPOINTS = frozenset({CHAT, COMPLETIONS, "/v1/models", "/health", "/metrics"})


def endpoint_label(request: Request) -> str:
    """The endpoint a request went to, as a metric label: known paths only, so labels stay few."""
    path = request.url.path
    return path if path in ENDPOINTS else "other"


def error_response(e: ApiError) -> JSONResponse:
    headers = dict(e.headers)
    if e.status == 413:
        headers["Connection"] = "close"  # the rest of the body was never read
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    x = float(text)
    if x in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:30]} is out of range")
    return x


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing more than `limit` bytes (413) and NaN/Infinity/overflowing numbers (400)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise bad_request("invalid Content-Length header", None, "invalid_request")
        if len(length) > 18 or int(length) > limit:  # (a 5000-digit length would overflow int())
            raise ApiError(413, f"request body of {length} bytes exceeds this server's limit of {limit} bytes",
                           code="body_too_large", kind="body_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds this server's limit of {limit} bytes",
                               code="body_too_large", kind="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # the client left (or its framing broke) before the body was read
        raise ApiError(DISCONNECTED, "client disconnected", kind="disconnect") from None
    try:
        body = json.loads(b"".join(chunks).decode("utf-8"), parse_constant=_reject_constant,
                          parse_float=_finite_float)
    except UnicodeDecodeError:
        raise bad_request("the request body is not UTF-8", None, "invalid_json") from None
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", None,
                          "invalid_json") from None
    except (ValueError, RecursionError) as e:
        msg = str(e) if isinstance(e, ValueError) else "nested too deeply"
        raise bad_request(f"the request body is not valid JSON: {msg[:120]}", None, "invalid_json") from None
    check_tree(body)
    return body


def _where(path: tuple[str | int, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out[:200]


def check_tree(body: Any, max_depth: int = MAX_DEPTH) -> None:
    """400 for JSON nested deeper than `max_depth` or holding text that is not Unicode (a lone surrogate
    such as "\\udc00" decodes to a str that cannot be encoded as UTF-8, so no tokenizer can take it)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > max_depth:
            raise bad_request(f"the request body is nested too deeply (at most {max_depth} levels) at "
                              f"{_where(path[:8])}…", _where(path[:1]) or None, "invalid_json")
        if isinstance(value, str):
            _check_text(value, path, path)
        elif isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, (*path, "<key>"), path)
                stack.append((v, (*path, k)))
        elif isinstance(value, list):
            stack.extend((v, (*path, i)) for i, v in enumerate(value))


def _check_text(text: str, where: tuple[str | int, ...], path: tuple[str | int, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        field = _where(where) or "the request body"
        raise bad_request(f"{field}: the text is not valid Unicode (it holds a lone surrogate such as \\udc00, "
                          "which cannot be encoded as UTF-8)", _where(path) or None, "invalid_text") from None


class Watch:
    """Cancels a job when its client disconnects or its deadline passes, and wakes the handler."""

    def __init__(self, job: Job, request: Request, state: ServerState) -> None:
        self.job = job
        self.state = state
        self._task = asyncio.create_task(self._disconnect(request))
        self._timer = asyncio.get_running_loop().call_later(max(0.0, job.deadline - time.monotonic()),
                                                            self._timeout)

    async def _disconnect(self, request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.cancel("disconnect", ApiError(DISCONNECTED, "client disconnected", kind="disconnect"))
                return

    def _timeout(self) -> None:
        self.cancel("timeout", ApiError(504, f"request timed out after {self.job.timeout:g} s", code="timeout",
                                        kind="timeout"))

    def cancel(self, reason: str, error: ApiError | None = None) -> None:
        if self.job.cancel(reason):
            self.state.metrics.cancel(reason)
            if error is not None:
                self.job.events.put_nowait(Failed(error))

    def close(self) -> None:
        self._task.cancel()
        self._timer.cancel()


class Reply:
    """Builds the response objects of one request in the OpenAI format."""

    def __init__(self, admitted: Admitted, model: str, chat: bool) -> None:
        self.admitted = admitted
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def steering(self, done: Done) -> dict[str, Any]:
        out = self.admitted.chosen.to_json()
        if done.monitor is not None:
            out["monitor"] = done.monitor
        return out

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, done: Done) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": done.finish_reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage(done.prompt_tokens, done.completion_tokens),
                "steering": self.steering(done)}

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return {**head, "choices": [], "usage": usage(done.prompt_tokens, done.completion_tokens),
                "steering": self.steering(done)}


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(state.scheduler.stop)

    app = FastAPI(title="steerable", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = state.metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        msg = "no such endpoint" if status == 404 else str(exc.detail)
        metrics.answered(endpoint_label(request), status, error="not_found" if status == 404 else f"http_{status}")
        return error_response(ApiError(status, msg, code="not_found" if status == 404 else None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # (the traceback itself is logged by uvicorn, to which Starlette re-raises it)
        log.error("unhandled %s answering %s %s", type(exc).__name__, request.method, endpoint_label(request))
        metrics.answered(endpoint_label(request), 500, error="internal")
        return error_response(ApiError(500, "internal server error", code="internal_error"))

    async def complete(request: Request, chat: bool) -> Response:
        endpoint = CHAT if chat else COMPLETIONS
        try:
            grant = state.keys.check(request.headers.get("authorization"))
            body = await read_json(request, state.limits.max_body_bytes)
            req = schemas.parse(body, chat)
            if isinstance(req, schemas.ChatRequest):
                admitted = state.admission.chat(req, grant)
            else:
                admitted = state.admission.completion(req, grant)
            reply = Reply(admitted, state.model_id, chat)
            admitted.job.request_id = reply.id
            state.scheduler.submit(admitted.job)
        except SteerableError as e:  # bad input found while admitting (e.g. a chat template refusing the messages)
            err = bad_request(str(e), None, "invalid_request")
            metrics.answered(endpoint, err.status, error=err.kind)
            return error_response(err)
        except ApiError as e:
            metrics.answered(endpoint, e.status, error=e.kind)
            return error_response(e)
        metrics.admitted(len(admitted.job.prompt_ids))
        watch = Watch(admitted.job, request, state)
        if admitted.stream:
            return await stream(endpoint, reply, watch)
        try:
            return await collect(endpoint, reply, admitted.job)
        except asyncio.CancelledError:  # the handler itself was cancelled: Ray Serve's way of saying the client left
            watch.cancel("disconnect")
            raise
        finally:
            watch.close()

    def finished(endpoint: str, job: Job, status: int, error: str | None = None) -> None:
        metrics.answered(endpoint, status, time.monotonic() - job.created, error)

    async def collect(endpoint: str, reply: Reply, job: Job) -> Response:
        parts = []
        while True:
            event = await job.events.get()
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Done):
                response = JSONResponse(reply.full("".join(parts), event))  # before counting: it may raise
                finished(endpoint, job, 200)
                return response
            else:
                finished(endpoint, job, event.error.status, event.error.kind)
                return error_response(event.error)

    async def stream(endpoint: str, reply: Reply, watch: Watch) -> Response:
        job = watch.job
        # wait for the first event before answering, so that an early failure still gets its status code
        try:
            first = await job.events.get()
        except BaseException:
            watch.cancel("disconnect")  # (a no-op unless the job is still running)
            watch.close()
            raise
        if isinstance(first, Failed):
            watch.close()
            finished(endpoint, job, first.error.status, first.error.kind)
            return error_response(first.error)

        async def events() -> AsyncIterator[bytes]:
            event: Event = first
            status: int = DISCONNECTED
            error: str | None = "disconnect"
            try:
                yield sse(reply.chunk(role=True) if reply.chat else reply.chunk(""))
                while True:
                    if isinstance(event, Delta):
                        yield sse(reply.chunk(event.text))
                    elif isinstance(event, Done):
                        yield sse({**reply.chunk(finish=event.finish_reason), "steering": reply.steering(event)})
                        if reply.admitted.include_usage:
                            yield sse(reply.usage_chunk(event))
                        yield sse("[DONE]")
                        status, error = 200, None
                        return
                    else:
                        status, error = event.error.status, event.error.kind
                        if status != DISCONNECTED:
                            yield sse(event.error.body())
                            yield sse("[DONE]")
                        return
                    event = await job.events.get()
            except Exception:  # the status line is sent: the client gets an error event instead of a 500
                log.exception("request %s failed while streaming", job.request_id)
                status, error = 500, "internal"
                yield sse(ApiError(500, "internal server error", code="internal_error").body())
                yield sse("[DONE]")
            finally:
                watch.close()
                watch.cancel("disconnect")  # a no-op unless the client left mid-stream
                finished(endpoint, job, status, error)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post(CHAT)
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post(COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            grant = state.keys.check(request.headers.get("authorization"))
        except ApiError as e:
            metrics.answered("/v1/models", e.status, error=e.kind)
            return error_response(e)
        metrics.answered("/v1/models", 200)
        book = state.book
        steering = {"vectors": [v for v in state.library.names if grant.allows_vector(v)],
                    "presets": [p for p in sorted(book.presets) if grant.allows_preset(p)],
                    "default_plan": book.default is not None}
        if book.shelf:  # listed only when the server has profile libraries, so older clients see what they did
            steering["profiles"] = [p for p in book.shelf.names if grant.allows_profile(p)]
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_id, "object": "model", "created": state.started, "owned_by": "steerable",
             "steering": steering}]})

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok", "model": state.model_id, "queue_depth": state.scheduler.depth})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
