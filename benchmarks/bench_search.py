"""Successive halving against the full grid, side by side on MNIST.

81 configurations of a small MLP (784-64-10, ReLU, Adam, batch 100, 10,000 training
images by default; validation and test: the standard 10,000 each): 9 learning rates
(log-spaced 1e-4 … 1e-1) × 3 dropout rates (0, 0.2, 0.5, every masked layer) × 3 init
scales (0.5, 1, 2 × Xavier's), at most 27 epochs. The grid trains all 81 to epoch 27
(``jaxdl.sweep.run``); halving (``jaxdl.search.halving``, eta 3, 3 epochs in its first
rung) trains 81 for 3 epochs, the best 27 to 9 and the best 9 to 27.
Both are timed whole (compiles included), one after the other, in one process.

Reported: ``ratios.halving_vs_grid_wall`` (the grid's wall time ÷ halving's),
``member_epochs_fraction`` (halving's member-epochs ÷ the grid's) and ``accuracy_gap_pp``
(the test accuracy of the grid's best member by validation accuracy minus that of
halving's pick, in percentage points). Targets: ≥ 3×, ≤ 1/3 and ≤ 0.2.

Usage: ``python benchmarks/bench_search.py [--json] [--train-size N] [--epochs 27]``.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import numpy as np  # noqa: E402
from common import device_name, emit, parse_args  # noqa: E402

import jaxdl  # noqa: E402
from jaxdl import search, sweep  # noqa: E402


def _extra(p) -> None:
    p.add_argument("--train-size", type=int, default=10000, help="training images used")
    p.add_argument("--epochs", type=int, default=27, help="the last rung's (and the grid's)")
    p.add_argument("--eta", type=int, default=3, help="halving's 1/eta go on")
    p.add_argument("--min-epochs", type=int, default=3, help="halving's first rung")


def _pick(result) -> dict:
    """The member a search reports: the best validation accuracy among those that
    trained to the end (a grid: all; halving: its last rung)."""
    last = max(r.get("rung", 0) for r in result.rows)
    return max((r for r in result.rows if r.get("rung", 0) == last and not r["diverged"]),
               key=lambda r: r["best_val_accuracy"])  # fmt: skip


def main(argv=None) -> dict:
    a = parse_args(__doc__, argv, rounds=1, unit="search", extra=_extra)
    splits = jaxdl.load("mnist")
    train = jaxdl.data.subset(splits.train, a.train_size)
    config = jaxdl.RunConfig.of(jaxdl.MLP((64,)), jaxdl.make_optimizer("adam"), epochs=a.epochs,
                                batch_size=100)  # fmt: skip
    configs = sweep.grid(
        learning_rate=np.logspace(-4, -1, 9).tolist(),
        dropout=[0.0, 0.2, 0.5],
        init_scale=[0.5, 1.0, 2.0],
    )
    common = dict(validation=splits.valid, test=splits.test, verbose=False)
    t0 = time.perf_counter()
    grid = sweep.run(config, train, configs, **common)
    grid_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    halving = search.halving(config, train, configs, eta=a.eta, min_epochs=a.min_epochs, **common)
    halving_s = time.perf_counter() - t0
    grid_epochs = sum(r["epochs_run"] for r in grid.rows)
    best, pick = _pick(grid), _pick(halving)
    n = len(configs)
    rows = {"grid": n * len(train.x) * a.epochs / grid_s,  # configuration-samples/s to R
            "halving": n * len(train.x) * a.epochs / halving_s}  # fmt: skip
    ratios = {"halving_vs_grid_wall": grid_s / halving_s}
    extra = {
        "device": device_name(),
        "configurations": n,
        "epochs": a.epochs,
        "eta": a.eta,
        "min_epochs": a.min_epochs,
        "train_examples": len(train.x),
        "grid_seconds": grid_s,
        "halving_seconds": halving_s,
        "grid_member_epochs": grid_epochs,
        "halving_member_epochs": halving.model_epochs,
        "member_epochs_fraction": halving.model_epochs / grid_epochs,
        "grid_compiles": grid.compiles,
        "halving_compiles": halving.compiles,
        "grid_best": {k: best[k] for k in ("learning_rate", "dropout", "init_scale",
                                           "best_val_accuracy", "test_accuracy")},
        "halving_pick": {k: pick[k] for k in ("learning_rate", "dropout", "init_scale",
                                              "best_val_accuracy", "test_accuracy")},
        "accuracy_gap_pp": 100 * (best["test_accuracy"] - pick["test_accuracy"]),
    }  # fmt: skip
    emit("successive halving vs the full grid (81 configurations, MNIST)", rows, ratios, extra,
         a.json)  # fmt: skip
    return {"rows": rows, "ratios": ratios, **extra}


if __name__ == "__main__":
    main(sys.argv[1:])
