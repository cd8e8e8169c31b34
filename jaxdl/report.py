"""Host-side reporting: run directories, history files, plots, progress display.

Nothing here runs inside ``jit``. Training returns its per-epoch metrics as arrays
(from ``lax.scan``); this module turns them into files a person or a script can read.

A *history* is ``dict[str, list[float]]``: one list per metric, one value per epoch,
e.g. ``train_loss``, ``val_accuracy``, ``learning_rate``, ``grad_norm/layer_0``.

Every file is written atomically (temp file in the same directory, then ``os.replace``),
so a crash or Ctrl-C never leaves a truncated ``history.json`` behind.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jaxdl.validate import InputError

PathLike = str | os.PathLike
History = Mapping[str, Sequence[float]]  # metric name -> one value per epoch


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file


def _atomic_write(path: PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` via a sibling temp file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target: os.replace is only atomic within one filesystem.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes it private (0600); results are not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_jsonable(obj: Any) -> Any:
    """Converts NumPy/JAX scalars and arrays (nested in dicts, lists, tuples) to Python.

    Non-finite floats (NaN, ±Inf) become ``None``: they are not valid JSON, and a
    diverged run must still produce a file that every JSON parser accepts.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: PathLike, obj: Any) -> Path:
    """Writes ``obj`` as indented JSON (see ``to_jsonable`` for the conversions)."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return _atomic_write(path, text.encode())


def write_text(path: PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) atomically."""
    return _atomic_write(path, text.encode())


def _scalar(value: Any) -> Any:
    """Unwraps 0-d NumPy/JAX values so CSV cells read ``0.5``, not ``Array(0.5)``."""
    is_array = isinstance(value, (jax.Array, np.ndarray, np.generic))
    return np.asarray(value).item() if is_array else value


def write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Writes ``rows`` as CSV; columns are the first row's keys, then new keys in order seen.

    A row that lacks a column gets an empty cell.
    """
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _scalar(v) for k, v in row.items()} for row in rows)
    return _atomic_write(path, buf.getvalue().encode())


def history_rows(history: History) -> list[dict[str, Any]]:
    """One dict per epoch: ``{"epoch": 1, "train_loss": ..., ...}``.

    Raises ``InputError`` (a ``ValueError``) if the metrics have different lengths,
    since rows would otherwise silently misalign epochs.
    """
    lengths = {k: len(v) for k, v in history.items()}
    if len(set(lengths.values())) > 1:
        raise InputError(
            f"history: metrics have different lengths {lengths}; expected one value per epoch each"
        )
    n = next(iter(lengths.values()), 0)
    return [{"epoch": i + 1, **{k: float(v[i]) for k, v in history.items()}} for i in range(n)]


def save_history(run_dir: PathLike, history: History) -> list[Path]:
    """Writes ``history.json`` (metric → list) and ``history.csv`` (one row per epoch)."""
    rows = history_rows(history)  # validates lengths before anything is written
    json_path = write_json(Path(run_dir, "history.json"), dict(history))
    return [json_path, write_csv(Path(run_dir, "history.csv"), rows)]


def _save_figure(fig: Figure, path: PathLike) -> Path:
    # Figure without pyplot: no global state, no GUI backend, safe in threads and headless.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return _atomic_write(path, buf.getvalue())


def _natural(key: str) -> list[Any]:
    """Sort key so ``layer_10`` comes after ``layer_2``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _epochs(values: Sequence[float]) -> np.ndarray:
    return np.arange(1, len(values) + 1)


def plot_curves(history: History, path: PathLike, *, best_epoch: int | None = None) -> list[Path]:
    """Plots loss and accuracy (train and val) against epoch into one PNG.

    Only panels whose metrics are present are drawn; returns ``[]`` if there are none.
    ``best_epoch`` (1-based) is marked with a dashed vertical line.
    """
    panels = [
        (title, [(k, history[k]) for k in (f"train_{metric}", f"val_{metric}") if k in history])
        for title, metric in (("Loss", "loss"), ("Accuracy", "accuracy"))
    ]
    panels = [(title, series) for title, series in panels if series]
    if not panels:
        return []
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="tight")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, values in series:
            ax.plot(_epochs(values), np.asarray(values, float), marker="o", ms=3, label=key)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="gray", linestyle="--", label=f"best epoch {best_epoch}")
        ax.set(title=f"{title} per epoch", xlabel="epoch", ylabel=title.lower())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 2.5" ticks
        ax.grid(True, alpha=0.3)
        ax.legend()
    return [_save_figure(fig, path)]


_LAYER_PANELS = (
    ("grad_norm", "Gradient norm per layer", "‖grad‖ (log)"),
    ("dead_fraction", "Dead unit fraction", "fraction"),
    ("saturated_fraction", "Saturated unit fraction", "fraction"),
    ("act_std", "Activation std per layer", "std"),
)


def plot_layer_stats(history: History, path: PathLike) -> list[Path]:
    """Plots per-layer statistics (``<stat>/<layer>`` keys), one line per layer, into one PNG.

    Panels: gradient norms (log y), dead fraction, saturated fraction, activation std;
    only those with keys present. Returns ``[]`` if the history has none of them.
    """
    panels = []
    for stat, title, ylabel in _LAYER_PANELS:
        keys = sorted((k for k in history if k.startswith(stat + "/")), key=_natural)
        if keys:
            panels.append((stat, title, ylabel, keys))
    if not panels:
        return []
    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.5 * ncols, 4.0 * nrows), layout="tight")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (stat, title, ylabel, keys) in zip(axes, panels, strict=False):
        for key in keys:
            values = np.asarray(history[key], dtype=float)
            if stat == "grad_norm":
                values = np.where(values > 0, values, np.nan)  # log axis: hide zeros, not clip them
            ax.plot(_epochs(values), values, label=key.split("/", 1)[1])
        if stat == "grad_norm":
            ax.set_yscale("log")
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", ncol=1 + len(keys) // 8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return [_save_figure(fig, path)]


def plot_sweep(
    rows: Sequence[Mapping[str, Any]],
    swept: Sequence[str],
    history: Mapping[str, np.ndarray],
    run_dir: PathLike,
    *,
    metric: str = "best_val_accuracy",
) -> list[Path]:
    """Writes ``sweep.png`` (``metric`` against each swept setting: mean over seeds with
    min-max bars, one line per combination of the other settings, log axis when the
    values span a decade or more) and ``curves.png`` (every member's learning curve)."""
    run_dir = Path(run_dir)
    paths = []
    if swept:
        fig = Figure(figsize=(5.2 * len(swept), 4.2), layout="tight")
        for ax, name in zip(fig.subplots(1, len(swept), squeeze=False)[0], swept, strict=True):
            others = [k for k in swept if k != name]
            groups: dict[tuple, dict[float, list[float]]] = {}
            for r in rows:
                key = tuple(r[k] for k in others)
                groups.setdefault(key, {}).setdefault(r[name], []).append(r.get(metric, math.nan))
            for key, by_x in groups.items():
                xs = sorted(by_x)
                ys = [np.asarray(by_x[x], float) for x in xs]
                mean = np.array([np.nanmean(y) if np.isfinite(y).any() else np.nan for y in ys])
                lo = mean - np.array([np.nanmin(y) if np.isfinite(y).any() else np.nan for y in ys])
                hi = np.array([np.nanmax(y) if np.isfinite(y).any() else np.nan for y in ys]) - mean
                label = ", ".join(f"{k}={v:g}" for k, v in zip(others, key, strict=True)) or None
                ax.errorbar(xs, mean, yerr=[lo, hi], marker="o", ms=4, capsize=3, label=label)
            values = [r[name] for r in rows]
            if min(values) > 0 and max(values) >= 10 * min(values):
                ax.set_xscale("log")
            ax.set(title=f"{metric} vs {name}", xlabel=name, ylabel=metric)
            ax.grid(True, alpha=0.3)
            if len(groups) > 1:
                ax.legend(fontsize=7)
        n_seeds = max(len(v) for g in groups.values() for v in g.values())
        fig.suptitle(f"mean over {n_seeds} seed(s); bars: min to max")
        paths.append(_save_figure(fig, run_dir / "sweep.png"))
    key = "val_accuracy" if "val_accuracy" in history else "train_accuracy"
    fig = Figure(figsize=(6.5, 4.2), layout="tight")
    ax = fig.subplots()
    for curve in np.asarray(history[key], float):
        ax.plot(np.arange(1, len(curve) + 1), curve, alpha=0.5, lw=1)
    ax.set(title=f"{key} per epoch, all {len(history[key])} members", xlabel="epoch", ylabel=key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    paths.append(_save_figure(fig, run_dir / "curves.png"))
    return paths


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def make_run_dir(root: PathLike, name: str | None = None, *, prefix: str = "train") -> Path:
    """Creates and returns ``root/name`` (parents included).

    With ``name=None`` the name is ``<prefix>-YYYYmmdd-HHMMSS``, suffixed ``-2``, ``-3``,
    ... if taken. An explicit ``name`` that exists and is not empty is refused: reusing it
    would mix two runs' files.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise InputError(f"runs root {str(root)!r} is a file; expected a directory")
    root.mkdir(parents=True, exist_ok=True)
    if name is not None:
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise InputError(f"--name: expected a plain directory name, got {name!r}")
        path = root / name
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise InputError(
                f"run directory {str(path)!r} already exists; pick another --name or delete it"
            )
        path.mkdir(exist_ok=True)
        return path
    base = f"{prefix}-{_timestamp()}"
    for i in itertools.count(1):
        path = root / (base if i == 1 else f"{base}-{i}")
        with contextlib.suppress(FileExistsError):
            path.mkdir()  # atomic: two processes starting together never share a dir
            return path


def params_digest(params: Any) -> str:
    """SHA-256 hex digest of a parameter pytree's names, dtypes, shapes and bytes.

    Leaves are sorted by path and serialised little-endian in C order, so the digest
    does not depend on dict insertion order or host byte order, and any single-bit
    change in any value changes it. Arrays must be fully addressable on this host.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    h = hashlib.sha256()
    for key, leaf in sorted(((jax.tree_util.keystr(p), x) for p, x in leaves), key=lambda t: t[0]):
        arr = np.asarray(leaf)
        arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
        # Length-prefix each field so different (name, bytes) splits cannot collide.
        fields = (key.encode(), str(arr.dtype).encode(), repr(arr.shape).encode(), arr.tobytes())
        for part in fields:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


_SHOWN = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def _metrics_text(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {float(metrics[k]):.4f}" for k in _SHOWN if k in metrics)


class Progress:
    """Per-epoch progress: a rich bar on a terminal, one plain line per epoch otherwise.

    Example::

        with Progress(20) as p:
            for epoch in range(1, 21):
                p.update(epoch, {"train_loss": 0.1, "val_accuracy": 0.97})
            p.finish(best_epoch=18)
    """

    def __init__(self, total: int, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = int(total)
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.epoch = 0
        self._start = time.perf_counter()
        self._bar = None
        isatty = getattr(self.stream, "isatty", None)
        if enabled and callable(isatty) and isatty():
            from rich import progress as rp
            from rich.console import Console

            columns = (
                rp.TextColumn("epoch {task.completed}/{task.total}"),
                rp.BarColumn(),
                rp.TimeElapsedColumn(),
                rp.TimeRemainingColumn(),
                rp.TextColumn("{task.fields[metrics]}", markup=False),  # the live metrics
            )
            console = Console(file=self.stream)
            self._bar = rp.Progress(*columns, console=console, transient=False)
            self._task = self._bar.add_task("train", total=self.total, metrics="")

    def __enter__(self) -> Progress:
        self._start = time.perf_counter()
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def elapsed(self) -> float:
        """Seconds since the display started."""
        return time.perf_counter() - self._start

    def update(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Reports that ``epoch`` (1-based) epochs are done, with their latest metrics."""
        self.epoch = int(epoch)
        if not self.enabled:
            return
        text = _metrics_text(metrics)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.epoch, metrics=text)
            return
        elapsed = self.elapsed()
        eta = elapsed / max(self.epoch, 1) * max(self.total - self.epoch, 0)
        parts = [f"epoch {self.epoch}/{self.total}", text, f"({elapsed:.1f}s, eta {eta:.1f}s)"]
        print("  ".join(p for p in parts if p), file=self.stream, flush=True)

    def finish(self, stopped_early: bool = False, best_epoch: int | None = None) -> None:
        """Prints a closing line: epochs run, wall time, early stop and best epoch."""
        if not self.enabled:
            return
        n = f"{self.epoch}/{self.total} epochs"
        how = f"stopped early after {n}" if stopped_early else f"done: {n}"
        best = "" if best_epoch is None else f"; best epoch {best_epoch}"
        if self._bar is not None:
            self._bar.stop()  # end the live display first so the line prints below the bar
        print(f"{how} in {self.elapsed():.1f}s{best}", file=self.stream, flush=True)


def _cell(value: Any) -> str:
    value = _scalar(value)
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4f}"
        return f"{value:.3e}"
    return "" if value is None else str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Aligned plain-text table; numbers right-aligned, text left-aligned, missing cells blank."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [
        all(isinstance(_scalar(row.get(c)), (int, float)) for row in rows if row.get(c) is not None)
        for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join(
        [line(list(columns)), line(["-" * w for w in widths]), *(line(r) for r in cells)]
    )


def plot_ensemble(
    result: Mapping[str, Any],
    run_dir: PathLike,
    *,
    explicit: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> list[Path]:
    """Plots of ``ensemble.analyse``'s result into ``run_dir``:

    - ``k_curve.png``: test error (%) and NLL of the Monte-Carlo ensemble of k subnetworks
      against k (mean over repeats, band min to max; arithmetic and geometric means),
      with weight scaling and, when enumerated, the exact ensemble as horizontal lines,
      and ``explicit`` ensembles ({name: member_stats}) against their number of members;
    - ``subnetworks.png``: the accuracy of single subnetworks, and the predictive entropy
      of the Monte-Carlo ensemble on test and out-of-distribution inputs.
    """
    run_dir = Path(run_dir)
    fig = Figure(figsize=(11, 4.4), layout="tight")
    panels = (("accuracy", "test error (%)", lambda a: 100 * (1 - a)), ("nll", "test NLL", None))
    for ax, (metric, label, f) in zip(fig.subplots(1, 2), panels, strict=True):
        f = f or (lambda v: v)
        for mean, color in (("arithmetic", "C0"), ("geometric", "C1")):
            curves = f(np.asarray(result[f"{mean}_{metric}"], float))
            ks = np.arange(1, curves.shape[1] + 1)
            ax.plot(ks, curves.mean(0), color=color, label=f"MC, {mean} mean")
            ax.fill_between(ks, curves.min(0), curves.max(0), color=color, alpha=0.2, lw=0)
        ax.axhline(f(result["weight_scaling"][metric]), color="k", ls="--", label="weight scaling")
        if "exact" in result:
            exact = f(result["exact"]["arithmetic"][metric])
            ax.axhline(exact, color="C2", ls=":", label=f"exact ({result['exact_units']} units)")
        for i, (name, stats) in enumerate((explicit or {}).items()):
            values = f(np.asarray(stats[metric], float))
            n = np.arange(1, len(values) + 1)
            ax.plot(n, values, marker="o", ms=3, color=f"C{i + 3}", label=f"{name} (members)")
        ax.set_xscale("log")
        ax.set(xlabel="k subnetworks (or members)", ylabel=label, title=f"{label} vs k")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
    n = len(np.asarray(result["arithmetic_accuracy"]))
    fig.suptitle(f"Dropout ensemble, {n} repeats; band: min to max")
    paths = [_save_figure(fig, run_dir / "k_curve.png")]
    fig = Figure(figsize=(11, 4.2), layout="tight")
    left, right = fig.subplots(1, 2)
    single = 100 * (1 - np.asarray(result["single_accuracy"], float))
    left.hist(single, bins=30, color="C0", alpha=0.8)
    left.axvline(100 * (1 - result["weight_scaling"]["accuracy"]), color="k", ls="--",
                 label="weight scaling")  # fmt: skip
    left.set(title="Single subnetworks", xlabel="test error (%)", ylabel="subnetworks")
    left.legend(fontsize=8)
    for name, values in result["entropy"].items():
        right.hist(np.asarray(values, float), bins=40, alpha=0.5, density=True, label=name)
    right.set(title="Predictive entropy of the MC ensemble", xlabel="entropy (nats)",
              ylabel="density")  # fmt: skip
    right.legend(fontsize=8)
    paths.append(_save_figure(fig, run_dir / "subnetworks.png"))
    return paths
