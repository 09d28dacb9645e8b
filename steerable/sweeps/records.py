"""One sweep result line: what a configuration did to behaviour, coherence, side effects and capability.

A line is a `SweepRecord`; `SweepRecord.from_json` reads the JSON object of a line and `to_json` gives it
back key for key (the JSONL format of docs/sweeps.md is a contract: `to_json(from_json(line)) == line`).
Raw per-prompt values (hits, perplexities, correctness) are kept in the line so tune and report can
recompute any summary — a different perplexity threshold, a paired capability change — without
rerunning the model.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from steerable.errors import DataError, SteerableError
from steerable.evaluate.capability import Change, paired_change
from steerable.evaluate.coherence import (
    CoherenceBounds,
    coherent_compliance,
    compression_ratio,
    is_coherent,
    language_consistency,
    rep_n,
)
from steerable.evaluate.refusal import Rate, is_refusal, rate
from steerable.sweeps.grid import Config

BEHAVIOURS = ("refusal", "compliance")
SETS = ("prompts", "benign")  # the prompt sets a line can summarise, in the order they are written

Prompt = str | list[dict[str, Any]]  # a prompt row's text, or its chat messages
KnobValue = float | str | None  # a configuration's knob setting: a number, a percentile name, or none


class _Obj:
    """Typed reads of one JSON object of a line; a missing or mistyped field raises DataError naming its path."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise DataError(f"{where or 'line'}: expected an object, got {_kind(data)}")
        self.data: dict[str, Any] = data
        self.where = where

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        if key not in self.data:
            raise DataError(f"{self.path(key)}: missing")
        return self.data[key]

    def _bad(self, key: str, want: str) -> DataError:
        return DataError(f"{self.path(key)}: expected {want}, got {_kind(self.data[key])}")

    def obj(self, key: str) -> _Obj:
        return _Obj(self.raw(key), self.path(key))

    def text(self, key: str) -> str:
        v = self.raw(key)
        if not isinstance(v, str):
            raise self._bad(key, "a string")
        return v

    def integer(self, key: str) -> int:
        v = self.raw(key)
        if not _is_int(v):
            raise self._bad(key, "an integer")
        return v

    def number(self, key: str) -> float:
        v = self.raw(key)
        if not _is_num(v):
            raise self._bad(key, "a number")
        return v

    def opt_number(self, key: str) -> float | None:
        return None if self.raw(key) is None else self.number(key)

    def array(self, key: str) -> list[Any]:
        v = self.raw(key)
        if not isinstance(v, list):
            raise self._bad(key, "a list")
        return list(v)

    def integers(self, key: str) -> list[int]:
        v = self.array(key)
        if not all(_is_int(x) for x in v):
            raise self._bad(key, "a list of integers")
        return v

    def numbers(self, key: str, *, nulls: bool = False) -> list[Any]:
        v = self.array(key)
        if not all(_is_num(x) or (nulls and x is None) for x in v):
            raise self._bad(key, "a list of numbers" + (" or nulls" if nulls else ""))
        return v

    def pair(self, key: str) -> tuple[float, float]:
        v = self.numbers(key)
        if len(v) != 2:
            raise self._bad(key, "[lo, hi]")
        return v[0], v[1]


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True)
class RateSummary:
    """A rate as a line holds it: `{"rate", "k", "n", "ci95"}` (bootstrap 95 % interval)."""

    rate: float
    k: int
    n: int
    ci95: tuple[float, float]

    @classmethod
    def of(cls, r: Rate) -> RateSummary:
        return cls(r.value, r.k, r.n, (r.lo, r.hi))

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> RateSummary:
        o = _Obj(data, where)
        return cls(o.number("rate"), o.integer("k"), o.integer("n"), o.pair("ci95"))

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "k": self.k, "n": self.n, "ci95": list(self.ci95)}


@dataclass(frozen=True)
class BehaviourRate(RateSummary):
    """The success rate on the steered prompts, with the behaviour's name (`refusal` or `compliance`)."""

    name: str

    @classmethod
    def of(cls, r: Rate, name: str = "refusal") -> BehaviourRate:
        return cls(r.value, r.k, r.n, (r.lo, r.hi), name)

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> BehaviourRate:
        base = RateSummary.from_json(data, where)
        return cls(base.rate, base.k, base.n, base.ci95, _Obj(data, where).text("name"))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **super().to_json()}


@dataclass(frozen=True)
class CapabilityChange:
    """A paired accuracy change against the unsteered model: `{"change", "n", "ci95"}`."""

    change: float
    n: int
    ci95: tuple[float, float]

    @classmethod
    def of(cls, c: Change) -> CapabilityChange:
        return cls(c.value, c.n, (c.lo, c.hi))

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> CapabilityChange:
        o = _Obj(data, where)
        return cls(o.number("change"), o.integer("n"), o.pair("ci95"))

    def to_json(self) -> dict[str, Any]:
        return {"change": self.change, "n": self.n, "ci95": list(self.ci95)}


@dataclass(frozen=True)
class SetSummary:
    """Refusal and text coherence of one prompt set's completions under one configuration.

    The coherent-compliance fields (`coherent_compliance`, `coherent`, `coherence_bounds`) are absent from
    lines written before they existed; they are None then, and stay absent when the line is written back.
    """

    refusal: RateSummary
    refused: list[int]  # per prompt, 0/1
    perplexity: float  # mean over completions (NaN when none is finite)
    perplexity_median: float
    perplexities: list[float | None]  # per completion, under the unsteered model (None: not finite)
    language_consistency: float
    compression_ratio: float
    rep4: float
    coherent_compliance: RateSummary | None = None  # share of completions neither refused nor incoherent
    coherent: list[int] | None = None  # per prompt, 0/1: passes every check of `coherence_bounds`
    coherence_bounds: CoherenceBounds | None = None  # the bounds `coherent` was judged by

    @property
    def coherent_hits(self) -> list[int] | None:
        """Per prompt, 0/1: a coherent compliance (not refused and coherent); None for an old line."""
        if self.coherent is None:
            return None
        return [int(c and not r) for c, r in zip(self.coherent, self.refused, strict=True)]

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> SetSummary:
        o = _Obj(data, where)
        cc = RateSummary.from_json(o.raw(_CC), o.path(_CC)) if o.has(_CC) else None
        coherent = o.integers("coherent") if o.has("coherent") else None
        bounds = None
        if o.has("coherence_bounds"):
            try:
                bounds = CoherenceBounds.from_json(o.raw("coherence_bounds"))
            except DataError as e:
                raise DataError(f"{o.path('coherence_bounds')}: {e}") from e
        return cls(RateSummary.from_json(o.raw("refusal"), o.path("refusal")), o.integers("refused"),
                   o.number("perplexity"), o.number("perplexity_median"), o.numbers("perplexities", nulls=True),
                   o.number("language_consistency"), o.number("compression_ratio"), o.number("rep4"),
                   cc, coherent, bounds)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "refusal": self.refusal.to_json(), "refused": list(self.refused), "perplexity": self.perplexity,
            "perplexity_median": self.perplexity_median, "perplexities": list(self.perplexities),
            "language_consistency": self.language_consistency, "compression_ratio": self.compression_ratio,
            "rep4": self.rep4}
        if self.coherent_compliance is not None:
            out[_CC] = self.coherent_compliance.to_json()
        if self.coherent is not None:
            out["coherent"] = list(self.coherent)
        if self.coherence_bounds is not None:
            out["coherence_bounds"] = self.coherence_bounds.to_json()
        return out


_CC = "coherent_compliance"


@dataclass(frozen=True)
class Capability:
    """MMLU under one configuration: accuracy, per-item correctness and (once the baseline is known) the
    paired change against it."""

    accuracy: RateSummary
    correct: list[int]  # per item, 0/1
    subjects: int
    change: CapabilityChange | None = None  # absent from the line when no baseline was known

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> Capability:
        o = _Obj(data, where)
        change = o.raw("change") if o.has("change") else None
        return cls(RateSummary.from_json(o.raw("accuracy"), o.path("accuracy")), o.integers("correct"),
                   o.integer("subjects"),
                   None if change is None else CapabilityChange.from_json(change, o.path("change")))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"accuracy": self.accuracy.to_json(), "correct": list(self.correct),
                               "subjects": self.subjects}
        if self.change is not None:
            out["change"] = self.change.to_json()
        return out


@dataclass(frozen=True)
class SweepExample:
    """One kept completion: which set (`prompts` or `benign`), the prompt as given, the completion."""

    set: str
    prompt: Prompt
    completion: str

    @property
    def prompt_text(self) -> str:
        """The prompt as text: a chat prompt's last message."""
        if isinstance(self.prompt, str):
            return self.prompt
        return str(self.prompt[-1].get("content", "")) if self.prompt else ""

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> SweepExample:
        o = _Obj(data, where)
        prompt = o.raw("prompt")
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)):
            raise DataError(f"{o.path('prompt')}: expected a string or a list of messages, got {_kind(prompt)}")
        return cls(o.text("set"), copy.deepcopy(prompt), o.text("completion"))

    def to_json(self) -> dict[str, Any]:
        return {"set": self.set, "prompt": copy.deepcopy(self.prompt), "completion": self.completion}


@dataclass(frozen=True)
class LayerProfile:
    """The vector file's per-layer quality: AUROC and Cohen's d per layer."""

    layers: list[int]
    auroc: list[float]
    cohens_d: list[float]

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> LayerProfile:
        o = _Obj(data, where)
        return cls(o.integers("layers"), o.numbers("auroc"), o.numbers("cohens_d"))

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "auroc": list(self.auroc), "cohens_d": list(self.cohens_d)}


_SWEEP_FIELDS = ("model", "vector", "behaviour", "max_new_tokens")


@dataclass(frozen=True)
class SweepInfo:
    """The setting a line was measured under; `names` holds how the prompt sets were named (the CLI writes
    `prompts`, `benign` and `limit`), key for key as given."""

    model: str
    vector: str
    behaviour: str
    max_new_tokens: int
    names: dict[str, Any] = field(default_factory=dict)

    def name(self, key: str, default: Any = None) -> Any:
        return self.names.get(key, default)

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> SweepInfo:
        o = _Obj(data, where)
        names = {k: copy.deepcopy(v) for k, v in o.data.items() if k not in _SWEEP_FIELDS}
        return cls(o.text("model"), o.text("vector"), o.text("behaviour"), o.integer("max_new_tokens"), names)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "vector": self.vector, "behaviour": self.behaviour,
                "max_new_tokens": self.max_new_tokens, **copy.deepcopy(self.names)}


_CONFIG_FIELDS = frozenset(f.name for f in fields(Config))


def _config(data: Any, where: str) -> Config:
    o = _Obj(data, where)
    unknown = sorted(set(o.data) - _CONFIG_FIELDS)
    if unknown:
        raise DataError(f"{where}: unknown configuration keys {unknown}")
    o.text("method")
    return Config(**o.data)


def _knob_value(o: _Obj, key: str) -> KnobValue:
    v = o.raw(key)
    if v is not None and not isinstance(v, str) and not _is_num(v):
        raise DataError(f"{o.path(key)}: expected a number, a string or null, got {_kind(v)}")
    return v


# the keys of a line, in the order they are written
_RECORD_KEYS = ("key", "sweep", "config", "label", "knob", "value", "plan", "layers", "behaviour", "hits", "prompts",
                "kl", "kl_on", "categories", "examples", "layer_profile", "seconds_per_config", "benign", "capability")


@dataclass(frozen=True)
class SweepRecord:
    """One finished configuration of a sweep (docs/sweeps.md, "A result line")."""

    key: str  # hash of the configuration and the whole setting: what resuming matches on
    sweep: SweepInfo
    config: Config
    label: str
    knob: str
    value: KnobValue
    plan: dict[str, Any] | None  # None for the unsteered baseline
    layers: list[int]  # the layers the plan resolved to
    behaviour: BehaviourRate
    hits: list[int]  # per prompt, 0/1
    prompts: SetSummary
    kl: float | None
    kl_on: str  # "benign", or "prompts" when the sweep had no benign prompts
    categories: dict[str, RateSummary]
    examples: list[SweepExample]
    layer_profile: LayerProfile
    seconds_per_config: float
    benign: SetSummary | None = None  # absent from the line without benign prompts
    capability: Capability | None = None  # absent from the line without MMLU
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read

    @property
    def is_baseline(self) -> bool:
        return self.config.is_baseline

    def summary(self, name: str) -> SetSummary | None:
        """The summary of prompt set `name` ("prompts" or "benign"), None when the line has none."""
        if name == "prompts":
            return self.prompts
        if name == "benign":
            return self.benign
        raise SteerableError(f"unknown prompt set {name!r}: use one of {', '.join(SETS)}")

    @property
    def coherence_bounds(self) -> CoherenceBounds | None:
        """The coherence bounds the line was judged by (None for a line written before they existed)."""
        return next((s.coherence_bounds for s in self.summaries() if s.coherence_bounds is not None), None)

    def summaries(self, sets: Sequence[str] = SETS) -> Iterator[SetSummary]:
        """The summaries of `sets` this line has, in order."""
        for name in sets:
            s = self.summary(name)
            if s is not None:
                yield s

    @classmethod
    def from_json(cls, data: Any) -> SweepRecord:
        """Read the JSON object of one line; DataError names the first field that is missing or mistyped."""
        o = _Obj(data, "")
        plan = o.raw("plan")
        if plan is not None and not isinstance(plan, dict):
            raise DataError(f"plan: expected an object or null, got {_kind(plan)}")
        cats = o.obj("categories")
        return cls(
            key=o.text("key"),
            sweep=SweepInfo.from_json(o.raw("sweep"), "sweep"),
            config=_config(o.raw("config"), "config"),
            label=o.text("label"),
            knob=o.text("knob"),
            value=_knob_value(o, "value"),
            plan=copy.deepcopy(plan),
            layers=o.integers("layers"),
            behaviour=BehaviourRate.from_json(o.raw("behaviour"), "behaviour"),
            hits=o.integers("hits"),
            prompts=SetSummary.from_json(o.raw("prompts"), "prompts"),
            kl=o.opt_number("kl"),
            kl_on=o.text("kl_on"),
            categories={c: RateSummary.from_json(v, cats.path(c)) for c, v in cats.data.items()},
            examples=[SweepExample.from_json(e, f"examples[{i}]") for i, e in enumerate(o.array("examples"))],
            layer_profile=LayerProfile.from_json(o.raw("layer_profile"), "layer_profile"),
            seconds_per_config=o.number("seconds_per_config"),
            benign=SetSummary.from_json(o.raw("benign"), "benign") if o.has("benign") else None,
            capability=Capability.from_json(o.raw("capability"), "capability") if o.has("capability") else None,
            extra={k: copy.deepcopy(v) for k, v in o.data.items() if k not in _RECORD_KEYS},
        )

    def to_json(self) -> dict[str, Any]:
        """The line's JSON object, keys in the order the sweep writes them; optional parts absent when None."""
        out: dict[str, Any] = {
            "key": self.key,
            "sweep": self.sweep.to_json(),
            "config": self.config.to_json(),
            "label": self.label,
            "knob": self.knob,
            "value": self.value,
            "plan": copy.deepcopy(self.plan),
            "layers": list(self.layers),
            "behaviour": self.behaviour.to_json(),
            "hits": list(self.hits),
            "prompts": self.prompts.to_json(),
            "kl": self.kl,
            "kl_on": self.kl_on,
            "categories": {c: r.to_json() for c, r in self.categories.items()},
            "examples": [e.to_json() for e in self.examples],
            "layer_profile": self.layer_profile.to_json(),
            "seconds_per_config": self.seconds_per_config,
        }
        if self.benign is not None:
            out["benign"] = self.benign.to_json()
        if self.capability is not None:
            out["capability"] = self.capability.to_json()
        out.update(copy.deepcopy(self.extra))
        return out


def behaviour_hits(behaviour: str, completions: Sequence[str]) -> list[bool]:
    """Per completion, whether it shows the behaviour the sweep promotes."""
    if behaviour == "refusal":
        return [is_refusal(c) for c in completions]
    if behaviour == "compliance":
        return [not is_refusal(c) for c in completions]
    raise SteerableError(f"unknown behaviour {behaviour!r}: use one of {', '.join(BEHAVIOURS)}")


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


def set_summary(completions: Sequence[str], perplexities: Sequence[float],
                bounds: CoherenceBounds | None = None) -> SetSummary:
    """Refusal rate, text coherence and coherent compliance (not refused and coherent under `bounds`,
    by default `CoherenceBounds()`) of one prompt set's completions under one configuration."""
    bounds = bounds or CoherenceBounds()
    refused = [is_refusal(c) for c in completions]
    coherent = [is_coherent(c, p, bounds) for c, p in zip(completions, perplexities, strict=True)]
    finite = [p for p in perplexities if not math.isnan(p)]
    return SetSummary(
        refusal=RateSummary.of(rate(refused)),
        refused=[int(r) for r in refused],
        perplexity=_mean(perplexities),
        perplexity_median=statistics.median(finite) if finite else math.nan,
        perplexities=[round(p, 4) if not math.isnan(p) else None for p in perplexities],
        language_consistency=_mean([language_consistency(c) for c in completions]),
        compression_ratio=_mean([compression_ratio(c) for c in completions]),
        rep4=_mean([rep_n(c, 4) for c in completions]),
        coherent_compliance=RateSummary.of(rate(coherent_compliance(completions, perplexities, bounds))),
        coherent=[int(c) for c in coherent],
        coherence_bounds=bounds,
    )


def category_rates(categories: Sequence[str | None], hits: Sequence[bool]) -> dict[str, RateSummary]:
    """Behaviour rate per prompt category (prompts without a category are left out), categories sorted."""
    by: dict[str, list[bool]] = {}
    for c, h in zip(categories, hits, strict=True):
        if c is not None:
            by.setdefault(str(c), []).append(h)
    return {c: RateSummary.of(rate(hs)) for c, hs in sorted(by.items())}


def ppl_violations(record: SweepRecord, threshold: float, sets: Sequence[str] = SETS) -> int:
    """Completions whose perplexity under the unsteered model exceeds `threshold`."""
    return sum(1 for s in record.summaries(sets) for p in s.perplexities if p is not None and p > threshold)


def capability_change(record: SweepRecord, baseline: SweepRecord) -> CapabilityChange | None:
    """The paired MMLU change of `record` against `baseline` (None unless both measured capability)."""
    mine, base = record.capability, baseline.capability
    if mine is None or base is None:
        return None
    return CapabilityChange.of(paired_change([bool(x) for x in mine.correct], [bool(x) for x in base.correct]))


def read_records(path: str | Path, repair: bool = True) -> list[SweepRecord]:
    """Finished lines of a sweep file. A torn last line (a killed writer) is skipped, and with `repair` cut
    from the file so the next append starts on a fresh line. A line that is not a sweep result raises
    DataError naming the file, the line and the field."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    if repair and good_end < len(raw):  # cut the half-written tail so appends start on a fresh line
        with open(path, "r+b") as f:
            f.truncate(good_end)
    out = []
    for n, line in enumerate(raw[:good_end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not a sweep result line ({e.msg})") from e
        if not isinstance(rec, dict) or "key" not in rec:
            raise DataError(f"{path}:{n}: not a sweep result line (no \"key\")")
        try:
            out.append(SweepRecord.from_json(rec))
        except DataError as e:
            raise DataError(f"{path}:{n}: not a sweep result line ({e})") from e
    return out


def record_line(record: SweepRecord) -> str:
    """The line `append_record` writes for `record`, newline included."""
    return json.dumps(record.to_json(), ensure_ascii=False, allow_nan=True) + "\n"


def append_record(path: str | Path, record: SweepRecord) -> None:
    """Append one line and make it durable before the next configuration starts."""
    line = record_line(record)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def baseline_of(records: Sequence[SweepRecord]) -> SweepRecord:
    """The unsteered line (method "none") of a sweep's lines."""
    for r in records:
        if r.is_baseline:
            return r
    raise DataError("the results hold no unsteered baseline line (method \"none\")")
