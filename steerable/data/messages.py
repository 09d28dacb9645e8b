"""Chat messages: the one check every prompt, conversation and rendered message list goes through.

A prompt is a string or a list of chat messages `{"role": "system"|"user"|"assistant", "content": str}`:
at least one message, at most MAX_MESSAGES, each text at most MAX_CHARS characters and encodable as UTF-8
(no lone surrogates, which JSON's "\\ud800" escapes can produce). `load_prompt_rows`, `load_conversations`,
`ModelHandle.render` and the turn segmenter all check with these functions, so every path refuses the same
inputs with a `DataError` naming where the problem is and which key.
"""

from __future__ import annotations

from typing import Any

from steerable.errors import DataError

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content")
MAX_MESSAGES = 1024  # the server allows 512
MAX_CHARS = 1_000_000  # per text (a prompt string or one message's content)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}…"


def check_text(value: Any, where: str, key: str) -> str:
    """A string of at most MAX_CHARS characters that UTF-8 can encode; `where`/`key` name it in errors."""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key} must be a string, got {type(value).__name__}")
    if len(value) > MAX_CHARS:
        raise DataError(f"{where}: {key} is {len(value)} characters long (at most {MAX_CHARS})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: {key} is not valid Unicode text (a lone surrogate)") from None
    return value


def check_messages(value: Any, where: str = "prompt", key: str = "prompt") -> Messages:
    """A checked copy of a chat message list (see the module docstring); DataError names the message and key."""
    if not isinstance(value, list):
        raise DataError(f"{where}: {key} must be a list of chat messages, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: {key} is an empty list: give at least one message")
    if len(value) > MAX_MESSAGES:
        raise DataError(f"{where}: {key} has {len(value)} messages (at most {MAX_MESSAGES})")
    out: Messages = []
    for i, m in enumerate(value):
        at = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: {at} must be a message {{\"role\", \"content\"}}, got {type(m).__name__}")
        missing = [k for k in MESSAGE_KEYS if k not in m]
        if missing:
            raise DataError(f"{where}: {at} has no \"{missing[0]}\"")
        extra = sorted(str(k) for k in m if k not in MESSAGE_KEYS)
        if extra:
            raise DataError(f"{where}: {at} has unknown key(s) {extra[:5]}: a message has only \"role\" and "
                            "\"content\"")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{where}: {at}.role must be one of {', '.join(ROLES)}, got {_show(role)}")
        out.append({"role": role, "content": check_text(m["content"], where, f"{at}.content")})
    return out


def check_prompt(value: Any, where: str = "prompt", key: str = "prompt") -> str | Messages:
    """A prompt: a string (checked with check_text) or a chat message list (check_messages)."""
    if isinstance(value, str):
        return check_text(value, where, key)
    if isinstance(value, list):
        return check_messages(value, where, key)
    raise DataError(f"{where}: {key} must be a string or a list of chat messages, got {type(value).__name__}")


def chat_messages(prompt: Any, system: Any = None, where: str = "prompt") -> Messages:
    """The checked message list a prompt (string or messages), with an optional system prompt first, stands for."""
    p = check_prompt(prompt, where)
    msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
    if system is None:
        return msgs
    return check_messages([{"role": "system", "content": system}, *msgs], where, "messages")


__all__ = ["MAX_CHARS", "MAX_MESSAGES", "ROLES", "Messages", "chat_messages", "check_messages", "check_prompt",
           "check_text"]
