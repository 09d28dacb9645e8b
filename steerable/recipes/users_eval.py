"""`steerable users eval` as one call: held-out choice accuracy of per-user steering and its checks (issue 15,
methods.md §7).

Conditions, each scored on the same held-out pairs (`preference_eval.choice_logliks`):
- `unsteered`: no plan;
- `population`: the library's population vector (mean difference chosen − rejected) at α_pop;
- `personalised`: the pair's user's composed vector v_u = Σ_k (θ_u − φ̄)_k b̂_k at α;
- `dislike_weighted`: the user's dislike-weighted vector at α_dislike;
- `bt_model`: no steering: the fitted Bradley–Terry model's own prediction P_u(a ≻ b) > ½, from the
  responses' features φ = Bᵀh read by the unsteered model;
- `chance`: a fair coin per pair, seeded by the pair's text (`preference_eval.chance_hits`).
A user the library does not hold gets the population vector (and θ_pop in `bt_model`); such pairs are
counted in the report (`fallback`).

Strengths: composed and population vectors have very different norms (seed 002: α ≈ 7.5–17.5 vs 0.3–0.6),
so each composition gets its own α. Unless given, each is the best of its sweep on the tuning pairs (the
training pairs of the source when it has them, else the evaluation pairs — then flagged as optimistic).

Every pair runs under its own plan (the `profile` plan key with the library object, one plan object per
(user, composition, α, gate), so the validator composes each user's vector once): users mix freely in a batch.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from steerable.directions.ideal_points import centre_by_prompt, mask_to_category, prompt_groups
from steerable.errors import SteerableError
from steerable.evaluate import preference_eval as pe
from steerable.evaluate.capability import calibrated, mc_scores, paired_change, predicted, split_calibration
from steerable.evaluate.capability_tasks import task_items
from steerable.evaluate.logits import perplexity
from steerable.evaluate.refusal import rate
from steerable.generation import generate
from steerable.models.load import ModelHandle
from steerable.recipes.users_fit import capture_texts
from steerable.steering.layer_spec import parse_layers

log = logging.getLogger(__name__)

CONDITIONS = ("chance", "unsteered", "population", "personalised", "dislike_weighted", "bt_model")
STEERED = ("population", "personalised", "dislike_weighted")
#: seed 002's composed-vector range (α ≈ 7.5–17.5; its population vector took 0.3–0.6), for an explicit
#: --sweep-composed; by default each composed grid is the population grid rescaled to equal added norms
SEED_SWEEP_COMPOSED: tuple[float, ...] = (2.5, 5.0, 7.5, 10.0, 12.5, 17.5, 25.0)
SWEEP_POPULATION: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
#: how the capability measure is chosen per model (docs/results.md "Capability measure": smollm2-135m is at
#: chance on MMLU in every format, word analogies with choice-loglik separate it from chance)
CAPABILITY_AUTO = {"smollm2": ("analogies", "choice-loglik"), "": ("mmlu", "cue+cal")}
PAIR_BINS = ((0, 0, "0 (not in library)"), (1, 3, "1-3"), (4, 9, "4-9"), (10, 19, "10-19"), (20, 10**9, "20+"))


class Row(Protocol):
    """What the evaluation reads of a preference row (data/preferences.PreferenceRow)."""

    @property
    def user(self) -> str: ...
    @property
    def prompt(self) -> str: ...
    @property
    def chosen(self) -> str: ...
    @property
    def rejected(self) -> str: ...
    @property
    def category(self) -> str | None: ...
    @property
    def seen(self) -> bool | None: ...


@dataclass
class EvalConfig:
    strength: float | None = None  # α of the composed vectors (personalised); None: chosen by the sweep
    population_strength: float | None = None  # α of the population vector; None: chosen by the sweep
    dislike_strength: float | None = None  # α of the dislike-weighted vectors; None: chosen by the sweep
    layers: Any = None  # steered layers (a subset of the library's); None: all of them
    sweep_composed: Sequence[float] | None = None  # None: SWEEP_POPULATION × ‖v_pop‖ / mean ‖v_u‖ (`grids`)
    sweep_population: Sequence[float] = SWEEP_POPULATION
    sweep: bool = True
    gate_first: int = 4  # K of the "prompt+first:K" gating comparison
    gates: Sequence[str] = ("prompt", "prompt+first:{K}")  # compared with "all" ({K}: gate_first)
    capability: str = "auto"  # "auto", "mmlu", "analogies" or "none"
    capability_format: str | None = None  # None: the task's default (CAPABILITY_AUTO)
    capability_per_subject: int = 2
    gen_prompts: int = 24  # held-out prompts of the generation check (one per user, up to this many)
    max_new_tokens: int = 32
    batch_size: int = 16
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def pair_bin(count: int) -> str:
    for lo, hi, name in PAIR_BINS:
        if lo <= count <= hi:
            return name
    return PAIR_BINS[-1][2]


class Plans:
    """One plan dict per (user, composition, α, gate), built once and reused, so every row of a user shares
    one object (the plan validator checks it, and composes the user's vector, once). Plans use the `profile`
    key with the library object itself. A user the library does not hold is served as the population is:
    the population vector at the population's strength (not the composed α, which is ~20× larger)."""

    def __init__(self, library: Any, layers: list[int], population_strength: float = 0.45) -> None:
        self.library = library
        self.layers = layers
        self.population_strength = population_strength
        self._plans: dict[tuple[Any, ...], dict[str, Any] | None] = {}

    def plan(self, user: str | None, composition: str, strength: float, gate: str = "all") -> dict[str, Any] | None:
        if composition not in ("population", "unsteered") and user not in self.library:
            composition, strength = "population", self.population_strength
        if composition == "unsteered" or strength == 0:
            return None
        key = (None if composition == "population" else user, composition, float(strength), gate)
        if key not in self._plans:
            self._plans[key] = {"method": "add", "profile": self.library, "user": key[0], "composition": composition,
                                "strength": float(strength), "layers": list(self.layers), "gate": gate}
        return self._plans[key]


def steered_layers(handle: ModelHandle, library: Any, spec: Any) -> list[int]:
    have = list(library.layers)
    if spec is None:
        return have
    want = list(parse_layers(spec, handle.n_layers, have))
    missing = [x for x in want if x not in have]
    if missing:
        raise SteerableError(f"layers {missing} are not in the profile library (it holds {have})")
    return want


def condition_hits(handle: ModelHandle, rows: Sequence[Row], plans: Plans, composition: str, strength: float,
                   gate: str = "all", batch_size: int = 16) -> list[bool]:
    """Per pair, whether `composition` at `strength` (under token gate `gate`) prefers the chosen response.
    Pairs with the same texts under the same plan (many users answer the same items; every user shares the
    population's plan) are scored once."""
    row_plans = [plans.plan(r.user, composition, strength, gate) for r in rows]
    unique: dict[tuple[Any, ...], int] = {}
    keys = [(id(p), r.prompt, r.chosen, r.rejected) for p, r in zip(row_plans, rows, strict=True)]
    first = [unique.setdefault(k, i) for i, k in enumerate(keys)]
    todo = sorted(set(first))
    ch, rj = pe.choice_logliks(handle, [rows[i].prompt for i in todo], [rows[i].chosen for i in todo],
                               [rows[i].rejected for i in todo], plans=[row_plans[i] for i in todo],
                               batch_size=batch_size)
    hit = dict(zip(todo, pe.hits_from(ch, rj), strict=True))
    return [hit[f] for f in first]


# --- the library's fitted model (directions/profiles.ProfileLibrary: basis, theta(user), theta_pop) ----------

def ideal_points(library: Any, users: Sequence[str | None], layers: list[int]) -> torch.Tensor:
    """[len(users), L, K] fitted ideal points at `layers`; θ_pop for a user the library does not hold."""
    rows = [list(library.layers).index(x) for x in layers]
    cache: dict[str | None, torch.Tensor] = {}
    for u in users:
        if u not in cache:
            cache[u] = library.theta(u)[0].float()[rows]
    return torch.stack([cache[u] for u in users])


def features(handle: ModelHandle, library: Any, prompts: Sequence[str], texts: Sequence[str], layers: list[int],
             batch_size: int, categories: Sequence[str | None] | None = None) -> torch.Tensor:
    """φ = Bᵀh per text [n, L, K]: each text's activation at the library's site and position (as `users fit`
    read its training texts), read by the unsteered model, projected on the library's basis. Repeated
    (prompt, text) pairs are read once. A prompt-centred library's φ is measured from the mean φ of the texts
    given here for the same prompt (as `users fit` centred its training texts), so pass every text that is
    compared on a prompt in one call. A category-masked library also keeps each text's φ on its category's axis
    (`categories`, one per text; a text without one, or of a category the basis lacks, keeps every axis)."""
    rows = [list(library.layers).index(x) for x in layers]
    basis = library.basis.float()[rows]  # [L, K, d]
    index: dict[tuple[str, str], int] = {}
    where = [index.setdefault((p, t), len(index)) for p, t in zip(prompts, texts, strict=True)]
    h = capture_texts(handle, list(index), layers, site=str(library.site), position=str(library.position),
                      batch_size=batch_size, progress=False)  # [L, N, d]
    phi = torch.einsum("lnd,lkd->nlk", h.float(), basis)
    kind = str(getattr(library, "features", "raw"))
    if kind != "raw":
        phi = centre_by_prompt(phi, prompt_groups([p for p, _ in index]))
    phi = phi[torch.tensor(where, dtype=torch.long)]
    if kind == "category-masked":
        labels = list(library.meta.get("basis", {}).get("labels", []))
        cats = list(categories) if categories is not None else [None] * len(texts)
        phi = mask_to_category(phi, torch.tensor([labels.index(c) if c in labels else -1 for c in cats],
                                                 dtype=torch.long))
    return phi


def bt_hits(handle: ModelHandle, library: Any, rows: Sequence[Row], layers: list[int],
            batch_size: int) -> tuple[list[bool], list[float]]:
    """The fitted BT model's own prediction P_u(chosen ≻ rejected) > ½ per pair (no steering)."""
    prompts = [r.prompt for r in rows]
    both = features(handle, library, prompts + prompts, [r.chosen for r in rows] + [r.rejected for r in rows],
                    layers, batch_size, [r.category for r in rows] * 2)
    fa, fb = both[: len(rows)], both[len(rows) :]
    theta = ideal_points(library, [r.user for r in rows], layers)
    p = pe.bt_probability(fa, fb, theta)
    return [bool(x > 0.5) for x in p], [float(x) for x in p]


# --- the pieces of the report ---------------------------------------------------------------------------------

def vector_norms(library: Any, users: Sequence[str], layers: list[int]) -> dict[str, float]:
    """Mean over `users` (those the library holds) and the steered layers of each composition's ‖v‖."""
    rows = [list(library.layers).index(x) for x in layers]
    held: list[str | None] = list(dict.fromkeys(u for u in users if u in library)) or [None]
    out = {}
    for comp in STEERED:
        norms = [float(library.vectors(u, comp)[0][rows].norm(dim=1).mean()) for u in held]
        out[comp] = sum(norms) / len(norms)
    return out


def grids(cfg: EvalConfig, norms: dict[str, float]) -> dict[str, list[float]]:
    """Each composition's α grid: the population grid, and for composed vectors either the given grid or the
    population grid rescaled by ‖v_pop‖ / ‖v_comp‖, so each point adds a vector as long as the population's
    at the same grid position (the two kinds differ in norm by an order of magnitude, in either direction)."""
    out = {"population": sorted({float(x) for x in cfg.sweep_population} | {0.0})}
    for comp in ("personalised", "dislike_weighted"):
        if cfg.sweep_composed is not None:
            grid = [float(x) for x in cfg.sweep_composed]
        else:
            ratio = norms["population"] / norms[comp] if norms[comp] > 0 else 1.0
            grid = [float(f"{x * ratio:.3g}") for x in cfg.sweep_population]
        out[comp] = sorted(set(grid) | {0.0})
    return out


def sweep(handle: ModelHandle, rows: Sequence[Row], plans: Plans, cfg: EvalConfig,
          grid: dict[str, list[float]]) -> dict[str, Any]:
    """Accuracy against α for each steered composition on `rows`; α = 0 is the unsteered run (shared)."""
    users = [r.user for r in rows]
    base = condition_hits(handle, rows, plans, "unsteered", 0.0, batch_size=cfg.batch_size)
    out: dict[str, Any] = {}
    for comp, alphas in grid.items():
        points = []
        for a in alphas:
            hits = base if a == 0 else condition_hits(handle, rows, plans, comp, a, batch_size=cfg.batch_size)
            acc = pe.accuracy(hits, users, seed=cfg.seed)
            points.append({"strength": a, **acc.to_json()})
            log.info("sweep %s α=%g: %s", comp, a, acc)
        se = sum((p["ci95"][1] - p["ci95"][0]) / (2 * 1.96) for p in points) / len(points)
        shape = pe.peaks([p["strength"] for p in points], [p["value"] for p in points], se)
        best = max(points, key=lambda p: (p["value"], -abs(p["strength"])))
        out[comp] = {"points": points, "best": best["strength"], **shape}
    return out


def capability(handle: ModelHandle, rows: Sequence[Row], plans: Plans, strengths: dict[str, float],
               cfg: EvalConfig) -> dict[str, Any] | None:
    """Capability unsteered, under the population vector and under personalised vectors (item i steered by the
    i-th held-out user's vector, cycling), with the paired change and its interval. `+cal` formats are
    calibrated over all items of a condition (one letter prior per condition, not per user)."""
    if cfg.capability == "none":
        return None
    task, fmt = cfg.capability, cfg.capability_format
    if task == "auto":
        key = "smollm2" if "smollm2" in handle.name.lower() else ""
        task, auto_fmt = CAPABILITY_AUTO[key]
        fmt = fmt or auto_fmt
    fmt = fmt or ("choice-loglik" if task == "analogies" else "cue+cal")
    items = task_items(task, cfg.capability_per_subject, cfg.seed)
    raw, cal = split_calibration(fmt)
    users: list[str | None] = list(dict.fromkeys(r.user for r in rows if r.user in plans.library)) or [None]

    def correct(item_plans: list[Any] | None) -> list[bool]:
        scores = mc_scores(handle, items, format=raw, batch_size=cfg.batch_size, plans=item_plans)
        scores = calibrated(scores) if cal else scores
        return [p == it.answer for p, it in zip(predicted(scores), items, strict=True)]

    base = correct(None)
    out: dict[str, Any] = {"task": task, "format": fmt, "items": len(items),
                           "per_subject": cfg.capability_per_subject, "unsteered": rate(base).to_json()}
    for comp in ("population", "personalised"):
        ps = [plans.plan(users[i % len(users)], comp, strengths[comp]) for i in range(len(items))]
        hits = correct(ps if any(ps) else None)
        out[comp] = {**rate(hits).to_json(), "change": paired_change(hits, base, seed=cfg.seed).to_json()}
    return out


def generation_check(handle: ModelHandle, rows: Sequence[Row], plans: Plans, strengths: dict[str, float],
                     layers: list[int], cfg: EvalConfig) -> dict[str, Any] | None:
    """Greedy replies to held-out prompts (the first held-out pair of each user the library holds) unsteered,
    with the population vector and with the user's personalised vector; each reply re-read by the unsteered
    model and projected on the basis, φ(reply). Closeness to u's profile is the BT utility −‖φ − θ_u‖²
    (mean over layers): a hit when u's personalised reply has a higher utility than the population reply.
    Perplexity of each condition's replies under the unsteered model rides along."""
    lib = plans.library
    first: dict[str, Row] = {}
    for r in rows:
        if r.user in lib and r.user not in first:
            first[r.user] = r
    picked = list(first.values())[: cfg.gen_prompts]
    if not picked or cfg.gen_prompts == 0:
        return None
    prompts = [r.prompt for r in picked]
    users = [r.user for r in picked]
    replies: dict[str, list[str]] = {}
    for comp in ("unsteered", "population", "personalised"):
        ps = [plans.plan(u, comp, strengths.get(comp, 0.0)) for u in users]
        replies[comp] = generate(handle, prompts, plans=ps if any(ps) else None, max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.batch_size)
    if str(lib.position) == "answer-token":  # the features of an A/B library sit at the answer letter
        replies_read = {c: [_answer_of(t) for t in texts] for c, texts in replies.items()}
    else:
        replies_read = {c: [t if t.strip() else None for t in texts] for c, texts in replies.items()}
    ok = [i for i in range(len(picked)) if all(replies_read[c][i] is not None for c in replies)]
    out: dict[str, Any] = {"prompts": len(picked), "scored": len(ok), "max_new_tokens": cfg.max_new_tokens,
                           "read": "the reply's answer letter (answer-token library)" if str(lib.position) ==
                           "answer-token" else "the whole reply (response-mean)", "perplexity_unsteered_model": {}}
    for comp, texts in replies.items():
        ppl = [x for x in perplexity(handle, prompts, texts, None, batch_size=cfg.batch_size) if math.isfinite(x)]
        ppl.sort()
        out["perplexity_unsteered_model"][comp] = {"median": ppl[len(ppl) // 2] if ppl else None, "n": len(ppl)}
    if not ok:
        return out
    theta = ideal_points(lib, [users[i] for i in ok], layers)
    util: dict[str, list[float]] = {}
    comps = list(replies_read)
    # every condition's reply to a prompt read in one call: a prompt-centred library measures them from their mean
    phi_all = features(handle, lib, [prompts[i] for _ in comps for i in ok],
                       [str(replies_read[c][i]) for c in comps for i in ok], layers, cfg.batch_size,
                       [picked[i].category for _ in comps for i in ok])
    for j, comp in enumerate(comps):
        phi = phi_all[j * len(ok) : (j + 1) * len(ok)]
        util[comp] = [float(x) for x in -((phi - theta) ** 2).sum(-1).mean(-1)]
    sel = [users[i] for i in ok]
    for other in ("population", "unsteered"):
        hits = [float(a > b) for a, b in zip(util["personalised"], util[other], strict=True)]
        out[f"personalised_closer_than_{other}"] = pe.accuracy(hits, sel, seed=cfg.seed).to_json()
        out[f"personalised_tied_with_{other}"] = sum(a == b for a, b in zip(util["personalised"], util[other],
                                                                              strict=True)) / len(ok)
        out[f"utility_gain_vs_{other}"] = pe.paired_difference(util["personalised"], util[other], sel,
                                                                seed=cfg.seed).to_json()
    out["mean_utility"] = {c: sum(v) / len(v) for c, v in util.items()}
    out["examples"] = [{"user": users[i], "prompt": prompts[i][:300],
                        **{c: replies[c][i] for c in replies}} for i in ok[:6]]
    return out


_ANSWER = re.compile(r"\(\s*([A-Za-z])\s*\)")


def _answer_of(reply: str) -> str | None:
    """The answer letter a reply opens with ("(B) I would…" → "(B)"; within its first 40 characters), or None."""
    m = _ANSWER.search(reply[:40])
    return None if m is None else f"({m.group(1).upper()})"


def _seen(library: Any, row: Row) -> str:
    """The row's user split: the row's own flag, else the library's record of the user, else unknown."""
    seen = getattr(row, "seen", None)
    if seen is None and row.user in library and callable(getattr(library, "seen", None)):
        seen = library.seen(row.user)
    return "unknown" if seen is None else "seen" if seen else "unseen"


def _choose(given: float | None, sweep_out: dict[str, Any] | None, comp: str, default: float) -> float:
    if given is not None:
        return float(given)
    if sweep_out is not None:
        return float(sweep_out[comp]["best"])
    return default


def evaluate_users(handle: ModelHandle, library: Any, rows: Sequence[Row], cfg: EvalConfig | None = None, *,
                   tune_rows: Sequence[Row] | None = None, provenance: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """The whole report (a JSON-ready dict) for the held-out `rows`; `tune_rows` choose the strengths."""
    cfg = cfg or EvalConfig()
    if not rows:
        raise SteerableError("no preference pairs to evaluate")
    library.check_model(handle)
    layers = steered_layers(handle, library, cfg.layers)
    plans = Plans(library, layers)
    users = [r.user for r in rows]
    known = [u in library for u in users]
    # the sweep reads users the library holds (a fallback row would only repeat the population curve)
    sweep_rows = [r for r in (tune_rows or rows) if r.user in library] or list(tune_rows or rows)
    sweep_on = "tuning pairs" if tune_rows else "evaluation pairs (α chosen on the pairs it is scored on: optimistic)"
    norms = vector_norms(library, [r.user for r in sweep_rows], layers)
    grid = grids(cfg, norms)
    sw = sweep(handle, sweep_rows, plans, cfg, grid) if cfg.sweep else None
    # without a sweep or a given α: the population vector at α = 1 (the mean difference itself) and each composed
    # vector at the α that adds the same norm
    ratio = {c: norms["population"] / norms[c] if norms[c] > 0 else 1.0 for c in STEERED}
    strengths = {"population": _choose(cfg.population_strength, sw, "population", 1.0),
                 "personalised": _choose(cfg.strength, sw, "personalised", ratio["personalised"]),
                 "dislike_weighted": _choose(cfg.dislike_strength if cfg.dislike_strength is not None else
                                             cfg.strength, sw, "dislike_weighted", ratio["dislike_weighted"])}
    plans.population_strength = strengths["population"]
    log.info("strengths %s", strengths)

    hits: dict[str, list[float]] = {}
    hits["chance"] = [float(x) for x in pe.chance_hits(users, [r.prompt for r in rows], [r.chosen for r in rows],
                                                       [r.rejected for r in rows])]
    hits["unsteered"] = [float(x) for x in condition_hits(handle, rows, plans, "unsteered", 0.0,
                                                          batch_size=cfg.batch_size)]
    for comp in STEERED:
        hits[comp] = [float(x) for x in condition_hits(handle, rows, plans, comp, strengths[comp],
                                                       batch_size=cfg.batch_size)]
        log.info("%s at α=%g: %s", comp, strengths[comp], pe.accuracy(hits[comp], users, seed=cfg.seed))
    bt, bt_p = bt_hits(handle, library, rows, layers, cfg.batch_size)
    hits["bt_model"] = [float(x) for x in bt]

    def acc_of(sel: list[int]) -> dict[str, Any]:
        return {c: pe.accuracy([hits[c][i] for i in sel], [users[i] for i in sel], seed=cfg.seed).to_json()
                for c in CONDITIONS}

    def split_by(keys: list[str]) -> dict[str, Any]:
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        order = {b: i for i, (_, _, b) in enumerate(PAIR_BINS)}  # pair-count bins in their natural order
        return {k: acc_of(groups[k]) for k in sorted(groups, key=lambda k: (order.get(k, len(order)), k))}

    counts = [library.pair_count(u) if k else 0 for u, k in zip(users, known, strict=True)]
    report: dict[str, Any] = {
        "model": handle.name,
        "profiles": str(getattr(library, "path", None) or "<in memory>"),
        "pairs": len(rows),
        "users": len(set(users)),
        "accuracy": acc_of(list(range(len(rows)))),
        "strength": strengths["personalised"],
        "strengths": strengths,
        "strengths_from": {c: "given" if g is not None else ("sweep" if sw else "default")
                           for c, g in (("population", cfg.population_strength), ("personalised", cfg.strength),
                                        ("dislike_weighted", cfg.dislike_strength if cfg.dislike_strength
                                         is not None else cfg.strength))},
        "layers": layers,
        "site": str(library.site),
        "fallback": {"pairs": sum(not k for k in known),
                     "users": len({u for u, k in zip(users, known, strict=True) if not k}),
                     "rule": "users not in the library are steered with the population vector (and scored by "
                             "bt_model with θ_pop)"},
        "by_pairs_per_user": split_by([pair_bin(c) for c in counts]),
        "by_seen": split_by([_seen(library, r) for r in rows]),
        "by_category": split_by([str(getattr(r, "category", None) or "none") for r in rows]),
        "by_library": split_by(["in library" if k else "fallback" for k in known]),
        "differences": {
            f"{a}-{b}": pe.paired_difference(hits[a], hits[b], users, seed=cfg.seed).to_json()
            for a, b in (("personalised", "population"), ("personalised", "unsteered"),
                         ("population", "unsteered"), ("dislike_weighted", "population"))},
        "bt_model_mean_probability": sum(bt_p) / len(bt_p),
        "chance_rule": "a fair coin per pair seeded by sha256 of (user, prompt, the two texts sorted): expected ½, "
                       "realised on these pairs",
        "accuracy_rule": "hit: mean per-token log-likelihood of the chosen response after the prompt (teacher "
                         "forced) > the rejected one's; ties are misses; 95 % intervals: bootstrap over users",
        "vector_norms": norms,
        "sweep_grids": grid if sw else None,
        "sweep_grid_rule": ("given" if cfg.sweep_composed is not None else
                            "composed grids = the population grid × ‖v_pop‖/‖v_comp‖ (equal added norms)"),
        "sweep": sw,
        "sweep_on": sweep_on if sw else None,
        "sweep_pairs": len(sweep_rows) if sw else 0,
        "provenance": provenance or {},
    }
    # gating (seed 002: steering only the prefill and the first K tokens is a no-op): personalised at its α
    gates = {}
    for gate in dict.fromkeys(["all", *(g.replace("{K}", str(cfg.gate_first)) for g in cfg.gates)]):
        g_hits = (hits["personalised"] if gate == "all" else
                  [float(x) for x in condition_hits(handle, rows, plans, "personalised", strengths["personalised"],
                                                    gate, cfg.batch_size)])
        gates[gate] = {**pe.accuracy(g_hits, users, seed=cfg.seed).to_json(),
                       "difference_vs_all": pe.paired_difference(g_hits, hits["personalised"], users,
                                                                 seed=cfg.seed).to_json()}
    report["gating"] = {"composition": "personalised", "strength": strengths["personalised"], "gates": gates}
    report["capability"] = capability(handle, rows, plans, strengths, cfg)
    report["generation"] = generation_check(handle, rows, plans, strengths, layers, cfg)
    return report
