"""Persona vectors (methods.md §3) as one library call: the model answers neutral questions under a
trait-eliciting and under an opposite system prompt (greedy), a judge keeps only the answers that show /
do not show the trait, and the persona vector is the mean difference of the kept answers' response-mean
activations. `steerable persona-vector` is this function plus file writing.

Recipe, per question (role data: train questions fit the vector, test questions are held out):
  1. answer it twice: system prompt k of the trait side, and prompt k of the opposite side (k cycles through
     the prompts as the questions go), greedy, `max_new_tokens`;
  2. read each answer back and take its response-mean at every layer — by default as an answer to the bare
     question, *without* the system prompt (`read="answer"`), so the vector describes what the answer says,
     not which system prompt was in context; `read="prompted"` keeps the system prompt (the paper's
     extraction);
  3. judge: `projection` (default) — each answer's projection at `judge_layer` on the first-pass mean
     difference (trait − opposite, training questions), kept when on its side of the midpoint of the two
     sides' medians (directions/axis.py `keep_by_score`); `ab` — the model itself answers "(A) Yes / (B) No"
     to the trait's judge question about the answer, its score p(Yes) / (p(Yes) + p(No)) kept by the same
     rule; `none` — keep every answer;
  4. mean difference (trait − opposite) of the kept training answers per layer; held-out AUROC and Cohen's d
     on the kept held-out answers, and (meta["persona"]["heldout_auroc_unfiltered"]) on every held-out answer.

The result is an ordinary DirectionSet: positive class = the trait, so `add` with strength α > 0 pushes
toward it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerable.capture.features import response_means
from steerable.capture.run import CaptureResult
from steerable.capture.stats import LayerStats
from steerable.data import roles
from steerable.data.jsonl import read_jsonl_numbered
from steerable.data.loaders import Pair, split_of
from steerable.data.messages import check_text
from steerable.data.persona_traits import TraitPrompts
from steerable.data.roles import Question
from steerable.directions.artifact import DirectionSet
from steerable.directions.axis import (
    FilterResult,
    default_filter_layer,
    first_pass_direction,
    keep_by_score,
)
from steerable.directions.calibrate import artifact_meta, directions_from_capture
from steerable.directions.quality import auroc
from steerable.errors import DataError, SteerableError
from steerable.evaluate.logits import ab_score
from steerable.models.load import Messages, ModelHandle
from steerable.recipes.axis import answer

log = logging.getLogger(__name__)

JUDGES = ("projection", "ab", "none")
READS = ("answer", "prompted")
SIDES = ("trait", "opposite")


@dataclass(frozen=True)
class PersonaRow:
    """One answer: to `question`, under a system prompt of the trait side or of the opposite side."""

    side: str  # "trait" | "opposite"
    question_id: str
    question: str
    system: str
    split: str  # "train" | "test" (test: held out)
    response: str = ""

    def messages(self, with_system: bool = True) -> Messages:
        user = [{"role": "user", "content": self.question}]
        return [{"role": "system", "content": self.system}, *user] if with_system else user

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def persona_rows(trait: TraitPrompts, train: Sequence[Question], test: Sequence[Question]) -> list[PersonaRow]:
    """Every question answered once per side; question i (train, then test) uses prompt i mod the number of
    that side's prompts, so every prompt is used about equally and both splits see the same prompts."""
    if not train:
        raise SteerableError("a persona vector needs at least one training question")
    rows = []
    for i, (q, split) in enumerate([(q, "train") for q in train] + [(q, "test") for q in test]):
        rows.append(PersonaRow("trait", q.id, q.question, trait.positive[i % len(trait.positive)], split))
        rows.append(PersonaRow("opposite", q.id, q.question, trait.negative[i % len(trait.negative)], split))
    return rows


def load_questions(path: str | Path) -> list[tuple[Question, str]]:
    """A JSONL of {"question", "id"?, "split"?: "train"|"test"}; without "split" a question goes to the fixed
    hashed split (30 % test) every built-in set uses."""
    out = []
    for n, r in read_jsonl_numbered(path, "questions file"):
        where = f"{path}:{n}"
        text = check_text(r.get("question"), where, "\"question\"")
        if not text.strip():
            raise DataError(f"{where}: \"question\" is empty")
        split = r.get("split") or split_of(text)
        if split not in ("train", "test"):
            raise DataError(f"{where}: \"split\" must be \"train\" or \"test\", got {split!r}")
        out.append((Question(str(r.get("id", f"q{n}")), "", text), split))
    if not out:
        raise DataError(f"{path}: no questions (one JSON object with a \"question\" per line)")
    return out


def choose_questions(questions: int | str | Path | None = None,
                     test_questions: int | None = None) -> tuple[list[Question], list[Question]]:
    """(train, test) questions: the role data's neutral questions (None: all; an int N: the first N of the
    train split) or a questions file; `test_questions` caps the held-out ones."""
    if isinstance(questions, (str, Path)):
        rows = load_questions(questions)
        train = [q for q, s in rows if s == "train"]
        test = [q for q, s in rows if s == "test"]
    else:
        train = roles.questions("train")[:questions]
        test = roles.questions("test")
    return train, test[:test_questions]


def read_responses(path: str | Path) -> list[PersonaRow]:
    """The answers of an earlier run (its `.responses.jsonl`: one `PersonaRow.to_json()` per line)."""
    out = []
    for line, row in read_jsonl_numbered(path, "responses file"):
        try:
            r = PersonaRow(**row)
        except TypeError as e:
            raise DataError(f"{path}:{line}: not a row written by `steerable persona-vector` ({e})") from None
        if r.side not in SIDES or r.split not in ("train", "test") or not isinstance(r.response, str):
            raise DataError(f"{path}:{line}: \"side\" must be trait/opposite and \"split\" train/test")
        out.append(r)
    return out


def ab_judge_prompt(trait: TraitPrompts, row: PersonaRow) -> Pair:
    """The A/B judge's item: the model reads the question and the answer and is asked the trait's question."""
    prompt = (f"Here is a question and an answer to it.\n\nQuestion: {row.question}\n\nAnswer: {row.response}\n\n"
              f"{trait.question}\n\nChoices:\n (A) Yes\n (B) No")
    return Pair(prompt, "(A)", "(B)")


@dataclass
class PersonaJudge:
    """A fitted judge: scores answers (higher = shows the trait more) and the threshold between the sides."""

    kind: str
    trait: TraitPrompts
    read: str
    layer: int | None = None
    direction: torch.Tensor | None = None  # the projection judge's first-pass direction
    threshold: float = math.nan

    def scores(self, handle: ModelHandle, rows: Sequence[PersonaRow], *, batch_size: int = 16,
               feats: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
        """Per answer, the judge's trait score; `feats` ([n, d] at the judge layer) skips the re-read."""
        if self.kind == "ab":
            return torch.tensor(ab_score(handle, [ab_judge_prompt(self.trait, r) for r in rows],
                                         batch_size=batch_size))
        if self.kind == "projection":
            if self.direction is None or self.layer is None:
                raise SteerableError("the projection judge has no direction yet (it is fitted by the recipe)")
            if feats is None:
                feats = response_means(handle, [r.messages(self.read == "prompted") for r in rows],
                                       [r.response for r in rows], [self.layer], batch_size=batch_size,
                                       progress=progress)[0]
            return (feats.double() @ self.direction.double()).float()
        raise SteerableError(f"the {self.kind!r} judge gives no scores")

    def shows_trait(self, scores: torch.Tensor) -> torch.Tensor:
        return scores > self.threshold

    def to_json(self) -> dict[str, Any]:
        return {"judge": self.kind, "layer": self.layer, "threshold": self.threshold, "read": self.read}


@dataclass
class PersonaResult:
    """What `estimate_persona_vector` found: the vector, every answer, which the judge kept, and the report."""

    directions: DirectionSet
    rows: list[PersonaRow]
    keep: torch.Tensor
    judge: PersonaJudge
    scores: torch.Tensor | None
    report: dict[str, Any]
    feats: torch.Tensor  # [len(layers), n, d] response-means as read

    @property
    def kept_rows(self) -> list[PersonaRow]:
        return [r for r, k in zip(self.rows, self.keep.tolist(), strict=True) if k]


def _counts(rows: Sequence[PersonaRow], keep: torch.Tensor) -> dict[str, int]:
    out = {}
    for split in ("train", "test"):
        for side in SIDES:
            mask = [r.split == split and r.side == side for r in rows]
            out[f"{split}_{side}"] = sum(mask)
            out[f"{split}_{side}_kept"] = int(keep[torch.tensor(mask, dtype=torch.bool)].sum()) if any(mask) else 0
    return out


def estimate_persona_vector(
    handle: ModelHandle,
    trait: TraitPrompts,
    *,
    questions: int | str | Path | None = None,
    test_questions: int | None = None,
    judge: str = "projection",
    judge_layer: int | None = None,
    margin: float = 0.0,
    read: str = "answer",
    layers: Sequence[int] | None = None,
    responses: Sequence[PersonaRow] | str | Path | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    info: dict[str, Any] | None = None,
    on_answers: Callable[[list[PersonaRow]], None] | None = None,
    progress: bool = True,
) -> PersonaResult:
    """The persona vector of `trait` on `handle` (module docstring). `responses` (rows or a `.responses.jsonl`)
    skips generation; otherwise `on_answers` gets the answers before anything else runs."""
    if judge not in JUDGES:
        raise SteerableError(f"unknown judge {judge!r}: use one of {', '.join(JUDGES)}")
    if read not in READS:
        raise SteerableError(f"unknown read {read!r}: use one of {', '.join(READS)}")
    layer_list = list(range(handle.n_layers)) if layers is None else sorted(set(layers))
    if not layer_list or not all(0 <= x < handle.n_layers for x in layer_list):
        raise SteerableError(f"layers must lie in 0-{handle.n_layers - 1}")
    jl = default_filter_layer(handle.n_layers) if judge_layer is None else judge_layer
    if judge == "projection" and not 0 <= jl < handle.n_layers:
        raise SteerableError(f"judge layer {jl} is outside the model's layers 0-{handle.n_layers - 1}")
    if responses is not None:
        rows = read_responses(responses) if isinstance(responses, (str, Path)) else list(responses)
        log.info("reusing %d answers", len(rows))
    else:
        train, test = choose_questions(questions, test_questions)
        chosen = persona_rows(trait, train, test)
        log.info("answering %d questions x 2 system prompts (max %d new tokens)", len(train) + len(test),
                 max_new_tokens)
        rows = answer(handle, chosen, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        if on_answers is not None:
            on_answers(rows)
    if not rows:
        raise SteerableError("no answers to fit a persona vector on")
    read_layers = sorted(set(layer_list) | ({jl} if judge == "projection" else set()))
    feats = response_means(handle, [r.messages(read == "prompted") for r in rows], [r.response for r in rows],
                           read_layers, batch_size=batch_size, progress=progress)
    is_trait = torch.tensor([r.side == "trait" for r in rows])
    train_rows = torch.tensor([r.split == "train" for r in rows])
    heldout = ~train_rows
    fitted = PersonaJudge(judge, trait, read, jl if judge == "projection" else None)
    scores: torch.Tensor | None = None
    result: FilterResult | None = None
    if judge == "projection":
        x = feats[read_layers.index(jl)]
        fitted.direction = first_pass_direction(x, is_trait, train_rows)
        scores = fitted.scores(handle, rows, feats=x)
    elif judge == "ab":
        scores = fitted.scores(handle, rows, batch_size=batch_size)
    if scores is not None:
        result = keep_by_score(scores, is_trait, train_rows, margin=margin)
        fitted.threshold = result.threshold
        keep = result.keep
    else:
        keep = torch.ones(len(rows), dtype=torch.bool)
    counts = _counts(rows, keep)
    if not counts["train_trait_kept"] or not counts["train_opposite_kept"]:
        raise SteerableError(f"the {judge} judge kept no training answers of one side ({counts}): lower the margin "
                             "or use --judge none")
    log.info("judge %s kept %d of %d answers", judge, int(keep.sum()), len(rows))

    cap_layers = [read_layers.index(x) for x in layer_list]
    idx = torch.nonzero(keep).squeeze(1)
    stats = {}
    for j, layer in zip(cap_layers, layer_list, strict=True):
        st = LayerStats(handle.hidden_size, reservoir_cap=len(rows) + 1, heldout_cap=len(rows) + 1, seed=layer)
        st.add(feats[j][idx], is_trait[idx].long(), heldout[idx])
        stats[layer] = st
    cap = CaptureResult(stats, "resid_post", "response-mean", int(keep.sum()), 0)
    meta = artifact_meta(handle, {
        "source": "steerable role data (steerable/data/roles) answered under trait / opposite system prompts",
        "n_examples": int(keep.sum()), "n_answers": len(rows), "max_new_tokens": max_new_tokens,
        "heldout_rule": "the role data's test-split questions (or a questions file's \"split\")", **(info or {})})
    ds = directions_from_capture(cap, "mean-diff", meta)
    unfiltered = []
    hp_mask, hn_mask = heldout & is_trait, heldout & ~is_trait
    for layer in ds.layers:
        x = feats[read_layers.index(layer)].double() @ ds.direction(layer).double()
        unfiltered.append(float(auroc(x[hp_mask].float(), x[hn_mask].float()))
                          if bool(hp_mask.any()) and bool(hn_mask.any()) else math.nan)
    ds.meta["persona"] = {
        "trait": trait.trait, "description": trait.description, "ab_set": trait.ab_set, "read": read,
        "recipe": "mean(kept trait answers' response-means) - mean(kept opposite answers'); positive = trait",
        **fitted.to_json(), "margin": margin, "counts": counts, "heldout_auroc_unfiltered": unfiltered}
    report: dict[str, Any] = {
        "model": handle.name, "trait": trait.to_json(), "judge": {**fitted.to_json(), "margin": margin,
                                                                  **(result.to_json() if result else {})},
        "counts": counts,
        "layers": [{"layer": layer, "auroc": float(ds.auroc[i]), "cohens_d": float(ds.cohens_d[i]),
                    "auroc_unfiltered": unfiltered[i], "raw_norm": float(ds.raw_norms[i])}
                   for i, layer in enumerate(ds.layers)]}
    return PersonaResult(ds, rows, keep, fitted, scores, report, feats[cap_layers])


def best_layer(ds: DirectionSet) -> int:
    """The middle-half layer (25–75 % depth) with the highest held-out AUROC (ties: higher Cohen's d)."""
    n = int(ds.meta.get("model", {}).get("n_layers", max(ds.layers) + 1))
    middle = [i for i, layer in enumerate(ds.layers) if n / 4 <= layer <= 3 * n / 4] or list(range(len(ds.layers)))
    best = max(middle, key=lambda i: (float(torch.nan_to_num(ds.auroc[i], nan=-1.0)),
                                      float(torch.nan_to_num(ds.cohens_d[i], nan=-1e9))))
    return ds.layers[best]


def judge_agreement(shows: Sequence[bool], labels: Sequence[int]) -> dict[str, float]:
    """Agreement of a judge's "shows the trait" calls with hand labels: accuracy and Cohen's kappa."""
    if len(shows) != len(labels) or not labels:
        raise SteerableError("judge agreement needs one call per label")
    n = len(labels)
    acc = sum(int(s) == int(y) for s, y in zip(shows, labels, strict=True)) / n
    p_s, p_y = sum(map(int, shows)) / n, sum(map(int, labels)) / n
    chance = p_s * p_y + (1 - p_s) * (1 - p_y)
    kappa = (acc - chance) / (1 - chance) if chance < 1 else math.nan
    return {"n": n, "accuracy": acc, "kappa": kappa}


__all__ = ["JUDGES", "READS", "PersonaJudge", "PersonaResult", "PersonaRow", "answer", "best_layer",
           "choose_questions", "estimate_persona_vector", "judge_agreement", "load_questions", "persona_rows",
           "read_responses"]
