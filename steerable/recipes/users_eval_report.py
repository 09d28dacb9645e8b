"""What `steerable users eval` writes: report.json, accuracy.png (each condition with its interval),
sweep.png (accuracy against α, population and composed vectors in separate panels), breakdown.png
(accuracy by pairs per user) and a self-contained index.html (the PNGs inlined). Every file is written
atomically."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never open a window
import matplotlib.pyplot as plt

from steerable.fsutil import atomic_path, write_text_atomic

COLOURS = {"chance": "#7f7f7f", "unsteered": "#1f77b4", "population": "#ff7f0e", "personalised": "#2ca02c",
           "dislike_weighted": "#9467bd", "bt_model": "#8c564b"}
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1250px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12.5px; } td, th { border: 1px solid #ddd; padding: 4px 7px; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #666; } img { max-width: 100%; }
td.text { vertical-align: top; white-space: pre-wrap; max-width: 380px; font-size: 12px; }
"""


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    acc = report["accuracy"]
    names = list(acc)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    vals = [acc[n]["value"] for n in names]
    err = [[v - acc[n]["ci95"][0] for n, v in zip(names, vals, strict=True)],
           [acc[n]["ci95"][1] - v for n, v in zip(names, vals, strict=True)]]
    ax.bar(names, vals, yerr=err, capsize=4, color=[COLOURS.get(n, "#333") for n in names])
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    ax.set_ylabel("held-out choice accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['model']}: {report['pairs']} pairs, {report['users']} users (95 % CI over users)")
    ax.tick_params(axis="x", labelrotation=20)
    _save(fig, path)


def plot_sweep(report: dict[str, Any], path: Path) -> None:
    sw = report["sweep"]
    panels = [("population", ["population"]), ("composed", ["personalised", "dislike_weighted"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9), squeeze=False)
    for ax, (title, comps) in zip(axes[0], panels, strict=True):
        for comp in comps:
            pts = sw[comp]["points"]
            x = [p["strength"] for p in pts]
            ax.plot(x, [p["value"] for p in pts], marker="o", color=COLOURS[comp],
                    label=f"{comp} (peaks {', '.join(f'{v:g}' for v in sw[comp]['peaks'])}"
                          f"{'; bimodal' if sw[comp]['bimodal'] else ''})")
            ax.fill_between(x, [p["ci95"][0] for p in pts], [p["ci95"][1] for p in pts], color=COLOURS[comp],
                            alpha=0.15)
        ax.axhline(0.5, color="black", lw=0.8, ls=":")
        ax.set_xlabel("α")
        ax.set_ylabel("choice accuracy")
        ax.set_title(f"{title} vector ({report['sweep_on']})", fontsize=9)
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_breakdown(report: dict[str, Any], path: Path) -> None:
    by = report["by_pairs_per_user"]
    bins = list(by)
    comps = ["unsteered", "population", "personalised", "bt_model"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(comps)
    for j, c in enumerate(comps):
        xs = [i + (j - (len(comps) - 1) / 2) * width for i in range(len(bins))]
        ax.bar(xs, [by[b][c]["value"] for b in bins], width, color=COLOURS[c], label=c)
    ax.set_xticks(range(len(bins)), [f"{b}\n(n={by[b]['personalised']['n']})" for b in bins])
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    ax.set_xlabel("the user's training pairs in the library")
    ax.set_ylabel("choice accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    _save(fig, path)


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _acc(a: dict[str, Any] | None) -> str:
    if not a or a.get("value") is None:
        return ""
    return f"{a['value']:.1%} [{a['ci95'][0]:.1%}, {a['ci95'][1]:.1%}] (n={a['n']})"


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return ""
    return f'<p><img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"></p>'


def _table(groups: dict[str, Any], conds: list[str]) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in ["group", *conds])
    body = "".join(f"<tr><td>{_esc(g)}</td>" + "".join(f"<td class=num>{_acc(v.get(c))}</td>" for c in conds)
                   + "</tr>" for g, v in groups.items())
    return f"<table><tr>{head}</tr>{body}</table>"


def _diff(d: dict[str, Any]) -> str:
    return f"{d['value']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]"


def _points(points: list[dict[str, Any]]) -> str:
    return " ".join(f"{p['strength']:g}: {p['value']:.1%}" for p in points)


def _html(report: dict[str, Any], out: Path) -> str:
    conds = list(report["accuracy"])
    main = "".join(f"<tr><td>{_esc(c)}</td><td class=num>{_acc(report['accuracy'][c])}</td>"
                   f"<td class=num>{report['strengths'].get(c, '')}</td></tr>" for c in conds)
    diffs = "".join(f"<tr><td>{_esc(k)}</td><td class=num>{v['value']:+.1%} [{v['ci95'][0]:+.1%}, "
                    f"{v['ci95'][1]:+.1%}]</td></tr>" for k, v in report["differences"].items())
    sw = report.get("sweep")
    sweep = ""
    if sw:
        rows = "".join(f"<tr><td>{_esc(c)}</td><td>{_esc(', '.join(f'{p:g}' for p in s['peaks']))}</td>"
                       f"<td>{'yes' if s['bimodal'] else 'no'}</td><td class=num>{s['best']:g}</td>"
                       f"<td class=text>{_esc(_points(s['points']))}"
                       f"</td></tr>" for c, s in sw.items())
        sweep = (f"<h2>α sweep ({_esc(report['sweep_on'])}, {report['sweep_pairs']} pairs)</h2>"
                 "<table><tr><th>composition</th><th>peaks at α</th><th>bimodal</th><th>best α</th><th>points</th></tr>"
                 f"{rows}</table>" + _img(out / "sweep.png", "sweep"))
    gating = "".join(f"<tr><td>{_esc(g)}</td><td class=num>{_acc(v)}</td>"
                     f"<td class=num>{_diff(v['difference_vs_all'])}</td></tr>"
                     for g, v in report["gating"]["gates"].items())
    cap = report.get("capability")
    cap_html = ""
    if cap:
        base = cap["unsteered"]
        cap_rows = f"<tr><td>unsteered</td><td class=num>{base['rate']:.1%} (n={base['n']})</td><td></td></tr>"
        for c in ("population", "personalised"):
            ch = cap[c]["change"]
            cap_rows += (f"<tr><td>{c}</td><td class=num>{cap[c]['rate']:.1%}</td><td class=num>{ch['change']:+.1%} "
                         f"[{ch['ci95'][0]:+.1%}, {ch['ci95'][1]:+.1%}]</td></tr>")
        cap_html = (f"<h2>Capability ({_esc(cap['task'])}, {_esc(cap['format'])}, {cap['items']} items)</h2>"
                    f"<table><tr><th>condition</th><th>accuracy</th><th>paired change</th></tr>{cap_rows}</table>")
    gen = report.get("generation")
    gen_html = ""
    if gen:
        ppl = "".join(f"<tr><td>{_esc(c)}</td><td class=num>{v['median']}</td><td class=num>{v['n']}</td></tr>"
                      for c, v in gen["perplexity_unsteered_model"].items())
        closer = "".join(f"<li>{_esc(k)}: {_acc(gen.get(k))}</li>" for k in
                         ("personalised_closer_than_population", "personalised_closer_than_unsteered"))
        ex = "".join(f"<tr><td>{_esc(e['user'])}</td><td class=text>{_esc(e['prompt'])}</td>"
                     f"<td class=text>{_esc(e['population'])}</td><td class=text>{_esc(e['personalised'])}</td></tr>"
                     for e in gen.get("examples", []))
        gen_html = (f"<h2>Generation check ({gen['scored']}/{gen['prompts']} held-out prompts, "
                    f"{gen['max_new_tokens']} new tokens)</h2><ul>{closer}</ul>"
                    "<table><tr><th>replies</th><th>median perplexity (unsteered model)</th><th>n</th></tr>"
                    f"{ppl}</table><table><tr><th>user</th><th>prompt</th><th>population</th><th>personalised</th>"
                    f"</tr>{ex}</table>")
    fb = report["fallback"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>steerable users eval</title><style>{CSS}</style>
</head><body>
<h1>Per-user steering: {_esc(report['model'])}</h1>
<p class=note>Profiles {_esc(report['profiles'])}; {report['pairs']} held-out pairs of {report['users']} users;
layers {_esc(report['layers'])} at {_esc(report['site'])}. {fb['pairs']} pairs of {fb['users']} users not in the
library fell back to the population vector. {_esc(report['accuracy_rule'])}. Chance: {_esc(report['chance_rule'])}.</p>
<table><tr><th>condition</th><th>accuracy</th><th>α</th></tr>{main}</table>
{_img(out / 'accuracy.png', 'accuracy')}
<h2>Paired differences (same pairs, bootstrap over users)</h2><table>{diffs}</table>
<h2>By the user's pairs in the library</h2>{_table(report['by_pairs_per_user'], conds)}
{_img(out / 'breakdown.png', 'by pairs per user')}
<h2>Seen vs unseen users</h2>{_table(report['by_seen'], conds)}
<h2>By category</h2>{_table(report['by_category'], conds)}
{sweep}
<h2>Gating (personalised at α = {report['gating']['strength']:g})</h2>
<table><tr><th>gate</th><th>accuracy</th><th>change vs all tokens</th></tr>{gating}</table>
{cap_html}{gen_html}
</body></html>
"""


def write_report(out: str | Path, report: dict[str, Any]) -> Path:
    """report.json, the PNGs and index.html under `out` (created), each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    figures = [("accuracy.png", plot_accuracy), ("breakdown.png", plot_breakdown)]
    if report.get("sweep"):
        figures.append(("sweep.png", plot_sweep))
    for name, fn in figures:
        with atomic_path(out / name) as tmp:
            fn(report, tmp)
    write_text_atomic(out / "index.html", _html(report, out))
    return out
