"""Plots of a run, a sweep and a dropout ensemble, written as PNG files.

Figures are made without pyplot (no global state, no GUI backend: safe in threads and
headless), and this is the only module of the library that imports matplotlib, so
``import jaxdl`` does not.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jaxdl.report.files import History, PathLike, atomic_write
from jaxdl.report.progress import number_text


def save_figure(fig: Figure, path: PathLike, *, dpi: int = 120) -> Path:
    """Writes ``fig`` (a ``matplotlib.figure.Figure``, made without pyplot) to ``path``
    as a PNG, atomically; returns the path.

    Example::

        fig = Figure(figsize=(5, 4), layout="tight")
        fig.subplots().plot([1, 2, 3])
        save_figure(fig, "runs/study/curve.png")
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write(path, buf.getvalue())


def natural_key(key: str) -> list[Any]:
    """Sort key so ``layer_10`` comes after ``layer_2``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _epochs(values: Sequence[float]) -> np.ndarray:
    return np.arange(1, len(values) + 1)


def plot_curves(
    history: History, path: PathLike, *, best_epoch: int | None = None, title: str | None = None
) -> list[Path]:
    """Plots loss and accuracy (train and val) and the learning rate against epoch into
    one PNG.

    Only panels whose metrics are present are drawn; returns ``[]`` if there are none.
    The loss axis is logarithmic when the loss spans a decade or more. ``best_epoch``
    (1-based) is marked with a dashed vertical line; ``title`` (the run's name and key
    settings) heads the figure.
    """
    panels = [
        (name, [(k, history[k]) for k in (f"train_{metric}", f"val_{metric}") if k in history])
        for name, metric in (("Loss", "loss"), ("Accuracy", "accuracy"))
    ]
    panels = [(name, series) for name, series in panels if series]
    if not panels:
        return []
    if "learning_rate" in history:
        panels.append(("Learning rate", [("learning_rate", history["learning_rate"])]))
    fig = Figure(figsize=(5.0 * len(panels), 4.2), layout="tight")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, series) in zip(axes, panels, strict=True):
        for key, values in series:
            ax.plot(_epochs(values), np.asarray(values, float), marker="o", ms=3, label=key)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="gray", linestyle="--", label=f"best epoch {best_epoch}")
        if name == "Loss" and _spans_a_decade(
            np.concatenate([np.asarray(v, float) for _, v in series])
        ):
            ax.set_yscale("log")
        ax.set(title=f"{name} per epoch", xlabel="epoch", ylabel=name.lower())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 2.5" ticks
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title, fontsize=10)
    return [save_figure(fig, path)]


def _spans_a_decade(values: np.ndarray) -> bool:
    v = values[np.isfinite(values) & (values > 0)]
    return v.size > 1 and v.max() >= 10 * v.min()


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
        keys = sorted((k for k in history if k.startswith(stat + "/")), key=natural_key)
        if keys:
            panels.append((stat, title, ylabel, keys))
    if not panels:
        return []
    ncols = len(panels) if len(panels) <= 3 else 2  # three panels in a row: none left empty
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
    return [save_figure(fig, path)]


def _value_axis(ax, values: Sequence[float]) -> None:
    """A swept setting's x axis: logarithmic when its values span a decade or more, and
    with few values, ticks at the values themselves (not overlapping ones between)."""
    if min(values) > 0 and max(values) >= 10 * min(values):
        ax.set_xscale("log")
    distinct = sorted(set(values))
    if len(distinct) <= 8:
        ax.set_xticks(distinct, [number_text(v, short=True) for v in distinct])
        ax.minorticks_off()


def _fit(title: str, fig: Figure) -> str:
    """``title`` in lines that fit ``fig``'s width at font size 10 (about 11 characters
    an inch), so a one-panel figure does not cut it."""
    return textwrap.fill(title, width=max(20, int(11 * fig.get_figwidth())))


def plot_sweep(
    rows: Sequence[Mapping[str, Any]],
    swept: Sequence[str],
    history: Mapping[str, np.ndarray],
    run_dir: PathLike,
    *,
    metric: str = "best_val_accuracy",
    title: str = "",
) -> list[Path]:
    """Writes ``sweep.png`` (``metric`` against each swept setting: mean over seeds with
    min-max bars, one line per combination of the other settings, log axis when the
    values span a decade or more) and ``curves.png`` (every member's learning curve,
    with a legend). ``title`` (the run's name and settings) heads both."""
    head = f"{title}: " if title else ""
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
            _value_axis(ax, [r[name] for r in rows])
            ax.set(title=f"{metric} vs {name}", xlabel=name, ylabel=metric)
            ax.grid(True, alpha=0.3)
            if len(groups) > 1:
                ax.legend(fontsize=7)
        n_seeds = max(len(v) for g in groups.values() for v in g.values())
        said = f"{head}mean over {n_seeds} seeds; bars: min to max" if n_seeds > 1 else title
        fig.suptitle(_fit(said, fig), fontsize=10)
        paths.append(save_figure(fig, run_dir / "sweep.png"))
    key = "val_accuracy" if "val_accuracy" in history else "train_accuracy"
    fig = Figure(figsize=(6.5, 4.2), layout="tight")
    ax = fig.subplots()
    curves = np.asarray(history[key], float)
    # A legend says which member is which: each member's own settings when there are few,
    # else a colour per value of the first swept setting.
    by = swept[0] if swept and len(curves) > 12 else None
    values = sorted({r[by] for r in rows}) if by else []
    for i, curve in enumerate(curves):
        r = rows[i] if i < len(rows) else {}
        if by and len(values) <= 10:
            j = values.index(r[by])
            label = (
                f"{by}={number_text(r[by], short=True)}"
                if i == next(k for k, q in enumerate(rows) if q[by] == r[by])
                else None
            )
            ax.plot(
                np.arange(1, len(curve) + 1), curve, alpha=0.5, lw=1, color=f"C{j}", label=label
            )
        else:
            label = (
                ", ".join(
                    f"{k}={number_text(r[k], short=True)}" for k in [*swept, "seed"] if k in r
                )
                or None
            )
            # past the 10 cycle colours, one colour map (members are in setting order)
            color = colormaps["viridis"](i / (len(curves) - 1)) if len(curves) > 10 else None
            ax.plot(np.arange(1, len(curve) + 1), curve, alpha=0.6, lw=1, color=color,
                    label=label if len(curves) <= 12 else None)  # fmt: skip
    ax.set(title=f"{key} per epoch, all {len(curves)} members", xlabel="epoch", ylabel=key)
    for line in ax.get_lines():  # a member stopped after an epoch or two: marked, not lost
        if np.isfinite(line.get_ydata()).sum() <= 2:
            line.set(marker="o", ms=3)
    handles, _ = ax.get_legend_handles_labels()
    if len(handles) > 6:  # beside the curves, not over them
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    elif handles:
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(_fit(title, fig), fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    paths.append(save_figure(fig, run_dir / "curves.png"))
    return paths


def plot_ensemble(
    result: Mapping[str, Any],
    run_dir: PathLike,
    *,
    explicit: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    title: str = "",
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
    head = f"{title}: " if title else ""
    fig.suptitle(f"{head}dropout ensemble, {n} repeats; band: min to max", fontsize=10)
    paths = [save_figure(fig, run_dir / "k_curve.png")]
    fig = Figure(figsize=(11, 4.2), layout="tight")
    left, right = fig.subplots(1, 2)
    single = 100 * (1 - np.asarray(result["single_accuracy"], float))
    left.hist(single, bins=30, color="C0", alpha=0.8)
    left.axvline(100 * (1 - result["weight_scaling"]["accuracy"]), color="k", ls="--",
                 label="weight scaling")  # fmt: skip
    left.set(title="Single subnetworks", xlabel="test error (%)", ylabel="subnetworks")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.5 ticks
    left.legend(fontsize=8)
    for name, values in result["entropy"].items():
        right.hist(np.asarray(values, float), bins=40, alpha=0.5, density=True, label=name)
    right.set(title="Predictive entropy of the MC ensemble", xlabel="entropy (nats)",
              ylabel="density")  # fmt: skip
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    paths.append(save_figure(fig, run_dir / "subnetworks.png"))
    return paths


def plot_lineage(lineage: Mapping[str, Any], path: PathLike, *, title: str = "") -> list[Path]:
    """Population-based training's lineage (``jaxdl.pbt``): one panel per explored
    number, each member's value against epoch (log axis), a dot where it copied another
    member at a ready epoch."""
    names = [k for k in lineage if k not in ("epochs", "source")]
    if not names:
        return []
    fig = Figure(figsize=(5.6 * len(names), 4.2), layout="tight")
    source = np.asarray(lineage["source"])
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names, strict=True):
        values = np.asarray(lineage[name], np.float64)  # (members, epochs)
        epochs = _epochs(values[0])
        for m, row in enumerate(values):
            line = ax.plot(epochs, row, lw=1.2, alpha=0.8)[0]
            for j, e in enumerate(lineage["epochs"]):
                if source.size and source[m, j] != m and e < len(row):
                    ax.plot(e + 1, row[e], "o", ms=4, color=line.get_color())
        if np.all(values[np.isfinite(values)] > 0):
            ax.set_yscale("log")
        ax.set(xlabel="epoch", ylabel=name, title=f"{name} per member (dot: copied a member)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return [save_figure(fig, path)]
