"""Streaming per-class statistics: memory is fixed by d and the reservoir size, not the data set.

Every statistic merges exactly (`merge`): counts and sums add, and a reservoir is a bottom-k sample — each
row is kept or dropped by a hash of its key (its example index and token, say), never by arrival order —
so statistics of shards merged equal one pass over the whole stream, whatever the sharding (the sums up to
float64 rounding, the reservoirs row for row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from steerable.errors import SteerableError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _priority(keys: torch.Tensor, seed: int) -> torch.Tensor:
    """A pseudo-random rank per key (splitmix64 of key and seed), as int64 ordered like the uint64 hash."""
    with np.errstate(over="ignore"):
        z = keys.numpy().astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z ^ np.uint64(1 << 63)).view(np.int64))  # flip the sign bit: int64 order = uint64 order


def _check_same(kind: str, a: object, b: object, fields_: tuple[str, ...]) -> None:
    for f in fields_:
        if getattr(a, f) != getattr(b, f):
            raise SteerableError(f"cannot merge {kind}s with different {f}: {getattr(a, f)!r} vs {getattr(b, f)!r}")


@dataclass
class Reservoir:
    """A uniform sample of at most `cap` rows: the `cap` rows whose keys hash lowest (bottom-k sampling).

    Rows are kept in key order. Keys must be unique over the stream; `add` without keys numbers rows in
    arrival order (then a stream of at most `cap` rows is kept whole, in order). Which rows are kept depends
    only on the keys and the seed, so `merge` of reservoirs of disjoint shards equals one reservoir of all.
    """

    cap: int
    d: int
    seed: int = 0
    seen: int = 0
    rows: torch.Tensor = field(init=False)
    keys: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.rows = torch.empty(0, self.d)
        self.keys = torch.empty(0, dtype=torch.long)

    def add(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        x = x.detach().float().cpu()
        if keys is None:
            keys = self.seen + torch.arange(len(x))
        keys = keys.detach().to(torch.long).cpu()
        if len(keys) != len(x):
            raise SteerableError(f"{len(keys)} keys for {len(x)} rows")
        self.seen += len(x)
        self._keep(torch.cat([self.rows, x]), torch.cat([self.keys, keys]))

    def merge(self, other: Reservoir) -> None:
        """Add the sample of a disjoint shard of the stream (same cap, d and seed)."""
        _check_same("reservoir", self, other, ("cap", "d", "seed"))
        self.seen += other.seen
        self._keep(torch.cat([self.rows, other.rows]), torch.cat([self.keys, other.keys]))

    def _keep(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        if len(keys) > self.cap:
            prio = _priority(keys, self.seed)
            # ties (equal 64-bit hashes) are broken by key, so the choice never depends on order
            by_key = torch.argsort(keys, stable=True)
            chosen = by_key[torch.argsort(prio[by_key], stable=True)[: self.cap]]
            rows, keys = rows[chosen], keys[chosen]
        order = torch.argsort(keys, stable=True)
        self.rows, self.keys = rows[order], keys[order]


@dataclass
class ClassStats:
    d: int
    second_moments: bool
    reservoir_cap: int
    seed: int = 0
    n: int = 0
    total: torch.Tensor = field(init=False)
    # Sum of h/‖h‖: Selective Steering's per-class mean projection is linear in it, for any b1 chosen later.
    unit_total: torch.Tensor = field(init=False)
    outer: torch.Tensor | None = field(init=False)
    sample: Reservoir = field(init=False)

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.d, dtype=torch.float64)
        self.unit_total = torch.zeros(self.d, dtype=torch.float64)
        self.outer = torch.zeros(self.d, self.d, dtype=torch.float64) if self.second_moments else None
        self.sample = Reservoir(self.reservoir_cap, self.d, self.seed)

    def add(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        x64 = x.detach().to(torch.float64).cpu()
        self.n += len(x64)
        self.total += x64.sum(0)
        self.unit_total += (x64 / x64.norm(dim=1, keepdim=True).clamp_min(1e-12)).sum(0)  # zero rows add 0
        if self.outer is not None:
            self.outer += x64.T @ x64
        self.sample.add(x, keys)

    def merge(self, other: ClassStats) -> None:
        """Add the statistics of a disjoint shard (same d, moments, reservoir size and seed)."""
        _check_same("class statistic", self, other, ("d", "second_moments", "reservoir_cap", "seed"))
        # out of place: statistics captured under inference mode hold inference tensors
        self.n += other.n
        self.total = self.total + other.total
        self.unit_total = self.unit_total + other.unit_total
        if self.outer is not None and other.outer is not None:
            self.outer = self.outer + other.outer
        self.sample.merge(other.sample)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.n, 1)

    @property
    def mean_unit(self) -> torch.Tensor:
        """Mean of the unit-normalised rows h/‖h‖."""
        return self.unit_total / max(self.n, 1)

    def covariance(self) -> torch.Tensor:
        assert self.outer is not None, "second moments were not collected"
        m = self.mean
        return self.outer / max(self.n, 1) - torch.outer(m, m)


@dataclass
class LayerStats:
    """Everything the estimators and quality statistics need for one (layer, site)."""

    d: int
    second_moments: bool = False
    reservoir_cap: int = 2048
    heldout_cap: int = 1024
    seed: int = 0
    pos: ClassStats = field(init=False)
    neg: ClassStats = field(init=False)
    heldout_pos: Reservoir = field(init=False)
    heldout_neg: Reservoir = field(init=False)
    n_pairs: int = 0
    diff_total: torch.Tensor = field(init=False)
    diff_outer: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        self.pos = ClassStats(self.d, self.second_moments, self.reservoir_cap, self.seed)
        self.neg = ClassStats(self.d, self.second_moments, self.reservoir_cap, self.seed + 1)
        self.heldout_pos = Reservoir(self.heldout_cap, self.d, self.seed + 2)
        self.heldout_neg = Reservoir(self.heldout_cap, self.d, self.seed + 3)
        self.diff_total = torch.zeros(self.d, dtype=torch.float64)
        self.diff_outer = torch.zeros(self.d, self.d, dtype=torch.float64) if self.second_moments else None

    def add(self, x: torch.Tensor, label: torch.Tensor, heldout: torch.Tensor,
            keys: torch.Tensor | None = None) -> None:
        """Rows x [n, d] with their class (1/0), whether they belong to the held-out fold and (for merging
        shards) each row's unique key in the whole stream; without keys, rows are numbered as they arrive."""
        for cls, train, test in ((1, self.pos, self.heldout_pos), (0, self.neg, self.heldout_neg)):
            is_cls = label == cls
            for keep, add in ((is_cls & ~heldout, train.add), (is_cls & heldout, test.add)):
                if bool(keep.any()):
                    add(x[keep], None if keys is None else keys[keep])

    def add_pair_diffs(self, diffs: torch.Tensor) -> None:
        """Per-pair differences (positive − negative) of training pairs, for pairwise PCA."""
        d64 = diffs.detach().to(torch.float64).cpu()
        self.n_pairs += len(d64)
        self.diff_total += d64.sum(0)
        if self.diff_outer is not None:
            self.diff_outer += d64.T @ d64

    def merge(self, other: LayerStats) -> None:
        """Add the statistics of a disjoint shard of the examples: the result equals one pass over both
        (counts exactly, sums up to float64 rounding, reservoirs row for row when rows carry keys)."""
        _check_same("layer statistic", self, other, ("d", "second_moments", "reservoir_cap", "heldout_cap", "seed"))
        self.pos.merge(other.pos)
        self.neg.merge(other.neg)
        self.heldout_pos.merge(other.heldout_pos)
        self.heldout_neg.merge(other.heldout_neg)
        self.n_pairs += other.n_pairs
        self.diff_total = self.diff_total + other.diff_total
        if self.diff_outer is not None and other.diff_outer is not None:
            self.diff_outer = self.diff_outer + other.diff_outer

    def diff_covariance(self) -> torch.Tensor:
        assert self.diff_outer is not None, "second moments were not collected"
        m = self.diff_total / max(self.n_pairs, 1)
        return self.diff_outer / max(self.n_pairs, 1) - torch.outer(m, m)
