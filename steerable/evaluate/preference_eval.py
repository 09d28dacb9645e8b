"""Held-out choice accuracy of per-user steering (methods.md §7): teacher-forced, no generation.

A pair (prompt, chosen a, rejected b) counts as a hit under a condition when the model, steered by that
condition's plan for the pair's user, gives `a` a higher mean per-token log-likelihood than `b` after the
rendered prompt (`choice_logliks`). Both continuations of a pair run under the same plan; every pair may
carry its own plan (one user's vector per row), and rows of one batch never see each other's steering.

Intervals are a cluster bootstrap over users (`accuracy`): a user's pairs share that user's vector, so
resampling pairs alone would treat correlated hits as independent and make the interval too narrow.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from steerable.errors import SteerableError
from steerable.evaluate.logits import _steered
from steerable.models.batch import PromptBatch, pad_token_id, position_ids
from steerable.models.load import Messages, ModelHandle
from steerable.steering.plan import build_plan, build_row_plans

RESAMPLES = 2000


def choice_logliks(handle: ModelHandle, prompts: Sequence[str | Messages], chosen: Sequence[str],
                   rejected: Sequence[str], plan: Any = None, *, plans: Sequence[Any] | None = None,
                   batch_size: int = 16, system: str | None = None) -> tuple[list[float], list[float]]:
    """Per pair, the mean per-token log-likelihood of `chosen` and of `rejected` after its prompt (teacher
    forced), under `plan` (all pairs) or `plans[i]` (pair i's own plan, None = unsteered).

    The prompt is run once per pair: a copy of its KV cache scores the chosen tail, the cache itself the
    rejected tail (the tails are a few tokens, the prompts ~100: half the work of scoring
    prompt + tail twice). The steering session is told the prompt ends at the batch width, so token gates
    ("prompt", "prompt+first:K") see the tails as generated tokens, as in `score_batches`."""
    n = len(prompts)
    if not (len(chosen) == len(rejected) == n):
        raise SteerableError(f"{n} prompts, {len(chosen)} chosen and {len(rejected)} rejected texts")
    if plans is not None and plan is not None:
        raise SteerableError("give `plan` (one for all pairs) or `plans` (one per pair), not both")
    if plans is not None and len(plans) != n:
        raise SteerableError(f"{len(plans)} plans for {n} pairs")
    checked = build_plan(plan, handle) if plan is not None else None
    row_plans = build_row_plans(handle, plans) if plans is not None else None
    tok = handle.tokenizer
    pad = pad_token_id(handle)
    texts = [handle.render(p, system) for p in prompts]
    tails = [[tok.encode(t, add_special_tokens=False) for t in side] for side in (chosen, rejected)]
    empty = [i for i in range(n) if not tails[0][i] or not tails[1][i]]
    if empty:
        raise SteerableError(f"pairs {empty[:5]} have a response that encodes to no tokens: a mean "
                             "log-likelihood needs one")
    out = [[math.nan] * n, [math.nan] * n]
    order = sorted(range(n), key=lambda i: len(texts[i]))
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        batch = PromptBatch.encode(handle, [prompts[i] for i in rows], system, rendered=[texts[i] for i in rows])
        w = batch.width
        bp = None if row_plans is None else [row_plans[i] for i in rows]
        with torch.inference_mode(), _steered(handle, checked, bp, batch):
            pre = handle.model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=position_ids(batch.mask),
                               use_cache=True, logits_to_keep=1)
            cache = pre.past_key_values
            first = pre.logits[:, -1].float().log_softmax(-1)  # predicts each tail's first token
            for side in (0, 1):
                past = copy.deepcopy(cache) if side == 0 else cache  # the second tail reads the untouched prompt
                ids, mask = batch.with_tails([tails[side][i] for i in rows], pad)
                tail, real = ids[:, w:], mask[:, w:].bool()
                logits = handle.model(input_ids=tail, attention_mask=mask, position_ids=position_ids(mask)[:, w:],
                                      past_key_values=past, use_cache=True).logits.float().log_softmax(-1)
                lp = torch.cat([first[:, None], logits[:, :-1]], 1).gather(-1, tail.unsqueeze(-1)).squeeze(-1)
                mean = torch.where(real, lp, 0.0).sum(1) / real.sum(1)
                for r, i in enumerate(rows):
                    out[side][i] = float(mean[r])
    return out[0], out[1]


def hits_from(chosen: Sequence[float], rejected: Sequence[float]) -> list[bool]:
    """1 where the chosen response scores strictly higher (a tie counts as a miss, methods.md §7)."""
    return [c > r for c, r in zip(chosen, rejected, strict=True)]


@dataclass(frozen=True)
class Accuracy:
    """A share of hits with its sample size and a bootstrap 95 % interval (over users when they are known)."""

    value: float
    lo: float
    hi: float
    n: int
    users: int

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "ci95": [self.lo, self.hi], "n": self.n, "users": self.users}

    def __str__(self) -> str:
        return f"{self.value:5.1%} [{self.lo:.1%}, {self.hi:.1%}] (n={self.n})"


def accuracy(hits: Sequence[float], groups: Sequence[Hashable] | None = None, *, resamples: int = RESAMPLES,
             seed: int = 0) -> Accuracy:
    """Mean of `hits` (0/1, or a probability per pair) with a 95 % percentile-bootstrap interval: users
    (`groups`) are resampled with replacement, each bringing all its pairs; without groups, pairs are."""
    x = np.asarray(hits, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Accuracy(math.nan, math.nan, math.nan, 0, 0)
    keys = list(range(n)) if groups is None else list(groups)
    if len(keys) != n:
        raise SteerableError(f"{len(keys)} groups for {n} hits")
    index: dict[Hashable, int] = {}
    gid = np.asarray([index.setdefault(k, len(index)) for k in keys])
    g = len(index)
    sums = np.bincount(gid, weights=x, minlength=g)
    counts = np.bincount(gid, minlength=g).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, g, (resamples, g))
    stats = np.sort(sums[draws].sum(1) / counts[draws].sum(1))
    lo, hi = float(stats[int(0.025 * resamples)]), float(stats[int(0.975 * resamples) - 1])
    return Accuracy(float(x.mean()), lo, hi, n, g)


def paired_difference(a: Sequence[float], b: Sequence[float], groups: Sequence[Hashable] | None = None, *,
                      resamples: int = RESAMPLES, seed: int = 0) -> Accuracy:
    """mean(a) − mean(b) over the same pairs, the interval from resampling users (or pairs), pairs kept."""
    if len(a) != len(b):
        raise SteerableError(f"{len(a)} results against {len(b)}")
    return accuracy([float(x) - float(y) for x, y in zip(a, b, strict=True)], groups, resamples=resamples,
                    seed=seed)


def breakdown(hits: Sequence[float], keys: Sequence[Hashable], groups: Sequence[Hashable] | None = None, *,
              seed: int = 0) -> dict[str, Accuracy]:
    """`accuracy` within each value of `keys` (in first-seen order; None becomes "none")."""
    out: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault("none" if k is None else str(k), []).append(i)
    return {k: accuracy([hits[i] for i in rows], None if groups is None else [groups[i] for i in rows], seed=seed)
            for k, rows in out.items()}


def coin(*parts: str) -> bool:
    """A fair coin seeded by the pair's text: the same pair always gets the same flip, on every machine."""
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return bool(h[0] & 1)


def chance_hits(users: Sequence[str], prompts: Sequence[str], chosen: Sequence[str],
                rejected: Sequence[str]) -> list[bool]:
    """The chance condition, computed on the pairs: a predictor that knows neither model nor user picks one of
    the pair's two responses by a fair coin seeded by the pair (user, prompt and the two texts in sorted order,
    so it cannot see which one is chosen). Its expected accuracy is ½; its realised accuracy on a finite set
    of pairs is not, which is what seed 002's 48.3 % is."""
    out = []
    for u, p, a, b in zip(users, prompts, chosen, rejected, strict=True):
        first, second = sorted((a, b))
        pick = first if coin(u, p, first, second) else second
        out.append(pick == a)
    return out


def bt_probability(phi_a: torch.Tensor, phi_b: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """P_u(a ≻ b) = σ(‖φ(b) − θ_u‖² − ‖φ(a) − θ_u‖²) (methods.md §7), per pair, from features [P, L, K] and
    each pair's user's ideal point [P, L, K]; with several layers the per-layer margins are averaged (each
    layer's fit is its own model of the same choices)."""
    margin = ((phi_b - theta) ** 2).sum(-1) - ((phi_a - theta) ** 2).sum(-1)  # [P, L]
    return torch.sigmoid(margin.mean(-1))


def peaks(xs: Sequence[float], ys: Sequence[float], noise: float) -> dict[str, Any]:
    """Local maxima of a dose-response curve y(x) (x sorted) and whether it is bimodal: two peaks with a dip
    between them that sits more than `noise` below the lower peak (noise: one standard error of the
    accuracies, so a wiggle inside the interval does not count as a second mode)."""
    pts = sorted(zip(xs, ys, strict=True))
    x = [p[0] for p in pts]
    y = [p[1] for p in pts]

    def falls_after(i: int) -> bool:  # the next different value to the right is lower (or there is none)
        j = i + 1
        while j < len(y) and y[j] == y[i]:
            j += 1
        return j == len(y) or y[j] < y[i]

    # a peak: higher than its left neighbour (or the first point) and the curve falls after it (a plateau counts
    # once, at its left end; a plateau followed by a rise is no peak)
    idx = [i for i in range(len(y)) if (i == 0 or y[i] > y[i - 1]) and falls_after(i)]
    bimodal = False
    for j in range(len(idx)):
        for k in range(j + 1, len(idx)):
            a, b = idx[j], idx[k]
            dip = min(y[a : b + 1])
            if min(y[a], y[b]) - dip > noise:
                bimodal = True
    return {"peaks": [x[i] for i in idx], "peak_values": [y[i] for i in idx], "bimodal": bimodal,
            "noise": noise}
