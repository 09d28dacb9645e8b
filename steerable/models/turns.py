"""Which conversation turn each prompt token belongs to (for the "assistant" and "turns>=k" gates).

Rendering the conversation one message longer at a time gives the character where each message's
text (with its template scaffolding) ends; token offsets map characters to tokens. An exchange is a
user message and the assistant reply to it; the system prompt belongs to exchange 0, and the
generation prompt at the end belongs to the reply being generated.
"""

from __future__ import annotations

from typing import Any

import torch

from steerable.data.messages import Messages as Messages  # re-exported (models/batch.py)
from steerable.data.messages import chat_messages
from steerable.models.load import render_template

#: one prompt's segmentation: per token (exchange index, is-assistant), and the reply's exchange
TurnsRow = tuple[list[int], list[bool], int]


def _messages(prompt: str | Messages, system: str | None) -> Messages:
    """The checked messages (data/messages.py: the one check) that `handle.render(prompt, system)` renders."""
    return chat_messages(prompt, system)


def _prefix_text(handle: Any, msgs: Messages) -> str:
    if handle.has_chat_template:
        return render_template(handle.tokenizer, msgs, add_generation_prompt=False)
    parts = [m["content"] for m in msgs if m["role"] != "assistant" or m["content"]]
    return "\n\n".join(parts)


def segment(handle: Any, prompt: str | Messages, system: str | None = None) -> TurnsRow:
    """Per token of `handle.render(prompt, system)`: (exchange index, is-assistant), and the reply's exchange."""
    msgs = _messages(prompt, system)
    text = handle.render(prompt, system)
    bounds, roles, turns = [], [], []
    exchange = -1
    for i, m in enumerate(msgs):
        if m["role"] == "user":
            exchange += 1
        prefix = _prefix_text(handle, msgs[: i + 1])
        # templates may append a default system prompt or trailing whitespace: fall back to a prefix match
        end = len(prefix) if text.startswith(prefix) else len(_common_prefix(text, prefix))
        bounds.append(end)
        roles.append(m["role"] == "assistant")
        turns.append(max(exchange, 0))
    reply = max(exchange, 0)
    enc = handle.tokenizer(text, add_special_tokens=not handle.has_chat_template, return_offsets_mapping=True)
    tok_turn, tok_asst = [], []
    for start, _ in enc["offset_mapping"]:
        j = next((k for k, b in enumerate(bounds) if start < b), None)
        tok_turn.append(turns[j] if j is not None else reply)
        tok_asst.append(roles[j] if j is not None else True)
    return tok_turn, tok_asst, reply


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def align_right(values: list[Any], n: int, fill: Any) -> list[Any]:
    """The last `n` values, or all of them left-filled to length `n`: a left-padded row's layout."""
    return values[-n:] if len(values) >= n else [fill] * (n - len(values)) + values


def segment_batch(handle: Any, prompts: list[str | Messages], system: str | None,
                  width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded [B, width] exchange indices and assistant flags, and the reply exchange [B]."""
    turn = torch.zeros(len(prompts), width, dtype=torch.long)
    asst = torch.zeros(len(prompts), width, dtype=torch.bool)
    reply = torch.zeros(len(prompts), dtype=torch.long)
    for i, p in enumerate(prompts):
        t, a, r = segment(handle, p, system)
        turn[i] = torch.tensor(align_right(t, width, 0))
        asst[i] = torch.tensor(align_right(a, width, False))
        reply[i] = r
    return turn, asst, reply
