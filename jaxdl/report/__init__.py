"""Host-side reporting: run directories, history files, progress display, plots and the
HTML report. Nothing here runs inside ``jit``.

- ``jaxdl.report.files``: atomic writes, JSON/CSV, history files, run directories,
  ``params_digest``;
- ``jaxdl.report.progress``: the per-epoch progress display and plain-text tables;
- ``jaxdl.report.plots``: PNG plots (``save_figure`` for a study's own figures); the only
  module that imports matplotlib, loaded on first use, so ``import jaxdl`` does not;
- ``jaxdl.report.html``: one self-contained HTML page comparing run directories.

The names of ``files``, ``progress`` and ``plots`` are also reachable from here
(``report.write_json``, ``report.plot_curves``).
"""

from __future__ import annotations

import importlib
from typing import Any

from jaxdl.report.files import (
    History,
    PathLike,
    atomic_write,
    history_rows,
    make_run_dir,
    params_digest,
    save_history,
    to_jsonable,
    write_csv,
    write_json,
    write_text,
)
from jaxdl.report.progress import Progress, format_table, interactive, sweep_callback, sweep_text

_PLOTS = (
    "save_figure",
    "plot_curves",
    "plot_layer_stats",
    "plot_sweep",
    "plot_ensemble",
    "plot_lineage",
)

__all__ = [
    "History",
    "PathLike",
    "Progress",
    "interactive",
    "sweep_callback",
    "sweep_text",
    "atomic_write",
    "format_table",
    "history_rows",
    "make_run_dir",
    "params_digest",
    "save_history",
    "to_jsonable",
    "write_csv",
    "write_json",
    "write_text",
    *_PLOTS,
]


def __getattr__(name: str) -> Any:
    # Plots import matplotlib (a second or more): only when a plot is asked for.
    if name in _PLOTS:
        return getattr(importlib.import_module("jaxdl.report.plots"), name)
    raise AttributeError(f"module 'jaxdl.report' has no attribute {name!r}")
