"""What a direction file holds, as text: the per-layer table `steerable inspect` prints and the layer selection
and CAST condition its criteria would choose (library code: the CLI and the demo print what it returns)."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

from steerable.directions.artifact import DirectionSet, layer_ranges
from steerable.directions.cast_calibration import available_scores, choose_cast
from steerable.directions.geometry import cosine_matrix, discriminative_layers, global_direction, top_layers
from steerable.errors import SteerableError
from steerable.tables import fmt, table


def printable(value: Any) -> str:
    """`str(value)` with every character a terminal could act on escaped: control characters (ANSI escape
    sequences), bidi and other format characters, line separators, lone surrogates (\\xNN / \\uNNNN)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else
                                              f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
                   for c in text)


def safe_json(obj: Any) -> str:
    """Indented JSON whose text is pure printable ASCII: every non-ASCII or control character in a string is a
    JSON escape (the values are unchanged for a JSON reader)."""
    return json.dumps(obj, indent=2, ensure_ascii=True).replace("\x7f", "\\u007f")


def inspect_table(ds: DirectionSet) -> str:
    """Per-layer quality, norms, cosines and class percentiles, then what each layer criterion selects and the
    automatic CAST condition (`steerable inspect` and `calibrate` print it)."""
    cos = cosine_matrix(ds)
    _, b1_layer = global_direction(ds)
    b1 = ds.direction(b1_layer)
    rows = []
    for i, layer in enumerate(ds.layers):
        p = ds.percentiles[i]
        rows.append([
            layer, float(ds.auroc[i]), float(ds.cohens_d[i]), float(ds.raw_norms[i]), float(ds.scales[i]),
            float(cos[i, i - 1]) if i > 0 else float("nan"), float(ds.directions[i] @ b1),
            f"{p[0, 25]:.2f}/{p[0, 50]:.2f}/{p[0, 75]:.2f}", f"{p[1, 25]:.2f}/{p[1, 50]:.2f}/{p[1, 75]:.2f}",
        ])
    m = ds.meta
    esc = printable  # every value from the file is escaped before it reaches a terminal
    head = (f"model {esc(m.get('model', {}).get('name'))}  site {esc(m.get('site'))}  "
            f"position {esc(m.get('position'))}  estimator {esc(m.get('estimator'))}  counts {esc(m.get('counts'))}\n"
            f"global direction b1 = layer {b1_layer}; AUROC and Cohen's d on the held-out 20 %\n")
    sel, _ = selection_summary(ds)

    def show(layers: list[int] | None, unavailable: str) -> str:
        if layers is None:
            return f"— ({unavailable})"
        return layer_ranges(layers) if layers else "none"
    no_stat = "no finite held-out statistic below the skip cutoff"
    lines = [
        "layer selection:",
        f"  discriminative (μP·μN < 0 along b1): {show(sel['discriminative'], 'no mean_unit_*: recalibrate')}",
        f"  top-5 by AUROC (last 20 % skipped):  {show(sel['top_auroc'], no_stat)}",
        f"  top-5 by Cohen's d (same skip):      {show(sel['top_cohens_d'], no_stat)}",
        f"  plane: b1 = layer {sel['plane_b1_layer']} (global direction), b2 = PC1 of the directions ⟂ b1",
    ]
    for name, c in sel["conditions"].items():
        lines.append(
            f"condition (score {name}, layer/threshold auto): layer {c['layer']}, steer when {c['score']} score "
            f"{c['compare']} {c['threshold']:.4f}; held-out precision {fmt(c['precision'])} recall {fmt(c['recall'])} "
            f"FPR {fmt(c['fpr'])} (train recall {fmt(c['train_recall'])} FPR {fmt(c['train_fpr'])})"
        )
    text = head + table(
        ["layer", "AUROC", "cohen_d", "‖μP−μN‖", "scale", "cos(prev)", "cos(b1)", "pos p25/50/75",
         "neg p25/50/75"], rows) + "\n\n" + "\n".join(lines)
    fixed = condition_sources(ds)
    return text if fixed is None else text + "\n\n" + condition_sources_table(fixed)


def condition_sources(ds: DirectionSet) -> dict[str, Any] | None:
    """The multi-source condition a file records (directions/multi_source.py), as a per-source summary:
    for each source its class, size, the rate it fires at when left out of the fit (recall for a positive
    source, false-positive rate for a negative one), on its held-out fold, and on all its prompts. None when
    the file records no such condition (or an unreadable one)."""
    c = ds.meta.get("condition")
    if not isinstance(c, dict) or not isinstance(c.get("fires_per_source"), dict):
        return None
    loso_raw = c.get("loso")
    loso: dict[str, Any] = loso_raw if isinstance(loso_raw, dict) else {}
    rows = []
    for name, v in c["fires_per_source"].items():
        if not isinstance(v, dict):
            continue
        positive = v.get("class") == "positive"
        rows.append({"source": str(name), "class": "positive" if positive else "negative",
                     "rate": "recall" if positive else "fpr", "n": v.get("n"),
                     "left_out": loso.get(name), "n_heldout": v.get("n_heldout"),
                     "heldout": v.get("heldout_fires"), "fitted": v.get("fires")})
    keys = ("layer", "score", "estimator", "compare", "threshold", "recall_target", "max_fpr", "rule",
            "meets_targets", "loso_min_recall", "loso_max_fpr")
    return {**{k: c.get(k) for k in keys}, "sources": rows}


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, int | float) and not isinstance(v, bool) else "—"


def condition_sources_table(c: dict[str, Any]) -> str:
    """`condition_sources` as text: the chosen rule, then per source its recall or false-positive rate."""
    esc = printable
    t = c["threshold"]
    threshold = f"{t:.4f}" if isinstance(t, int | float) and not isinstance(t, bool) else esc(t)
    rule = (f"layer {esc(c['layer'])}, {esc(c['score'])} score ({esc(c.get('estimator') or 'mean-diff')} "
            f"direction), steer when score {esc(c['compare'])} {threshold}")
    verdict = "meets" if c.get("meets_targets") else "does NOT meet"
    head = (f"multi-source condition (leave-one-source-out choice, threshold rule {esc(c.get('rule'))}): {rule}\n"
            f"{verdict} the targets: recall ≥ {_pct(c.get('recall_target'))} on every left-out positive source "
            f"and FPR ≤ {_pct(c.get('max_fpr'))} on every left-out negative one (worst: recall "
            f"{_pct(c.get('loso_min_recall'))}, FPR {_pct(c.get('loso_max_fpr'))})\n")
    rows = [[esc(r["source"]), r["class"], r["rate"], esc(r["n"]), _pct(r["left_out"]),
             f"{_pct(r['heldout'])} (n={esc(r['n_heldout'])})" if r["heldout"] is not None else "—", _pct(r["fitted"])]
            for r in c["sources"]]
    return head + table(["source", "class", "rate", "n", "left out of the fit", "held-out fold", "all prompts"],
                        rows)


def selection_summary(ds: DirectionSet) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What each layer criterion picks; None where the artifact lacks what a criterion needs."""
    def attempt(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except SteerableError:  # an older or imported artifact: report the criterion as unavailable
            return None

    sel = {
        "discriminative": attempt(lambda: discriminative_layers(ds)),
        "top_auroc": attempt(lambda: top_layers(ds, 5, "auroc")),
        "top_cohens_d": attempt(lambda: top_layers(ds, 5, "cohens_d")),
        "plane_b1_layer": global_direction(ds)[1],
        "skip_last": 0.2,
    }
    # what a conditional plan with layer and threshold "auto" would decide with, for each score (and "auto")
    scores = available_scores(ds)
    choices = {s: attempt(functools.partial(choose_cast, ds, score=s)) for s in (*scores, "auto") if scores}
    sel["conditions"] = {s: dataclasses.asdict(c) for s, c in choices.items() if c is not None}
    choice = choices.get("cast")
    return sel, dataclasses.asdict(choice) if choice is not None else None


__all__ = ["condition_sources", "condition_sources_table", "inspect_table", "printable", "safe_json",
           "selection_summary"]
