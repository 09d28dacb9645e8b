"""Compile checked plans (one shared, or one per batch row) into slots: one batched op per hook position.

Rows' interventions at a (site, layer) are aligned by their order there; rows whose k-th op uses
the same method and parameter shapes share one slot, their tensors stacked per row (zeros for rows
that lack it, which every op leaves exactly unchanged). A slot's gate is static (every token, no
condition) in the common case, so steering costs one or two small ops per hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steerable.capture.sites import SITES
from steerable.steering.cast import CastCondition
from steerable.steering.gates import NONE, Gate, Mask, TokenView, intersect, union
from steerable.steering.plan import SteeringPlan
from steerable.steering.spec import Intervention, Params

Key = tuple[str, int]  # (site, layer)


@dataclass
class RowGate:
    gate: Gate
    conditions: tuple[CastCondition, ...]
    rows: torch.Tensor | None  # [B, 1, 1] 0/1, or None for every row

    @property
    def trivial(self) -> bool:
        return self.gate.is_all and not self.conditions


@dataclass
class Slot:
    method: type[Intervention]
    params: Params
    gates: list[RowGate]
    static: bool = field(init=False)

    def __post_init__(self) -> None:
        self.static = all(g.trivial for g in self.gates)

    def mask(self, view: TokenView, decisions: dict[CastCondition, torch.Tensor]) -> Mask:
        out: Mask = NONE
        for g in self.gates:
            m = g.gate.mask(view)
            for c in g.conditions:
                m = intersect(m, decisions.get(c, NONE))
            if g.rows is not None:
                m = intersect(m, g.rows)
            out = union(out, m)
        return out


@dataclass
class Compiled:
    slots: dict[Key, list[Slot]]
    conditions: dict[Key, list[CastCondition]]
    needs_prepass: bool
    needs_turns: bool
    needs_boundary: bool  # some gate depends on where the prompt ends
    n_rows: int | None


def site_order(site: str, layer: int) -> tuple[int, int]:
    return layer, SITES.index(site)


def _to(params: Params, ref: torch.Tensor) -> Params:
    out = {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in params.items()}
    if not torch.is_inference_mode_enabled():
        # artifacts computed under inference_mode hold inference tensors, which autograd cannot save for backward
        out = {k: v.clone() if v.is_inference() else v for k, v in out.items()}
    return out


def _stack(per_row: list[Params | None]) -> Params:
    """Stack rows' params: [k, d] → [B, k, d], [k] → [B, 1, k]; rows without the op get zeros."""
    first = next(p for p in per_row if p is not None)
    out = {}
    for name, t in first.items():
        rows = [p[name] if p is not None else torch.zeros_like(t) for p in per_row]
        stacked = torch.stack(rows)
        out[name] = stacked if t.dim() == 2 else stacked.unsqueeze(1)
    return out


def compile_plans(plans: SteeringPlan | Sequence[SteeringPlan | None], ref: torch.Tensor) -> Compiled:
    """`plans` is one plan for every row, or a plan (or None) per row of the batch."""
    shared = isinstance(plans, SteeringPlan)
    rows: list[SteeringPlan | None] = [plans] if isinstance(plans, SteeringPlan) else list(plans)
    n = len(rows)
    per_key: dict[Key, list[list[tuple[Intervention, int]]]] = {}
    conditions: dict[Key, list[CastCondition]] = {}
    for r, plan in enumerate(rows):
        for iv in plan.interventions if plan else ():
            for layer in iv.layers:
                per_key.setdefault((iv.site, layer), [[] for _ in range(n)])[r].append((iv, layer))
            for c in iv.conditions:
                lst = conditions.setdefault((c.site, c.layer), [])
                if all(c is not x for x in lst):
                    lst.append(c)
    cache: dict[tuple[int, int], Params] = {}

    def prepared(iv: Intervention, layer: int) -> Params:
        key = (id(iv), layer)
        if key not in cache:
            cache[key] = iv.prepare(layer)
        return cache[key]

    slots: dict[Key, list[Slot]] = {}
    for key, ops in per_key.items():
        depth = max(len(o) for o in ops)
        for k in range(depth):
            groups: dict[Any, list[int]] = {}
            for r in range(n):
                if k < len(ops[r]):
                    iv, layer = ops[r][k]
                    shapes = tuple((name, tuple(t.shape)) for name, t in prepared(iv, layer).items())
                    groups.setdefault((type(iv), shapes), []).append(r)
            for (method, _), members in groups.items():
                slots.setdefault(key, []).append(_slot(method, [ops[r][k] if r in members else None for r in range(n)],
                                                       shared, prepared, ref))
    earliest_gated = min((site_order(*key) for key, ops in per_key.items()
                          for row in ops for iv, _ in row if iv.conditions), default=None)
    latest_condition = max((site_order(*key) for key in conditions), default=None)
    return Compiled(
        slots=slots, conditions=conditions,
        needs_prepass=earliest_gated is not None and latest_condition is not None and earliest_gated < latest_condition,
        needs_turns=any(p.needs_turns for p in rows if p),
        needs_boundary=any(not iv.gate.is_all for p in rows if p for iv in p.interventions),
        n_rows=None if shared else n,
    )


def _slot(method: type[Intervention], members: list[tuple[Intervention, int] | None], shared: bool, prepared: Any,
          ref: torch.Tensor) -> Slot:
    present = [m for m in members if m is not None]
    same = all(m[0] is present[0][0] and m[1] == present[0][1] for m in present)
    if shared or (same and len(present) == len(members)):
        params = prepared(*present[0])
    else:
        params = _stack([prepared(*m) if m is not None else None for m in members])
    by_gate: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    gates: dict[tuple[str, tuple[int, ...]], tuple[Gate, tuple[CastCondition, ...]]] = {}
    for r, m in enumerate(members):
        if m is not None:
            key = (m[0].gate.spec, tuple(id(c) for c in m[0].conditions))
            by_gate.setdefault(key, []).append(r)
            gates[key] = (m[0].gate, m[0].conditions)
    row_gates = []
    for key, rs in by_gate.items():
        gate, conds = gates[key]
        rows = None
        if not shared and len(by_gate) > 1:
            rows = torch.zeros(len(members), 1, 1, device=ref.device, dtype=ref.dtype)
            rows[rs] = 1
        row_gates.append(RowGate(gate, conds, rows))
    return Slot(method, _to(params, ref), row_gates)
