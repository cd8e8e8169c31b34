"""Batch normalisation: how sensitive training is to the init scale and learning rate.

A 5-hidden-layer sigmoid MLP, trained with plain SGD, with and without batch norm after
every hidden dense layer. For each, one vectorised sweep trains the whole grid of
(init scale × learning rate) at once: both are traced numbers, so each structure is
compiled once whatever the grid size. ``init_scale`` multiplies the Xavier kernels
(1 = Xavier). Members whose loss becomes NaN/Inf are frozen and marked diverged; they
count at chance accuracy.

Measured per member: final validation accuracy. Summaries per structure: the mean and
the worst accuracy over the grid, and how many members reach 50%.

Writes ``grid.png`` (two heat maps) and ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

import jaxdl
from jaxdl import report

DEPTH = 5


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run on a slice (CI)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/batch_norm"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = jaxdl.load("mnist")
    n_train, width, epochs = 10000, 128, 5
    scales, rates = [0.1, 0.3, 1.0, 3.0, 10.0], [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    valid = jaxdl.data.subset(splits.valid, 5000)
    if a.quick:
        n_train, width, epochs = 2000, 64, 3
        scales, rates = [0.1, 1.0, 10.0], [0.01, 0.1, 1.0]
        valid = jaxdl.data.subset(splits.valid, 1000)
    train = jaxdl.data.subset(splits.train, n_train)
    configs = jaxdl.sweep.grid(init_scale=scales, learning_rate=rates)
    grids, details = {}, {}
    for label, bn in (("without batch norm", False), ("with batch norm", True)):
        result = jaxdl.sweep.sweep(
            jaxdl.MLP(hidden=(width,) * DEPTH, activation="sigmoid", batch_norm=bn),
            jaxdl.make_optimizer("sgd"),
            train,
            configs,
            seeds=[a.seed],
            epochs=epochs,
            validation=valid,
        )
        acc = result.history["val_accuracy"][:, -1]
        diverged = np.array([r["diverged"] for r in result.rows])
        acc = np.where(diverged | ~np.isfinite(acc), 0.1, acc)  # chance for diverged members
        grid = acc.reshape(len(scales), len(rates))
        grids[label] = grid
        details[label] = {
            "mean_accuracy": float(grid.mean()),
            "worst_accuracy": float(grid.min()),
            "best_accuracy": float(grid.max()),
            "members_above_50_percent": int((grid > 0.5).sum()),
            "diverged": int(diverged.sum()),
            "compiles": result.compiles,
            "seconds": result.seconds,
            "val_accuracy": grid.tolist(),
        }
    summary = {
        "mean_accuracy": {k: d["mean_accuracy"] for k, d in details.items()},
        "members_above_50_percent": {k: d["members_above_50_percent"] for k, d in details.items()},
        "structures": details,
        "init_scales": scales,
        "learning_rates": rates,
        "members": len(configs),
        "depth": DEPTH,
        "width": width,
        "epochs": epochs,
        "train_examples": n_train,
        "val_examples": len(valid.x),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    _plot(grids, scales, rates, a.out / "grid.png")
    report.write_json(a.out / "results.json", summary)
    print(json.dumps(report.to_jsonable(summary)))
    return summary


def _plot(grids, scales, rates, path: Path) -> None:
    fig = Figure(figsize=(5.5 * len(grids), 4.4), layout="tight")
    axes = fig.subplots(1, len(grids))
    for ax, (label, grid) in zip(axes, grids.items(), strict=True):
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
        ax.set_yticks(range(len(scales)), [f"{s:g}" for s in scales])
        ax.set(title=f"Validation accuracy, {label}", xlabel="learning rate")
        ax.set(ylabel="init scale (× Xavier)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    report.save_figure(fig, path)


if __name__ == "__main__":
    main()
