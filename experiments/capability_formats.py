"""Why do the bundled chat models sit near chance on MMLU, and which format measures what they know?
Accuracy per answer format (docs/results.md, "Capability measure").

For each model: accuracy with a bootstrap 95 % interval per format on the fixed stratified subset
(`--per-subject` items of each of the 57 subjects), each format's paired difference from "letter" on the
same items, the half-width a paired change would have at 1 140 items (20 per subject) from the measured
discordance, and the first greedy tokens the model generates for a few items (what it tries to answer).
Every format's raw per-item scores are kept, so the calibrated variants ("FMT+cal": each letter's mean
score over the other fold of items subtracted, `calibrated`) are computed from them without another pass.

With `--plan FILE` the same formats are also run under that steering plan, and the paired change
(steered − unsteered, 95 % bootstrap interval over items) is recorded per format under "steered".

Results are merged into OUT after each (model, formats) job, and a job whose formats are all present is
skipped, so a run cut short resumes where it stopped.

    python experiments/capability_formats.py --model smollm2-135m --per-subject 18 \
        --out experiments/results/capability_formats_1k.json letter,cue choice-loglik
    python experiments/capability_formats.py table experiments/results/capability_formats_1k.json  # markdown
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from steerable.evaluate.capability import (
    calibrated,
    dev_items,
    format_prompt,
    load_mmlu,
    mc_scores_formats,
    paired_change,
    predicted,
    stratified,
)
from steerable.evaluate.capability_analogy import load_analogies
from steerable.evaluate.refusal import rate
from steerable.fsutil import write_text_atomic
from steerable.generation import generate
from steerable.models.load import load_model

OUT = Path("experiments/results/capability_formats.json")
FULL = {"mmlu": 1026, "analogies": 1008}  # the ~1 000-item sets: 18 per MMLU subject, 72 per analogy section


def projected_half_width(discordant: float, n: int) -> float:
    """Normal-approximation half-width of a paired 95 % interval of a change at n items, when a fraction
    `discordant` of items change their answer's correctness (the worst case for a given discordance)."""
    return 1.96 * math.sqrt(discordant / n)


def _summary(scores: list[list[float]], items: list[Any]) -> dict[str, Any]:
    picks = predicted(scores)
    ok = [p == it.answer for p, it in zip(picks, items, strict=True)]
    return {"accuracy": rate(ok).to_json(), "correct": [int(c) for c in ok],
            "picked": {c: picks.count(c) for c in "ABCD"}}


def _with_calibrated(scores: dict[str, list[list[float]]]) -> dict[str, list[list[float]]]:
    out = dict(scores)
    for fmt, s in scores.items():
        out[f"{fmt}+cal"] = calibrated(s)
    return out


def _first_tokens(handle: Any, fmt: str, items: list[Any], pool: Any, n: int) -> list[dict[str, Any]]:
    if fmt.startswith("choice-loglik") or n == 0:
        return []
    peek = items[:: max(1, len(items) // n)][:n]
    prompts = [format_prompt(it, fmt, pool) for it in peek]
    texts = generate(handle, prompts, max_new_tokens=6, batch_size=len(prompts))
    return [{"subject": it.subject, "answer": it.answer, "generated": t} for it, t in zip(peek, texts, strict=True)]


def _paired(a: list[int], b: list[int]) -> dict[str, Any]:
    ch = paired_change([bool(c) for c in a], [bool(c) for c in b])
    disc = sum(x != y for x, y in zip(a, b, strict=True)) / len(b)
    return {**ch.to_json(), "half_width": (ch.hi - ch.lo) / 2, "discordant": disc,
            "half_width_at_1140": projected_half_width(disc, 1140)}


def round_robin(items: list[Any]) -> list[int]:
    """Indices of `items` (ordered by subject) taking one item of each subject in turn, so any prefix of
    the order is balanced over subjects."""
    by: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by.setdefault(it.subject, []).append(i)
    width = max(len(v) for v in by.values())
    return [v[r] for r in range(width) for _, v in sorted(by.items()) if r < len(v)]


def _entry(model: dict[str, Any], label: str | None, plan: Any) -> dict[str, Any]:
    """The record a job's results go into: the unsteered formats, or the steered run of one plan."""
    if label is None:
        return model
    entry: dict[str, Any] = model.setdefault("steered", {}).setdefault(label, {"plan": plan, "formats": {}})
    if entry["plan"] != plan:
        entry.update(plan=plan, formats={}, partial={})
    return entry


def scores_so_far(entry: dict[str, Any]) -> dict[str, dict[int, list[float]]]:
    """Per format, the raw scores by item index of a finished or cut-short job (calibrated formats left out)."""
    out: dict[str, dict[int, list[float]]] = {}
    for fmt, rec in entry.get("formats", {}).items():
        if "scores" in rec:
            out[fmt] = dict(enumerate(rec["scores"]))
    for part in entry.get("partial", {}).values():
        for fmt, got in part["scores"].items():
            out.setdefault(fmt, {}).update({int(i): s for i, s in got.items()})
    return out


def merged(paths: list[Path]) -> dict[str, Any]:
    """The result files' entries, one model's entries from several files (base here, a steered run there)
    merged."""
    data: dict[str, Any] = {}
    for path in paths:
        if not path.exists():
            continue
        for name, entry in json.loads(path.read_text()).items():
            have = data.setdefault(name, entry)
            if have is not entry:
                for key in ("formats", "partial", "steered"):
                    have.setdefault(key, {}).update(entry.get(key, {}))
    return data


def table(paths: list[Path]) -> str:
    """Markdown: per model (task) and format, accuracy on the items scored so far, the letters picked, and
    per steered plan the paired change from unsteered on the shared items, its 95 % half-width and the
    half-width projected to the full item set from the measured discordance."""
    data = merged(paths)
    head = "| model | items | format | accuracy | picked A/B/C/D |"
    lines = [head, "|---|---|---|---|---|"]
    steer = ["| model | plan | format | items | base → steered | paired change | half-width | at ~1 000 items |",
             "|---|---|---|---|---|---|---|---|"]
    for name, model in data.items():
        task = name.split(":")[1] if ":" in name else "mmlu"
        items = stratified(load_mmlu() if task == "mmlu" else load_analogies(), model["per_subject"])
        base = scores_so_far(model)
        derived = {**base, **{f"{f}+cal": dict(zip(sc, calibrated(list(sc.values())), strict=True))
                              for f, sc in base.items()}}

        def correct(sc: dict[int, list[float]], idx: list[int], items: list[Any] = items) -> list[bool]:
            return [p == items[i].answer for p, i in zip(predicted([sc[i] for i in idx]), idx, strict=True)]

        for fmt, sc in derived.items():
            idx = sorted(sc)
            picks = predicted([sc[i] for i in idx])
            lines.append(f"| {name} | {len(idx)}/{len(items)} | {fmt} | {rate(correct(sc, idx))} | "
                         + "/".join(str(picks.count(c)) for c in "ABCD") + " |")
        for label, entry in model.get("steered", {}).items():
            for fmt, rec in entry.get("formats", {}).items():  # finished runs kept only correctness
                if "scores" in rec or fmt.removesuffix("+cal") in scores_so_far(entry) or \
                        "correct" not in model["formats"].get(fmt, {}):
                    continue
                cb = [bool(c) for c in model["formats"][fmt]["correct"]]
                ct = [bool(c) for c in rec["correct"]]
                ch = paired_change(ct, cb)
                disc = sum(x != y for x, y in zip(cb, ct, strict=True)) / len(cb)
                steer.append(f"| {name} | {Path(label).stem} | {fmt} | {len(cb)} | {rate(cb).value:.1%} → "
                             f"{rate(ct).value:.1%} | {ch} | ±{(ch.hi - ch.lo) / 2:.1%} | "
                             f"±{projected_half_width(disc, FULL[task]):.1%} (q={disc:.2f}) |")
            st = scores_so_far(entry)
            for fmt, sc in [*st.items(), *[(f"{f}+cal", sc) for f, sc in st.items()]]:
                raw = fmt.removesuffix("+cal")
                if raw not in base:
                    continue
                idx = sorted(set(sc) & set(base[raw]))
                b = {i: base[raw][i] for i in idx}
                t = {i: st[raw][i] for i in idx}
                if fmt.endswith("+cal"):  # calibrated on the shared items, each run on its own
                    b = dict(zip(idx, calibrated([b[i] for i in idx]), strict=True))
                    t = dict(zip(idx, calibrated([t[i] for i in idx]), strict=True))
                cb, ct = correct(b, idx), correct(t, idx)
                ch = paired_change(ct, cb)
                disc = sum(x != y for x, y in zip(cb, ct, strict=True)) / max(1, len(idx))
                steer.append(f"| {name} | {Path(label).stem} | {fmt} | {len(idx)} | {rate(cb).value:.1%} → "
                             f"{rate(ct).value:.1%} | {ch} | ±{(ch.hi - ch.lo) / 2:.1%} | "
                             f"±{projected_half_width(disc, FULL[task]):.1%} (q={disc:.2f}) |")
    return "\n".join(lines) + "\n\n" + "\n".join(steer) + "\n"


def main() -> None:
    import sys

    if sys.argv[1:2] == ["table"]:
        print(table([Path(p) for p in sys.argv[2:]] or [OUT]))
        return
    if sys.argv[1:2] == ["merge"]:  # merge OUT FILE...: runs made in parallel into one file
        write_text_atomic(Path(sys.argv[2]), json.dumps(merged([Path(p) for p in sys.argv[2:]]),
                                                        separators=(",", ":")) + "\n")
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("groups", nargs="+", help="comma-separated formats run as one job, e.g. letter,cue")
    ap.add_argument("--per-subject", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=114, help="items scored between two saves")
    ap.add_argument("--first-tokens", type=int, default=4, help="items whose greedy opening is recorded")
    ap.add_argument("--plan", type=Path, help="also run the formats under this plan (JSON) for the paired change")
    ap.add_argument("--task", choices=("mmlu", "analogies"), default="mmlu",
                    help="MMLU, or the word-analogy items (results under MODEL:analogies)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    handle = load_model(args.model)
    source = load_mmlu() if args.task == "mmlu" else load_analogies()
    items = stratified(source, args.per_subject)
    pool = dev_items(source)
    name = args.model if args.task == "mmlu" else f"{args.model}:{args.task}"
    plan = json.loads(args.plan.read_text()) if args.plan else None
    label = str(args.plan) if args.plan else None
    order = round_robin(items)
    for group in args.groups:
        formats = group.split(",")
        data = json.loads(args.out.read_text()) if args.out.exists() else {}
        model = data.setdefault(name, {"per_subject": args.per_subject, "n": len(items), "formats": {}})
        if model["per_subject"] != args.per_subject:
            model.update(per_subject=args.per_subject, n=len(items), formats={}, steered={}, partial={})
        model["key"] = {c: sum(it.answer == c for it in items) for c in "ABCD"}
        entry = _entry(model, label, plan)
        if all(f in entry["formats"] for f in formats):
            print(name, group, label or "", "already done", flush=True)
            continue
        # per-item scores so far: {format: {item index: scores}}, saved after every chunk
        partial = entry.setdefault("partial", {}).setdefault(group, {"seconds": 0.0, "scores": {}})
        got = partial["scores"]
        todo = [i for i in order if not all(str(i) in got.get(f, {}) for f in formats)]
        for start in range(0, len(todo), args.chunk):
            idx = todo[start : start + args.chunk]
            t0 = time.time()
            scores = mc_scores_formats(handle, [items[i] for i in idx], formats, plan, batch_size=args.batch_size,
                                       pool=pool)
            partial["seconds"] += time.time() - t0
            for f, s in scores.items():
                keep = {str(i): [round(x, 4) for x in row] for i, row in zip(idx, s, strict=True)}
                got.setdefault(f, {}).update(keep)
            write_text_atomic(args.out, json.dumps(data, separators=(",", ":")) + "\n")
            print(name, group, label or "", f"{start + len(idx)}/{len(todo)}", f"{partial['seconds']:.0f}s",
                  flush=True)
        rounded = {f: [got[f][str(i)] for i in range(len(items))] for f in formats}
        seconds = round(partial["seconds"], 1)
        for fmt, s in _with_calibrated(rounded).items():
            rec = {**_summary(s, items), "seconds_for_job": seconds, "job": group}
            if not fmt.endswith("+cal"):
                rec["scores"] = s
            if label is None and not fmt.endswith("+cal"):
                rec["first_tokens"] = _first_tokens(handle, fmt, items, pool, args.first_tokens)
            if label is not None and fmt in model["formats"]:
                rec["vs_unsteered"] = _paired(rec["correct"], model["formats"][fmt]["correct"])
            entry["formats"][fmt] = rec
        del entry["partial"][group]
        if label is None:
            base = model["formats"].get("letter", {}).get("correct")
            for fmt, rec in model["formats"].items():
                if base is not None and fmt != "letter":
                    rec["vs_letter"] = _paired(rec["correct"], base)
        write_text_atomic(args.out, json.dumps(data, separators=(",", ":")) + "\n")
        print(name, group, label or "", f"{seconds:.0f}s",
              {f: str(rate([bool(c) for c in _summary(s, items)["correct"]]))
               for f, s in _with_calibrated(rounded).items()}, flush=True)


if __name__ == "__main__":
    main()
