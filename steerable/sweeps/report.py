"""`steerable report`: one self-contained HTML page (plots inlined, no outside resources) plus the PNGs."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerable.errors import SteerableError
from steerable.fsutil import write_text_atomic
from steerable.sweeps import plots
from steerable.sweeps.records import RateSummary, SweepRecord, baseline_of
from steerable.sweeps.select import Budget, Choice, median_ppl, select

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1250px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12.5px; } td, th { border: 1px solid #ddd; padding: 4px 7px; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.chosen td { background: #fff6cc; } .note { color: #666; } img { max-width: 100%; }
td.text { vertical-align: top; white-space: pre-wrap; max-width: 380px; font-size: 12px; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{_esc(alt)}" src="data:image/png;base64,{data}"></p>'


def _pct(rate: RateSummary) -> str:
    return f"{rate.rate:.1%} [{rate.ci95[0]:.0%}, {rate.ci95[1]:.0%}]"


def _coherent(r: SweepRecord) -> str:
    """Coherent compliance on the steered prompts ("—" for a line written before it was measured)."""
    cc = r.prompts.coherent_compliance
    return _pct(cc) if cc is not None else "—"


def _bounds_note(records: Sequence[SweepRecord]) -> str:
    bounds = {json.dumps(b.to_json()): b for r in records if (b := r.coherence_bounds) is not None}
    if not bounds:
        return ("<p class='note'>coherent compliance was not measured when these lines were written "
                "(a sweep since then records it).</p>")
    parts = [f"language consistency ≥ {b.min_language_consistency:g}, rep-4 ≤ {b.max_rep4:g}, perplexity under "
             f"the unsteered model ≤ {'∞' if b.max_perplexity is None else f'{b.max_perplexity:g}'}"
             for b in bounds.values()]
    return ("<p class='note'>Coherent compliance: completions of the steered prompts that are not refusals and "
            f"pass every coherence check ({'; '.join(_esc(p) for p in parts)}). Refusal counts every "
            "non-refusal as compliance, gibberish included; coherent compliance does not.</p>")


def _results_table(records: Sequence[SweepRecord], chosen: SweepRecord | None) -> str:
    head = ["configuration", "layers", "behaviour", "refusal", "coherent compliance", "benign refusal", "KL",
            "median ppl", "language", "compression", "rep-4", "capability Δ"]
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in records:
        cap = r.capability.change if r.capability is not None else None
        cells = [
            _esc(r.label), _esc(",".join(map(str, r.layers)) or "—"), _pct(r.behaviour), _pct(r.prompts.refusal),
            _coherent(r),
            _pct(r.benign.refusal) if r.benign is not None else "—",
            f"{r.kl:.4f}" if r.kl is not None else "—", f"{median_ppl(r):.2f}",
            f"{r.prompts.language_consistency:.3f}", f"{r.prompts.compression_ratio:.3f}",
            f"{r.prompts.rep4:.3f}", f"{cap.change:+.1%} [{cap.ci95[0]:+.1%}, {cap.ci95[1]:+.1%}]"
            if cap else "—",
        ]
        cls = ' class="chosen"' if chosen is not None and r.key == chosen.key else ""
        out.append(f"<tr{cls}>" + "".join(f'<td class="{"text" if i < 2 else "num"}">{c}</td>'
                                          for i, c in enumerate(cells)) + "</tr>")
    return "\n".join(out) + "</table>"


def _strongest(records: Sequence[SweepRecord]) -> SweepRecord | None:
    steered = [r for r in records if not r.is_baseline]
    return max(steered, key=lambda r: r.behaviour.rate) if steered else None


def _examples_table(base: SweepRecord, columns: Sequence[tuple[str, SweepRecord]]) -> str:
    out = ["<table><tr><th>set</th><th>prompt</th><th>unsteered</th>"
           + "".join(f"<th>{_esc(name)}</th>" for name, _ in columns) + "</tr>"]
    for i, ex in enumerate(base.examples):
        cells = [ex.set, ex.prompt_text, ex.completion]
        for _, rec in columns:
            exs = rec.examples
            cells.append(exs[i].completion if i < len(exs) else "")
        out.append("<tr>" + "".join(f'<td class="text">{_esc(c)}</td>' for c in cells) + "</tr>")
    return "\n".join(out) + "</table>"


def write_report(records: Sequence[SweepRecord], out_dir: str | Path, *, criterion: str = "budget",
                 budget: Budget | None = None) -> Path:
    """Write OUT/index.html and OUT/*.png for the lines of one sweep; return the page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = baseline_of(records)
    choice: Choice | None
    try:
        choice = select(records, criterion, budget)
        chosen, why = choice.record, f"{choice.record.label} — {choice.why}"
    except SteerableError as e:
        choice, chosen, why = None, None, f"no point chosen: {e}"
    figs = {
        "dose_response": plots.dose_response(records, base, out / "dose_response.png"),
        "tradeoff": plots.tradeoff(records, base, chosen, out / "tradeoff.png"),
        "categories": plots.categories(base, chosen or _strongest(records) or base, out / "categories.png"),
        "layers": plots.layer_profile(base, chosen, out / "layers.png"),
    }
    sweep = base.sweep
    strongest = _strongest(records)
    columns = [(f"chosen: {chosen.label}", chosen)] if chosen else []
    if strongest is not None and (chosen is None or strongest.key != chosen.key):
        columns.append((f"most {base.behaviour.name}: {strongest.label}", strongest))
    body = [
        f"<h1>Steering sweep — {_esc(sweep.model)}</h1>",
        f"<p class='note'>vector <code>{_esc(sweep.vector)}</code>; prompts "
        f"<code>{_esc(sweep.name('prompts', '?'))}</code> (n={base.behaviour.n}), benign "
        f"<code>{_esc(sweep.name('benign') or '—')}</code>; success = {_esc(base.behaviour.name)}; "
        f"{len(records)} configurations; {sweep.max_new_tokens} new tokens, greedy. "
        "Intervals are bootstrap 95 %.</p>",
        f"<h2>Operating point ({_esc(criterion)})</h2><p>{_esc(why)}</p>",
        "<h2>Dose-response</h2>", _img(figs["dose_response"], "dose-response"),
        "<h2>Behaviour vs side effects</h2>", _img(figs["tradeoff"], "trade-off"),
        "<h2>Per category</h2>", _img(figs["categories"], "per-category") or "<p class='note'>no categories</p>",
        "<h2>Per-layer quality of the direction</h2>", _img(figs["layers"], "per-layer quality"),
        "<h2>All configurations</h2>", _bounds_note(records), _results_table(records, chosen),
        "<h2>Example completions</h2>", _examples_table(base, columns),
    ]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>steerable sweep report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    index = out / "index.html"
    write_text_atomic(index, page)
    return index
