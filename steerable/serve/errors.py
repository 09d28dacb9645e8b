"""Errors a request can get, in the OpenAI wire format: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

# The OpenAI client maps status codes to exception classes; `type` mirrors what its API sends.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}


class ApiError(Exception):
    """A request fault (4xx) or a server fault (5xx) with the message the client sees.

    Deliberately not a ValueError: plan resolvers raise it through `build_plan`, which would otherwise
    treat it like any other validation message and lose the status (403 vs 400).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or code or _TYPES.get(status, "error")
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code, kind="invalid_request")
