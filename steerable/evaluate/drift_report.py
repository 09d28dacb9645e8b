"""What `steerable drift` writes: drift.jsonl (a line per assistant turn), summary.json, drift.png (projection
trajectories against the Assistant band) and a self-contained index.html."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never open a window
import matplotlib.pyplot as plt

from steerable.evaluate.drift import summarise
from steerable.fsutil import atomic_path, write_text_atomic

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def plot_trajectories(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """One panel per condition: every conversation's projection per turn (thin), their mean (thick), the band."""
    names = list(dict.fromkeys(r["condition"] for r in records))
    cols = min(3, len(names))
    rows_ = -(-len(names) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.2 * cols, 3.8 * rows_), sharey=True, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    lo, hi = records[0]["band"]
    for ax, name, colour in zip(axes.flat, names, COLOURS * 4, strict=False):
        rows = [r for r in records if r["condition"] == name and r["projection"] is not None]
        ax.axhspan(lo, hi, color="#2ca02c", alpha=0.12, label="Assistant band")
        for conv in dict.fromkeys(r["id"] for r in rows):
            pts = sorted((r["turn"], r["projection"]) for r in rows if r["id"] == conv)
            ax.plot(*zip(*pts, strict=True), color=colour, alpha=0.3, lw=1)
            below = [(t, p) for t, p in pts if p < lo]
            if below:
                ax.scatter(*zip(*below, strict=True), color="black", s=10, zorder=3)
        turns = sorted({r["turn"] for r in rows})
        mean = [sum(r["projection"] for r in rows if r["turn"] == t) / sum(r["turn"] == t for r in rows) for t in turns]
        ax.plot(turns, mean, color=colour, lw=3, label="mean (while generating)")
        scored = [r for r in rows if r.get("text_projection") is not None]
        if scored:
            t_turns = sorted({r["turn"] for r in scored})
            t_mean = [sum(r["text_projection"] for r in scored if r["turn"] == t) / sum(r["turn"] == t for r in scored)
                      for t in t_turns]
            ax.plot(t_turns, t_mean, color="black", lw=2, ls="--", label="mean, text re-read unsteered")
        ax.set_title(name)
        ax.set_xlabel("assistant turn")
        ax.legend(loc="lower left", fontsize=8)
    for row in axes:
        row[0].set_ylabel(f"projection on the axis (layer {records[0]['layer']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def write_drift(out: str | Path, records: Sequence[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """Write every output atomically; return the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "drift.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary = {**info, "conditions": summarise(records)}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    with atomic_path(out / "drift.png") as tmp:
        plot_trajectories(records, tmp)
    write_text_atomic(out / "index.html", _html(records, summary, out / "drift.png"))
    return summary


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def _html(records: Sequence[dict[str, Any]], summary: dict[str, Any], png: Path) -> str:
    img = base64.b64encode(png.read_bytes()).decode()
    conds = summary["conditions"]
    head = "".join(f"<th>{_esc(h)}</th>" for h in ("condition", "replies", "mean projection", "below band",
                                                  "mean drift", "conversations leaving band",
                                                  "text projection (unsteered re-read)", "text below band"))
    rows = "".join(
        f"<tr><td>{_esc(n)}</td><td>{s['replies']}</td><td>{s['mean_projection']:.3f}</td>"
        f"<td>{s['left_band']:.1%}</td><td>{s['mean_drift']:.3f}</td>"
        f"<td>{s['conversations_leaving_band']}/{s['conversations']}</td>"
        f"<td>{_num(s.get('mean_text_projection'))}</td><td>{_pct(s.get('text_below_band'))}</td></tr>"
        for n, s in conds.items())
    turns = "".join(
        f"<tr><td>{_esc(r['condition'])}</td><td>{_esc(r['id'])}</td><td>{r['turn']}</td>"
        f"<td>{_num(r['projection'])}</td><td>{_num(r.get('text_projection'))}</td>"
        f"<td>{'below' if r['left_band'] else ''}</td><td class=text>{_esc(r['user'])}</td>"
        f"<td class=text>{_esc(r['reply'])}</td></tr>" for r in records)
    band = records[0]["band"] if records else ["?", "?"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>steerable drift</title><style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1250px; color: #222; }}
table {{ border-collapse: collapse; font-size: 12.5px; }} td, th {{ border: 1px solid #ddd; padding: 4px 7px; }}
th {{ background: #f4f4f4; }} img {{ max-width: 100%; }} .note {{ color: #666; }}
td.text {{ vertical-align: top; white-space: pre-wrap; max-width: 420px; font-size: 12px; }}
</style></head><body>
<h1>Persona drift: {_esc(summary.get('model', ''))}</h1>
<p class=note>Axis {_esc(summary.get('axis', ''))}, layer {records[0]['layer'] if records else '?'};
Assistant band [{band[0]}, {band[1]}] (percentiles {_esc(summary.get('band', {}).get('percentiles', ''))} of the
Assistant's calibration projections). Conversations: {_esc(summary.get('conversations', ''))}.</p>
<table><tr>{head}</tr>{rows}</table>
<p><img alt="projection trajectories" src="data:image/png;base64,{img}"></p>
<h2>Every assistant turn</h2>
<table><tr><th>condition</th><th>conversation</th><th>turn</th><th>projection</th><th>text projection</th>
<th>band</th><th>user</th>
<th>reply</th></tr>{turns}</table></body></html>
"""
