"""Attach plans to a model for the duration of a `with` block; the hooks always come off.

One pre-hook on the whole model records what each forward pass covers (prompt or generated positions,
cache length) so gates and conditions are evaluated once per pass; one hook per steered (site, layer)
runs that position's slots. Weights are never touched.

Where the prompt ends: declared by `steer(..., batch=PromptBatch)` or `session.begin(prompt_len)`, or else
taken from the first forward pass without a cache (past length 0) and kept for the cached passes that
follow. So `with steer(handle, plan): handle.model.generate(...)` (or a transformers pipeline) steers
the same tokens as `steerable.generate`, gates included. Turn gates need the prompt's turn boundaries,
which a bare forward pass does not carry: without them the first forward pass raises a PlanError.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from steerable.capture.sites import get_hidden, replace_hidden, site_module
from steerable.errors import PlanError
from steerable.models.batch import PromptBatch
from steerable.steering.cast import CastCondition
from steerable.steering.compile import Compiled, Slot, compile_plans, site_order
from steerable.steering.gates import NONE, TokenView
from steerable.steering.plan import SteeringPlan, build_plan, build_row_plans, caching_resolver, load_vector_file


class _StopPrepass(Exception):
    """Raised after the last condition is decided: the rest of the pre-pass is not needed."""


class Session:
    """The state of one `steer` block: what the current forward pass covers and each row's decisions."""

    def __init__(self, handle: Any, compiled: Compiled):
        self.handle = handle
        self.compiled = compiled
        self.view: TokenView | None = None
        self.decisions: dict[CastCondition, torch.Tensor] = {}
        self._declared: int | None = None  # prompt length given by begin()
        self._inferred: int | None = None  # prompt length read off the last uncached forward pass
        self._ends: torch.Tensor | None = None  # per-row prompt ends given by begin()
        self._turns: dict[str, torch.Tensor | None] = {}
        self._deciding = False
        self._prepass = False
        self._last_condition = max(compiled.conditions, key=lambda k: site_order(*k), default=None)
        self._ref = next(handle.model.parameters())  # device and dtype for gate masks

    @property
    def needs_turns(self) -> bool:
        return self.compiled.needs_turns

    def begin(self, prompt_len: int, turn: torch.Tensor | None = None, assistant: torch.Tensor | None = None,
              reply_turn: torch.Tensor | None = None, ends: torch.Tensor | None = None) -> None:
        """Declare the (left-padded) prompt of the next generation: positions 0 … prompt_len−1.

        `turn` [B, prompt_len] (exchange index per prompt token), `assistant` [B, prompt_len] (bool) and
        `reply_turn` [B] feed the "assistant" and "turns>=k" gates. `ends` [B]: where each row's prompt ended,
        for rows that joined a running batch at different times (the position gates count from it). Without
        `begin`, the prompt is what the first uncached forward pass covers.
        """
        self._declared = prompt_len
        self._ends = ends
        self._turns = {"turn": turn, "assistant": assistant, "reply_turn": reply_turn}

    def begin_batch(self, batch: PromptBatch) -> None:
        """Declare a PromptBatch's prompts (and, when a gate needs them, their turns)."""
        turns = batch.turns() if self.compiled.needs_turns else None
        self.begin(batch.width, *(turns or ()))

    # -- hooks ---------------------------------------------------------------------------------

    def _prompt_len(self, past: int, length: int) -> int:
        if self._declared is not None:
            return self._declared
        if past == 0:
            self._inferred = length
        if self._inferred is None:
            if self.compiled.needs_boundary:
                raise PlanError(
                    "this plan's gate depends on where the prompt ends, but steering began in the middle of a "
                    "generation (the first forward pass had a cache): enter steer() before the prompt's forward "
                    "pass, or call session.begin(prompt_len)")
            return past + length
        return self._inferred

    def _on_forward(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._prepass:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        batch, length = int(ids.shape[0]), int(ids.shape[1])
        n = self.compiled.n_rows
        if n is not None and batch != n:
            raise PlanError(f"this steering session has per-row plans for {n} rows, got a batch of {batch}")
        if self.compiled.needs_turns and self._turns.get("turn") is None and self._turns.get("assistant") is None:
            raise PlanError(
                "an \"assistant\" or \"turns>=k\" gate needs the prompt's turn boundaries, which a bare forward pass "
                "does not carry: use steerable.generate(), or steer(handle, plan, batch=PromptBatch.encode(handle, "
                "prompts))")
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        self.view = TokenView(batch=batch, past=past, length=length, prompt_len=self._prompt_len(past, length),
                              device=self._ref.device, dtype=self._ref.dtype,
                              attention_mask=kwargs.get("attention_mask"), turn=self._turns.get("turn"),
                              assistant=self._turns.get("assistant"), reply_turn=self._turns.get("reply_turn"),
                              ends=self._ends)
        if past == 0 and self.compiled.conditions:
            self.decisions = {}
            self._deciding = True
            if self.compiled.needs_prepass:
                self._run_prepass(kwargs, ids)

    def _run_prepass(self, kwargs: dict[str, Any], ids: torch.Tensor) -> None:
        """Decide every condition before any gated op runs: a forward pass up to the last condition layer."""
        inputs = {k: kwargs[k] for k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
                  if kwargs.get(k) is not None}
        if "input_ids" not in inputs and "inputs_embeds" not in inputs:
            inputs["input_ids"] = ids
        self._prepass = True
        try:
            self.handle.model(**inputs, use_cache=False)
        except _StopPrepass:
            pass
        finally:
            self._prepass = False
        self._deciding = False

    def _make_hook(self, key: tuple[str, int], slots: list[Slot], conditions: list[CastCondition],
                   pre: bool) -> Callable[..., Any]:
        is_last = key == self._last_condition

        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any = None) -> Any:
            h = get_hidden(args, kwargs, output, pre)
            view = self.view
            if view is None:
                raise PlanError("steering hooks ran outside a forward pass of the steered model")
            if conditions and self._deciding:
                for c in conditions:
                    self.decisions[c] = c.decide(h, view)
                if is_last:
                    self._deciding = False
                    if self._prepass:
                        raise _StopPrepass
            for slot in slots:
                if slot.static:
                    h = slot.method.apply(h, None, slot.params)
                    continue
                mask = slot.mask(view, self.decisions)
                if mask is not NONE:
                    h = slot.method.apply(h, mask, slot.params)  # type: ignore[arg-type]
            return replace_hidden(args, kwargs, output, pre, h)
        return hook


@contextlib.contextmanager
def steer(handle: Any, plan: Any = None, *, rows: Sequence[Any] | None = None, batch: PromptBatch | None = None,
          resolve: Any = None) -> Iterator[Session]:
    """Steer `handle` inside the block with one `plan` for every row, or `rows`: a plan (or None) per
    batch row. Plans are anything build_plan accepts (a Plan, a dict, a list, JSON text, a SteeringPlan).
    `batch` declares the prompts the block runs (where they end, their turns). The model is bit-identical
    once the block exits, also when it raises. Works under autograd as under torch.no_grad / inference_mode.
    """
    resolve = resolve or caching_resolver(load_vector_file)
    if rows is not None and plan is not None:
        raise PlanError("give one plan for every row or a plan per row, not both")
    if rows is not None and batch is not None and len(rows) != batch.size:
        raise PlanError(f"{len(rows)} row plans for a batch of {batch.size} prompts")
    checked: SteeringPlan | list[SteeringPlan | None]
    checked = build_row_plans(handle, rows, resolve) if rows is not None else build_plan(plan, handle, resolve)
    ref = next(handle.model.parameters())
    compiled = compile_plans(checked, ref)
    session = Session(handle, compiled)
    if batch is not None:
        session.begin_batch(batch)
    handles = [handle.model.register_forward_pre_hook(session._on_forward, with_kwargs=True)]
    try:
        for key in {*compiled.slots, *compiled.conditions}:
            site, layer = key
            module, pre = site_module(handle.layout, site, layer)
            hook = session._make_hook(key, compiled.slots.get(key, []), compiled.conditions.get(key, []), pre)
            if pre:
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield session
    finally:
        for h in handles:
            h.remove()
