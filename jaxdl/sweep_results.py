"""What a sweep returns: ``SweepResult`` and its result rows (one dict per member: its
settings, seed, best validation accuracy and epoch, test results, epochs run, diverged,
stopped)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from jaxdl import contract, processes, step, train
from jaxdl.member_programs import share


@dataclasses.dataclass
class SweepResult:
    """What a sweep returns (host side).

    ``rows``: one dict per member (its settings, seed, best validation accuracy and
    epoch, test accuracy, epochs run, diverged, stopped). ``history[metric]``: float64
    (members, epochs_run) arrays, NaN where a member was frozen. ``states``: the final
    ``TrainState`` of every member stacked on a leading axis (best parameters restored
    where early stopping asks for it). ``compiles``: programs traced by this call (0 when
    an earlier sweep of the same structure and shapes compiled it).
    """

    rows: list[dict[str, Any]]
    history: dict[str, np.ndarray]
    states: step.TrainState
    compiles: int
    seconds: float
    compile_seconds: float
    samples_per_second: float  # training examples per second summed over members
    chunks: int = 1  # how many groups of members ran one after another (memory)
    devices: int = 1  # how many devices the member axis was sharded over
    kernels: str = "off"  # whether the CPU kernels lowered the program ("on"/"off")
    search: str = "grid"  # how members were chosen to go on ("grid": all to the end)
    model_epochs: int = -1  # member-epochs trained (-1: not counted)
    # population-based training: each member's explored numbers and whom it copied
    lineage: dict[str, Any] | None = None

    def best(self, metric: str = "best_val_accuracy") -> dict[str, Any]:
        """The row of the member with the highest ``metric`` among those not diverged."""
        ok = [r for r in self.rows if not r["diverged"] and math.isfinite(r.get(metric, math.nan))]
        return max(ok or self.rows, key=lambda r: r.get(metric, -math.inf))


def _f32(x) -> float:
    """A float32 metric to the 6 significant digits float32 holds (0.9789, not
    0.9788999557495117: 9789/10000 summed in float32)."""
    return float(f"{float(x):.6g}")


def result_rows(
    members, hist, diverged, epochs_run, states, setup, test, hp, mesh=None
) -> list[dict[str, Any]]:
    """One row per member; test metrics from one vmapped evaluation of every member
    (the test set placed on every device of ``mesh``, where the members are)."""
    acc = hist.get("val_accuracy", hist["train_accuracy"])
    if test is not None:
        test = share(
            train.to_device(
                train.check_data(test, "test", contract.classes(setup.model, setup.feature_shape))
            ),
            mesh,
        )
        ev = jax.jit(
            jax.vmap(
                lambda p, b, r, m, n: step.evaluate_arrays(setup, p, b, r, test.x, test.y, m, n)
            )
        )
        rates = states.rates if hp.masks is None else share(hp.dropout, mesh)
        test_metrics = processes.to_host(
            ev(states.params, states.batch_stats, rates, share(hp.masks, mesh), states.numbers)
        )
    rows = []
    stop = states.stopping
    tracked, stopped = (
        (None, None) if stop is None else processes.to_host((stop.tracker.best_epoch, stop.stopped))
    )
    for i, (cfg, seed) in enumerate(members):
        a = np.where(np.isnan(acc[i]), -np.inf, acc[i])
        best = int(np.argmax(a)) if np.isfinite(a).any() else -1
        if tracked is not None:  # the epoch early stopping kept (and restored)
            best = int(tracked[i]) - 1
        row = {**cfg, "seed": seed}
        row["best_val_accuracy" if "val_accuracy" in hist else "best_train_accuracy"] = (
            _f32(acc[i, best]) if best >= 0 else math.nan
        )
        row["best_epoch"] = best + 1 if best >= 0 else 0
        if test is not None:
            row["test_accuracy"] = _f32(test_metrics["accuracy"][i])
            row["test_loss"] = _f32(test_metrics["loss"][i])
        row["epochs_run"] = int(epochs_run[i])
        row["diverged"] = bool(diverged[i])
        row["stopped"] = bool(stopped[i]) if stopped is not None else False
        rows.append(row)
    return rows
