"""``jaxdl report``: one self-contained HTML page about one or more runs.

The page needs nothing but a browser, offline: plots are embedded PNGs (``data:`` URLs),
styles and the small script are inline. It holds an overview table of the runs, the
settings that differ between them, and per run its results, every plot in its directory
(drawn from ``history.json`` when the run was made with ``--no-plots``), its settings,
a sweep's member table and an ensemble's accuracy against k. Every table sorts by a click
on a column header. Once loaded, the page checks that every plot decoded, marks any that
did not, and records the counts in ``<html data-plots=... data-plots-loaded=...>``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from jaxdl import runs
from jaxdl.report import files, plots

CAPTIONS = {
    "curves.png": "Loss and accuracy per epoch",
    "layers.png": "Per-layer gradient norms and activation statistics",
    "sweep.png": "Best validation accuracy against each swept setting",
    "k_curve.png": "Ensemble accuracy against k, the number of sampled subnetworks",
}
SWEEP_CAPTIONS = {"curves.png": "Validation accuracy per epoch, every member"}


def caption(kind: str, filename: str) -> str:
    """The caption of a run's plot file (its name, for a file not known here)."""
    known = {**CAPTIONS, **SWEEP_CAPTIONS} if kind == "sweep" else CAPTIONS
    return known.get(filename, Path(filename).stem.replace("_", " "))


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def k_curve_png(summary: Mapping[str, Any]) -> bytes | None:
    """Draws an ensemble's Monte Carlo accuracy against k, with the other methods as lines."""
    mc = summary.get("mc_accuracy") or {}
    points = sorted((int(k), float(v)) for k, v in mc.items() if v is not None)
    if not points:
        return None
    fig = Figure(figsize=(6.5, 4.2), layout="tight")
    ax = fig.subplots()
    ax.plot(*zip(*points, strict=True), marker="o", label="Monte Carlo, k subnetworks")
    for key, label, style in (("weight_scaling_accuracy", "weight scaling", "--"),
                              ("geometric_accuracy", "geometric mean", ":"),
                              ("exact_accuracy", "exact (all subnetworks)", "-.")):  # fmt: skip
        if isinstance(summary.get(key), (int, float)):
            ax.axhline(summary[key], linestyle=style, color="gray", label=label)
    ax.set(xscale="log", xlabel="k", ylabel="test accuracy", title="Ensemble accuracy against k")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _png(fig)


def _swept(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    results = {"best_val_accuracy", "best_train_accuracy", "best_epoch", "test_accuracy",
               "test_loss", "epochs_run", "diverged", "stopped", "seed"}  # fmt: skip
    keys = [k for k in rows[0] if k not in results and isinstance(rows[0][k], (int, float))]
    return [k for k in keys if len({r.get(k) for r in rows}) > 1]


def figures(run: runs.Run) -> list[tuple[str, bytes]]:
    """(caption, PNG bytes) for every plot of ``run``: the PNGs in its directory (known ones
    first), else drawn from its history (train, sweep) or summary (ensemble)."""
    pngs = sorted(run.path.glob("*.png"), key=lambda p: (p.name not in CAPTIONS, p.name))
    out = [(caption(run.kind, p.name), p.read_bytes()) for p in pngs]
    names = {p.name for p in pngs}
    history_path = run.path / "history.json"
    with tempfile.TemporaryDirectory() as tmp:
        drawn: list[Path] = []
        if run.kind == "train" and "curves.png" not in names and history_path.exists():
            history = json.loads(history_path.read_text())
            history = {k: [math.nan if v is None else v for v in vs] for k, vs in history.items()}
            best = run.results.get("best_epoch")
            drawn += plots.plot_curves(history, Path(tmp, "curves.png"), best_epoch=best)
            drawn += plots.plot_layer_stats(history, Path(tmp, "layers.png"))
        elif run.kind == "sweep" and not names and history_path.exists() and run.rows:
            history = {
                k: np.array(v, dtype=float) for k, v in json.loads(history_path.read_text()).items()
            }
            drawn += plots.plot_sweep(run.rows, _swept(run.rows), history, tmp)
        out += [(caption(run.kind, p.name), p.read_bytes()) for p in drawn]
    if run.kind == "ensemble" and "k_curve.png" not in names:
        png = k_curve_png(run.results)
        if png is not None:
            out.append((CAPTIONS["k_curve.png"], png))
    return out


def _cell(value: Any) -> str:
    """A table cell; numbers carry their exact value in ``data-value`` for sorting."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        text = "" if value is None else str(value)
        return f"<td>{html.escape(text)}</td>"
    if isinstance(value, (int, float)):
        shown = str(value)
        if isinstance(value, float):  # 0.9854, 56.15; rates as 17,809, not 1.781e+04
            big = math.isfinite(value) and 1e4 <= abs(value) < 1e15
            shown = f"{value:,.0f}" if big else f"{value:.4g}"
        return f'<td class="num" data-value="{value!r}">{html.escape(shown)}</td>'
    return f"<td>{html.escape(json.dumps(value))}</td>"


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, cls: str = "") -> str:
    """A sortable HTML table (click a header to sort by it; again to reverse)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return (f'<table class="sortable {cls}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")  # fmt: skip


def _pairs(mapping: Mapping[str, Any], name: str) -> str:
    return table([{name: k, "value": v} for k, v in mapping.items()], [name, "value"])


_METHODS = {"weight_scaling_accuracy": "weight scaling", "geometric_accuracy": "geometric mean",
            "exact_accuracy": "exact (all subnetworks)"}  # fmt: skip


def _ensemble(res: Mapping[str, Any]) -> str:
    rows = [{"method": label, "accuracy": res[key]}
            for key, label in _METHODS.items() if res.get(key) is not None]  # fmt: skip
    mc = res.get("mc_accuracy") or {}
    rows += [{"method": f"Monte Carlo, k={k}", "accuracy": v} for k, v in mc.items()]
    return "<h3>Ensemble accuracy</h3>" + table(rows, ["method", "accuracy"]) if rows else ""


def _section(run: runs.Run, index: int) -> str:
    parts = [f'<section id="run-{index}"><h2>{html.escape(run.name)} '
             f'<small>{html.escape(run.kind)} · {html.escape(str(run.path))}</small></h2>']  # fmt: skip
    if not run.finished:
        parts.append('<p class="warn">This run has no results yet (unfinished or failed).</p>')
    results = {k: v for k, v in runs.flat_results(run).items() if not isinstance(v, (dict, list))}
    if run.kind == "ensemble":
        parts.append(_ensemble(run.results))
        shown = ("mc_accuracy.", *_METHODS)
        results = {k: v for k, v in results.items() if not k.startswith(shown)}
        if results:
            parts.append("<h3>Other results</h3>" + _pairs(results, "result"))
    elif results:
        parts.append("<h3>Results</h3>" + _pairs(results, "result"))
    for caption, png in figures(run):
        data = base64.b64encode(png).decode()
        parts.append(f'<figure><img alt="{html.escape(caption)}" '
                     f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}'
                     "</figcaption></figure>")  # fmt: skip
    if run.rows:
        columns = list(dict.fromkeys(k for r in run.rows for k in r))
        rows = [{"member": i, **r} for i, r in enumerate(run.rows)]
        parts.append(f"<h3>Sweep members ({len(rows)})</h3>"
                     + table(rows, ["member", *columns], cls="members"))  # fmt: skip
    parts.append("<details><summary>All settings</summary>"
                 + _pairs(runs.settings(run), "setting") + "</details></section>")  # fmt: skip
    return "".join(parts)


_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}
h2 small{font-weight:normal;color:#666;font-size:60%} .meta{color:#666}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left} td.num{text-align:right}
th{background:#f3f3f3;cursor:pointer;user-select:none} th[aria-sort=ascending]::after{content:" ▲"}
th[aria-sort=descending]::after{content:" ▼"} tbody tr:nth-child(even){background:#fafafa}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd} figcaption{color:#555;font-size:12px}
.members{display:block;max-height:30em;overflow:auto} .warn{color:#b00;font-weight:bold}
"""

_SCRIPT = """
function sortBy(th){
  const table=th.closest("table"), body=table.tBodies[0];
  const col=[...th.parentNode.children].indexOf(th);
  const asc=th.getAttribute("aria-sort")!=="ascending";
  const key=r=>{const c=r.children[col];const v=c.dataset.value;
    return v!==undefined&&v!==""&&!isNaN(+v)?+v:c.textContent;};
  const rows=[...body.rows].sort((a,b)=>{const x=key(a),y=key(b);
    const c=typeof x==="number"&&typeof y==="number"?x-y:String(x).localeCompare(String(y));
    return asc?c:-c;});
  rows.forEach(r=>body.appendChild(r));
  th.parentNode.querySelectorAll("th").forEach(h=>h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort",asc?"ascending":"descending");
}
document.querySelectorAll("table.sortable th").forEach(th=>th.addEventListener("click",()=>sortBy(th)));
window.addEventListener("load",()=>{
  const imgs=[...document.images];
  const bad=imgs.filter(i=>!(i.complete&&i.naturalWidth>0));
  bad.forEach(i=>i.insertAdjacentHTML("afterend",'<p class="warn">This plot failed to load.</p>'));
  document.documentElement.dataset.plots=imgs.length;
  document.documentElement.dataset.plotsLoaded=imgs.length-bad.length;
});
"""


def render(run_list: Sequence[runs.Run], *, title: str = "jaxdl report") -> str:
    """The whole page as one string."""
    overview = [{**runs.summary_row(r), "run": r.name} for r in run_list]
    columns = [c for c in runs.COLUMNS if any(o.get(c) not in (None, "") for o in overview)]
    links = "".join(f'<li><a href="#run-{i}">{html.escape(r.name)}</a></li>'
                    for i, r in enumerate(run_list))  # fmt: skip
    parts = [f"<h1>{html.escape(title)}</h1><p class='meta'>{len(run_list)} run(s), "
             f"generated {time.strftime('%Y-%m-%d %H:%M')}</p><ul>{links}</ul>",
             "<h2>Overview</h2>" + table(overview, columns)]  # fmt: skip
    if len(run_list) > 1:
        diff = runs.differences(run_list, skip_missing=True)["settings"]
        names = [r.name for r in run_list]
        if len(set(names)) < len(names):
            names = [str(r.path) for r in run_list]
        rows = [{"setting": k, **dict(zip(names, v, strict=True))} for k, v in diff.items()]
        parts.append("<h2>Settings that differ</h2>"
                     + (table(rows, ["setting", *names]) if rows else "<p>None.</p>"))  # fmt: skip
    parts += [_section(r, i) for i, r in enumerate(run_list)]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            + "".join(parts) + f"<script>{_SCRIPT}</script></body></html>\n")  # fmt: skip


def write(paths: Sequence[str | Path], out: str | Path, *, title: str = "jaxdl report") -> dict:
    """Writes the report for ``paths`` (run directories, or directories of runs) to ``out``."""
    run_list = runs.expand(paths)
    page = render(run_list, title=title)
    files.write_text(out, page)
    return {"report": str(out), "runs": len(run_list), "plots": page.count("<img ")}
