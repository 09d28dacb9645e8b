"""Request bodies of /v1/chat/completions and /v1/completions: the OpenAI wire format plus `steering` and
`steering_monitor`. Types are strict (1e12 is not an integer, "5" is not a number, true is not 1); an
unknown argument is refused like OpenAI's API refuses it; arguments this server does not implement are
refused unless they carry their neutral value, so a request never silently gets something else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from steerable.serve.errors import bad_request

MAX_SEED = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # sent by newer clients; there is nothing to obfuscate here


class _Common(_Strict):
    model: str = Field(max_length=512)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    user: str | None = Field(default=None, max_length=512)
    steering: Any = None
    steering_monitor: Any = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_budget(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_Common):
    prompt: str | list[str]

    def token_budget(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise bad_request(f"prompt must be one string (or a list of exactly one), got a list of {len(self.prompt)}",
                              "prompt")
        return self.prompt[0]


def _none_or(*neutral: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or any(v == x and type(v) is type(x) for x in neutral)


# Accepted only with the value that means "off": anything else would change the answer in a way we don't.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": _none_or(0, 0.0),
    "presence_penalty": _none_or(0, 0.0),
    "logit_bias": _none_or({}),
    "logprobs": _none_or(False),
    "top_logprobs": _none_or(0),
    "tools": _none_or([]),
    "functions": _none_or([]),
    "tool_choice": _none_or("none", "auto"),
    "function_call": _none_or("none", "auto"),
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "echo": _none_or(False),
    "best_of": _none_or(1),
    "suffix": _none_or(""),
    "metadata": lambda v: v is None or isinstance(v, dict),
    "store": _none_or(False),
    "service_tier": lambda v: v is None or v in ("auto", "default"),
    "modalities": lambda v: v is None or v == ["text"],
    "audio": _none_or(),
    "prediction": _none_or(),
    "reasoning_effort": _none_or(),
    "verbosity": _none_or(),
    "web_search_options": _none_or(),
}
_CHAT_ONLY = {"tools", "functions", "tool_choice", "function_call", "parallel_tool_calls", "response_format",
              "top_logprobs", "metadata", "store", "service_tier", "modalities", "audio", "prediction",
              "reasoning_effort", "verbosity", "web_search_options"}
_COMPLETION_ONLY = {"echo", "best_of", "suffix"}


def _drop_neutral(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    out = {}
    for key, value in body.items():
        applies = key in _NEUTRAL and (key not in _CHAT_ONLY or chat) and (key not in _COMPLETION_ONLY or not chat)
        if not applies:
            out[key] = value
        elif not _NEUTRAL[key](value):
            raise bad_request(f"{key} is not supported by this server (send it unset or with its default value)",
                              key, "unsupported_parameter")
    return out


def _describe(err: Any) -> tuple[str, str]:  # a pydantic ErrorDetails
    loc = ".".join(str(x) for x in err.get("loc", ()) if not str(x).startswith(("function-", "union[", "list[")))
    loc = loc.replace(".str", "").replace(".int", "")
    if err.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {loc}", loc
    got = err.get("input")
    shown = repr(got) if isinstance(got, str | int | float | bool) or got is None else type(got).__name__
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{loc}: {err.get('msg', 'invalid value')} (got {shown})", loc


def parse(body: Any, chat: bool) -> ChatRequest | CompletionRequest:
    """A checked request, or a 400 naming the first fault."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_json")
    model = ChatRequest if chat else CompletionRequest
    try:
        return model.model_validate(_drop_neutral(body, chat))
    except ValidationError as e:
        message, param = _describe(e.errors()[0])
        raise bad_request(message, param or None) from None


def present(req: BaseModel, name: str) -> bool:
    return name in req.model_fields_set
