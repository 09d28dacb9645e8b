"""A checked request → a Job for the worker, or the 4xx that says why not: limits, tokenising, the plan.

Runs on the event loop thread. All tokenizer *encoding* happens here, in one thread (the worker only
decodes): a fast tokenizer's encode may reconfigure it, which must never race another call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from steerable.models.load import Messages, ModelHandle
from steerable.models.turns import align_right, segment
from steerable.serve.auth import Grant
from steerable.serve.config import Limits
from steerable.serve.errors import ApiError, bad_request
from steerable.serve.jobs import Job
from steerable.serve.monitor import parse_monitor
from steerable.serve.plans import Chosen, PlanBook
from steerable.serve.sampling import Sampling
from steerable.serve.schemas import MAX_SEED, ChatRequest, CompletionRequest, present

MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class Admitted:
    job: Job
    chosen: Chosen
    stream: bool
    include_usage: bool


class Admission:
    def __init__(self, handle: ModelHandle, book: PlanBook, limits: Limits, model_id: str) -> None:
        self.handle = handle
        self.book = book
        self.limits = limits
        self.model_id = model_id
        self.context = int(getattr(handle.model.config, "max_position_embeddings", 0) or 0) or None

    def chat(self, req: ChatRequest, grant: Grant) -> Admitted:
        self._check_model(req.model)
        if len(req.messages) > self.limits.max_messages:
            raise bad_request(f"messages: at most {self.limits.max_messages} messages per request", "messages")
        messages: Messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                              for m in req.messages]
        text = self.handle.render(messages)
        ids = self._encode(text, add_special=not self.handle.has_chat_template, param="messages")
        return self._admit(req, grant, ids, messages)

    def completion(self, req: CompletionRequest, grant: Grant) -> Admitted:
        self._check_model(req.model)
        ids = self._encode(req.text(), add_special=True, param="prompt")
        return self._admit(req, grant, ids, None)

    def _encode(self, text: str, add_special: bool, param: str) -> list[int]:
        ids = list(self.handle.tokenizer(text, add_special_tokens=add_special)["input_ids"])
        if not ids:
            raise bad_request("the prompt is empty", param)
        if len(ids) > self.limits.max_prompt_tokens:
            raise bad_request(f"the prompt has {len(ids)} tokens; this server accepts at most "
                              f"{self.limits.max_prompt_tokens}", param, "context_length_exceeded")
        return ids

    def _admit(self, req: ChatRequest | CompletionRequest, grant: Grant, ids: list[int],
               messages: Messages | None) -> Admitted:
        budget, name = req.token_budget()
        room = self.context - len(ids) if self.context else None
        if room is not None and room < 1:
            raise bad_request(f"the prompt has {len(ids)} tokens, the model's context is {self.context}",
                              "messages" if messages is not None else "prompt", "context_length_exceeded")
        if budget is None:
            budget = self.limits.max_tokens if room is None else min(self.limits.max_tokens, room)
        elif budget > self.limits.max_tokens:
            shown = budget if budget < 10**12 else f"a {len(str(budget))}-digit number"
            raise bad_request(f"{name} is {shown}; this server generates at most {self.limits.max_tokens} tokens "
                              "per request", name)
        elif room is not None and budget > room:
            raise bad_request(f"{name} {budget} + the prompt's {len(ids)} tokens exceed the model's context of "
                              f"{self.context}", name, "context_length_exceeded")
        stop = req.stop_strings()
        if len(stop) > self.limits.max_stop:
            raise bad_request(f"stop: at most {self.limits.max_stop} stop strings", "stop")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise bad_request(f"stop: each stop string must have 1 … {MAX_STOP_CHARS} characters", "stop")
        chosen = self.book.choose(req.steering, present(req, "steering"), grant, req.user)
        monitor = parse_monitor(req.steering_monitor, self.book.library, grant)
        turns = None
        if chosen.plan is not None and chosen.plan.needs_turns:
            turns = self.turns(messages, len(ids))
        sampling = self._sampling(req)
        job = Job(ids, chosen.plan, budget, tuple(stop), sampling, monitor, turns, timeout=self.limits.timeout)
        opts = req.stream_options
        if opts is not None and not req.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")
        return Admitted(job, chosen, bool(req.stream), bool(opts and opts.include_usage))

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise ApiError(404, f"the model {model!r} does not exist: this server serves {self.model_id!r}",
                           param="model", code="model_not_found", kind="not_found")

    def _sampling(self, req: ChatRequest | CompletionRequest) -> Sampling:
        temperature = 0.0 if req.temperature is None else float(req.temperature)
        top_p = 1.0 if req.top_p is None else float(req.top_p)
        if not (math.isfinite(temperature) and math.isfinite(top_p)):
            raise bad_request("temperature and top_p must be finite numbers", "temperature")
        seed = None if req.seed is None else req.seed % (MAX_SEED + 1)
        return Sampling(temperature, top_p, seed)

    def turns(self, messages: Messages | None, n: int) -> tuple[list[int], list[bool], int]:
        if messages is None:  # a raw completion prompt: all of it the user's, exchange 0
            return [0] * n, [False] * n, 0
        turn, asst, reply = segment(self.handle, messages)
        # segment tokenises the same rendered text; align from the right, as a left-padded batch does
        return align_right(turn, n, 0), align_right(asst, n, False), reply


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
