"""Run a sweep: many configurations share each batched generation as per-row plans.

Configurations are taken in groups of about `group_rows` rows (prompts × configurations); each group is
one `generate` call, one perplexity pass, one KL pass and (optionally) one MMLU pass, and every
configuration of the group is appended to the results file as one JSON line when the group ends. A
restarted sweep with the same settings reads the file and runs only the configurations it lacks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from steerable.directions.artifact import load_directions
from steerable.evaluate.capability import DEFAULT_FORMAT, MCItem, mc_correct
from steerable.evaluate.capability_tasks import DEFAULT_TASK, task_items
from steerable.evaluate.logits import kl_rows, perplexity, score_batches
from steerable.evaluate.refusal import rate
from steerable.generation import generate
from steerable.models.load import Messages, ModelHandle
from steerable.steering.plan import SteeringPlan, build_row_plans
from steerable.sweeps.grid import Config, config_key
from steerable.sweeps.records import (
    BehaviourRate,
    Capability,
    LayerProfile,
    RateSummary,
    SweepExample,
    SweepInfo,
    SweepRecord,
    append_record,
    behaviour_hits,
    capability_change,
    category_rates,
    read_records,
    set_summary,
)


@dataclass
class SweepSpec:
    """What a sweep measures: the prompts it steers, the benign prompts it must not disturb, and how."""

    vector: str
    configs: list[Config]
    prompts: list[dict[str, Any]]  # rows {"prompt", "category"?}
    benign: list[dict[str, Any]] = field(default_factory=list)
    behaviour: str = "refusal"  # what counts as success on `prompts`
    max_new_tokens: int = 64
    batch_size: int = 64
    score_batch_size: int = 8
    group_rows: int = 256
    mmlu_per_subject: int = 0
    capability_format: str = DEFAULT_FORMAT  # capability.py's formats, e.g. "cue+cal"
    capability_task: str = DEFAULT_TASK  # "mmlu", or "analogies" for a model at chance on MMLU
    examples: int = 4
    plan_extra: dict[str, Any] = field(default_factory=dict)  # gate, direction, site for every config
    names: dict[str, Any] = field(default_factory=dict)  # how prompts / benign were named, for the record
    known_kl: dict[Config, float] = field(default_factory=dict)  # already measured (tune's KL pre-pass)

    def context(self, handle: ModelHandle) -> dict[str, Any]:
        ctx = {"model": handle.name, "config_hash": handle.config_hash, "vector": str(self.vector),
               "prompts": [r["prompt"] for r in self.prompts], "benign": [r["prompt"] for r in self.benign],
               "behaviour": self.behaviour, "max_new_tokens": self.max_new_tokens,
               "mmlu_per_subject": self.mmlu_per_subject, "plan_extra": self.plan_extra}
        if self.names.get("adapter"):  # a `steerable train` adapter on the model (the CLI's --adapter): its weights
            ctx["adapter"] = self.names["adapter"].get("sha256")
        if self.mmlu_per_subject and self.capability_format != "letter":  # lines measured in "letter" keep their keys
            ctx["capability_format"] = self.capability_format
        if self.mmlu_per_subject and self.capability_task != DEFAULT_TASK:
            ctx["capability_task"] = self.capability_task
        return ctx


def layer_profile(vector: str) -> LayerProfile:
    """The vector file's per-layer AUROC and Cohen's d, rounded as a line keeps them."""
    ds = load_directions(vector)
    return LayerProfile(list(ds.layers), [round(float(x), 4) for x in ds.auroc],
                        [round(float(x), 4) for x in ds.cohens_d])


def first_token_logprobs(handle: ModelHandle, prompts: Sequence[str | Messages], batch_size: int) -> torch.Tensor:
    """Unsteered log-probabilities of each prompt's next token, [N, V] in prompt order."""
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for b in score_batches(handle, prompts, [""] * len(prompts), None, batch_size):
        for r, i in enumerate(b.rows):
            out[i] = b.logprobs[r, 0].cpu()
    return torch.stack(out)  # type: ignore[arg-type]


def _generate_group(handle: ModelHandle, spec: SweepSpec, texts: list[str | Messages],
                    plans: list[dict[str, Any] | None], kl_span: range,
                    progress: bool) -> tuple[list[str], list[torch.Tensor]]:
    """Completions of every (plan, text) row in one batched generation, and per plan the first-token
    log-probabilities [len(kl_span), V] of the texts in `kl_span` (taken from decoding: no extra pass)."""
    n = len(texts)
    first: dict[int, torch.Tensor] = {}

    def keep(idx: list[int], logprobs: torch.Tensor) -> None:
        for r, i in enumerate(idx):
            if i % n in kl_span:
                first[i] = logprobs[r].cpu()

    completions = generate(handle, texts * len(plans), plans=[p for p in plans for _ in texts],
                           max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, progress=progress,
                           on_first_step=keep)
    return completions, [torch.stack([first[g * n + j] for j in kl_span]) for g in range(len(plans))]


def _groups(configs: list[Config], rows_each: int, group_rows: int) -> list[list[Config]]:
    size = max(1, group_rows // max(1, rows_each))
    return [configs[i : i + size] for i in range(0, len(configs), size)]


def texts_of(spec: SweepSpec) -> list[str | Messages]:
    """A configuration's rows: the steered prompts, then the benign ones."""
    return [r["prompt"] for r in spec.prompts] + [r["prompt"] for r in spec.benign]


@dataclass(frozen=True)
class Prepared:
    """What every group of one sweep shares: the setting (the salt of every key), the MMLU items and the
    vector's layer profile. Built once per process that runs groups (`prepare`)."""

    context: dict[str, Any]
    items: list[MCItem]
    profile: LayerProfile

    def keys(self, spec: SweepSpec) -> dict[str, Config]:
        """Every configuration of `spec` by its key, in grid order."""
        return {config_key(c, self.context): c for c in spec.configs}


def prepare(handle: ModelHandle, spec: SweepSpec) -> Prepared:
    items = task_items(spec.capability_task, spec.mmlu_per_subject) if spec.mmlu_per_subject else []
    # a profile library (plan_extra "profile") has no per-layer calibration statistics
    profile = LayerProfile([], [], []) if "profile" in spec.plan_extra else layer_profile(spec.vector)
    return Prepared(spec.context(handle), items, profile)


def pending_groups(spec: SweepSpec, keys: dict[str, Config], done: Collection[str]) -> list[list[Config]]:
    """The configurations not in `done`, grouped; the baseline goes first (perplexity thresholds and
    capability changes are read against it), so its group is the first."""
    pending = [c for k, c in keys.items() if k not in done]
    pending.sort(key=lambda c: not c.is_baseline)
    return _groups(pending, len(texts_of(spec)), spec.group_rows)


def check_plans(handle: ModelHandle, spec: SweepSpec, configs: Sequence[Config]) -> list[SteeringPlan | None]:
    """Every configuration's plan through the one validator (raises before anything runs)."""
    return build_row_plans(handle, [c.plan(spec.vector, spec.plan_extra) for c in configs])


def with_baseline(rec: SweepRecord, baseline: SweepRecord | None) -> SweepRecord:
    """The line with its capability change against the baseline (unchanged while none is known)."""
    if baseline is None or rec.capability is None:
        return rec
    return dataclasses.replace(rec, capability=dataclasses.replace(
        rec.capability, change=capability_change(rec, baseline)))


Reference = torch.Tensor | Callable[[], torch.Tensor] | None  # unsteered first-token log-probs, or how to get them


@dataclass
class GroupResult:
    records: list[SweepRecord]  # in the group's order
    reference: torch.Tensor | None  # the unsteered first-token log-probs the KLs were read against


def run_group(handle: ModelHandle, spec: SweepSpec, group: list[Config], baseline: SweepRecord | None, *,
              prepared: Prepared, reference: Reference = None, progress: bool = False) -> GroupResult:
    """One group: one `generate` call with a plan per row, one perplexity pass, one MMLU pass, then the KLs.

    `reference` is the unsteered first-token log-probabilities of the KL prompts; without it they come
    from the baseline in this group, else from a scoring pass. It may be a function: it is called only
    when the KLs are read, after everything else (a distributed sweep hands the baseline group's table
    over that way). Lines get their capability change against `baseline`, or against the baseline in
    this group; lines of a group run without either get it from the caller (`with_baseline`).
    """
    texts = texts_of(spec)
    n = len(texts)
    plans = [c.plan(spec.vector, spec.plan_extra) for c in group]
    checked = build_row_plans(handle, plans)
    items = prepared.items
    kl_texts = [r["prompt"] for r in (spec.benign or spec.prompts)]
    kl_start = len(spec.prompts) if spec.benign else 0  # where the KL prompts sit among a config's rows
    t0 = time.perf_counter()
    completions, tables = _generate_group(handle, spec, texts, plans, range(kl_start, kl_start + len(kl_texts)),
                                          progress)
    ppl = perplexity(handle, texts * len(group), completions, None, batch_size=spec.score_batch_size)
    correct: list[bool] = []
    if items:
        correct = mc_correct(handle, items * len(group), plans=[p for p in plans for _ in items],
                             batch_size=spec.score_batch_size * 2, format=spec.capability_format)
    needs_kl = any(not c.is_baseline and c not in spec.known_kl for c in group)
    if callable(reference):
        reference = reference() if needs_kl else None
    ref = reference if reference is not None else next(
        (t for c, t in zip(group, tables, strict=True) if c.is_baseline), None)
    if ref is None and needs_kl:
        ref = first_token_logprobs(handle, kl_texts, spec.score_batch_size)
    kls = [0.0 if c.is_baseline else spec.known_kl[c] if c in spec.known_kl or ref is None
           else float(kl_rows(ref, t).mean()) for c, t in zip(group, tables, strict=True)]
    del tables
    elapsed = (time.perf_counter() - t0) / len(group)
    records = []
    for g, config in enumerate(group):
        rec = _record(spec, handle, config, plans[g], checked[g], config_key(config, prepared.context),
                      completions[g * n : (g + 1) * n], ppl[g * n : (g + 1) * n], kls[g],
                      correct[g * len(items) : (g + 1) * len(items)], items, prepared.profile, elapsed)
        if baseline is None and config.is_baseline:
            baseline = rec
        records.append(with_baseline(rec, baseline))
    return GroupResult(records, ref)


def run_sweep(handle: ModelHandle, spec: SweepSpec, out: str | Path, *, progress: bool = True) -> list[SweepRecord]:
    """Run every configuration of `spec` not yet in `out`; return all finished lines for this setting."""
    prepared = prepare(handle, spec)
    keys = prepared.keys(spec)
    done = {r.key: r for r in read_records(out) if r.key in keys}
    groups = pending_groups(spec, keys, done)
    check_plans(handle, spec, [c for g in groups for c in g])  # every plan is checked before anything runs
    bar = tqdm(total=len(keys), initial=len(done), desc="sweep", unit="config", disable=not progress)
    baseline = next((r for r in done.values() if r.is_baseline), None)
    reference: torch.Tensor | None = None  # unsteered first-token log-probs of the KL prompts
    for group in groups:
        result = run_group(handle, spec, group, baseline, prepared=prepared, reference=reference, progress=progress)
        reference = result.reference
        for rec in result.records:
            if baseline is None and rec.is_baseline:
                baseline = rec
            append_record(out, rec)
            done[rec.key] = rec
            bar.update(1)
    bar.close()
    return [done[k] for k in keys if k in done]


def _record(spec: SweepSpec, handle: ModelHandle, config: Config, plan: dict[str, Any] | None,
            checked: SteeringPlan | None, key: str, completions: list[str], ppl: list[float], kl: float,
            correct: list[bool], items: Sequence[MCItem], profile: LayerProfile, elapsed: float) -> SweepRecord:
    n_p = len(spec.prompts)
    hits = behaviour_hits(spec.behaviour, completions[:n_p])
    layers = sorted({layer for iv in checked.interventions for layer in iv.layers}) if checked else []
    examples = [SweepExample("prompts", spec.prompts[i]["prompt"], completions[i])
                for i in range(min(spec.examples, n_p))]
    if spec.benign:
        examples += [SweepExample("benign", spec.benign[i]["prompt"], completions[n_p + i])
                     for i in range(min(spec.examples, len(spec.benign)))]
    return SweepRecord(
        key=key,
        sweep=SweepInfo(handle.name, str(spec.vector), spec.behaviour, spec.max_new_tokens, dict(spec.names)),
        config=config,
        label=config.label(),
        knob=config.knob,
        value=config.value,
        plan=plan,
        layers=layers,
        behaviour=BehaviourRate.of(rate(hits), spec.behaviour),
        hits=[int(h) for h in hits],
        prompts=set_summary(completions[:n_p], ppl[:n_p]),
        kl=None if math.isnan(kl) else kl,
        kl_on="benign" if spec.benign else "prompts",
        categories=category_rates([r.get("category") for r in spec.prompts], hits),
        examples=examples,
        layer_profile=profile,
        seconds_per_config=round(elapsed, 3),
        benign=set_summary(completions[n_p:], ppl[n_p:]) if spec.benign else None,
        capability=Capability(RateSummary.of(rate(correct)), [int(c) for c in correct],
                              len({it.subject for it in items})) if items else None,
    )
