"""Streaming per-class statistics: memory is fixed by d and the reservoir size, not the data set."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Reservoir:
    """A uniform sample of at most `cap` rows (algorithm R, vectorised per batch)."""

    cap: int
    d: int
    seed: int = 0
    seen: int = 0
    rows: torch.Tensor = field(init=False)
    gen: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rows = torch.empty(0, self.d)
        self.gen = torch.Generator().manual_seed(self.seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().cpu()
        room = self.cap - self.rows.shape[0]
        if room > 0:
            self.rows = torch.cat([self.rows, x[:room]])
            self.seen += min(room, len(x))
            x = x[room:]
        if len(x) == 0:
            return
        t = self.seen + torch.arange(1, len(x) + 1)
        j = (torch.rand(len(x), generator=self.gen) * t).long()
        hit = j < self.cap
        self.rows[j[hit]] = x[hit]
        self.seen += len(x)


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

    def add(self, x: torch.Tensor) -> None:
        x64 = x.detach().to(torch.float64).cpu()
        self.n += len(x64)
        self.total += x64.sum(0)
        self.unit_total += (x64 / x64.norm(dim=1, keepdim=True).clamp_min(1e-12)).sum(0)  # zero rows add 0
        if self.outer is not None:
            self.outer += x64.T @ x64
        self.sample.add(x)

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

    def add(self, x: torch.Tensor, label: torch.Tensor, heldout: torch.Tensor) -> None:
        """Rows x [n, d] with their class (1/0) and whether they belong to the held-out fold."""
        for cls, train, test in ((1, self.pos, self.heldout_pos), (0, self.neg, self.heldout_neg)):
            is_cls = label == cls
            if bool((is_cls & ~heldout).any()):
                train.add(x[is_cls & ~heldout])
            if bool((is_cls & heldout).any()):
                test.add(x[is_cls & heldout])

    def add_pair_diffs(self, diffs: torch.Tensor) -> None:
        """Per-pair differences (positive − negative) of training pairs, for pairwise PCA."""
        d64 = diffs.detach().to(torch.float64).cpu()
        self.n_pairs += len(d64)
        self.diff_total += d64.sum(0)
        if self.diff_outer is not None:
            self.diff_outer += d64.T @ d64

    def diff_covariance(self) -> torch.Tensor:
        assert self.diff_outer is not None, "second moments were not collected"
        m = self.diff_total / max(self.n_pairs, 1)
        return self.diff_outer / max(self.n_pairs, 1) - torch.outer(m, m)
