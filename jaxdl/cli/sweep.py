"""``jaxdl sweep``: many members in one program, their results table and plots."""

from __future__ import annotations

import argparse
import contextlib
import sys

import numpy as np

from jaxdl import (
    checkpoint,
    devices,
    report,
    sweep,
    tracking,
    validate,
)
from jaxdl.cli.build import load_data, run_config, saved_config
from jaxdl.cli.resume import _check_checkpoint_flags, _checkpointer, _faults
from jaxdl.config import OPTIMIZER_FLAGS
from jaxdl.validate import InputError

# Sweepable flags (dest) and the setting each sets.
_SWEEPABLE = {"lr": "learning_rate", **{k: k for k in OPTIMIZER_FLAGS},
              **{k: k for k in ("l1", "l2", "input_noise", "init_scale", "dropout_input", "dropout_hidden")}}  # fmt: skip


_ROW_RESULTS = ("best_val_accuracy", "best_epoch", "test_accuracy", "test_loss", "epochs_run",
                "diverged", "stopped")  # fmt: skip


def cmd_sweep(a: argparse.Namespace) -> dict:
    validate.positive_int("--seeds", a.seeds)
    lists = {d: getattr(a, d) for d in _SWEEPABLE if isinstance(getattr(a, d), list)}
    first = argparse.Namespace(**{**vars(a), **{d: v[0] for d, v in lists.items()}})
    config, splits, tr = load_data(first, run_config(first))
    axes = {_SWEEPABLE[d]: v for d, v in lists.items()}
    drop_in = axes.pop("dropout_input", [config.regularisation.dropout_input])
    drop_hid = axes.pop("dropout_hidden", [config.regularisation.dropout])
    configs = sweep.grid(**axes, dropout_input=drop_in, dropout=drop_hid)
    options = dict(seeds=a.seeds, validation=splits.valid)
    setup, hp, _, members = sweep.prepare_sweep(config, tr, configs, **options)  # check all
    _check_checkpoint_flags(a)
    if a.resume is None:
        run_dir = report.make_run_dir(a.runs_dir, a.name, prefix="sweep")
        space = {d: getattr(a, d) for d in _SWEEPABLE}
        report.write_json(run_dir / "config.json",
                          saved_config(a, config, space=space, run_dir=str(run_dir)))  # fmt: skip
    else:
        run_dir = a.resume
    desc = checkpoint.describe(setup, hp, tr.x, tr.y, members=members)
    ckpt = _checkpointer(config.checkpointing, run_dir, desc)
    n = len(configs) * a.seeds
    with report.Progress(a.epochs, enabled=not a.no_progress, stream=sys.stderr) as prog:
        with _faults(ckpt, run_dir):
            res = sweep.run(
                config, tr, configs, test=splits.test, checkpointer=ckpt,
                on_epoch=lambda e, m: prog.update(e, _median(m)), data_order=a.data_order,
                **options,
            )  # fmt: skip
        prog.finish()
    rows = []
    for row in res.rows:  # the dropout rates under their flags' names, where swept
        given = {"dropout_input": row.pop("dropout_input"), "dropout_hidden": row.pop("dropout")}
        rows.append({**{k: v for k, v in given.items() if k in lists}, **row})
    swept = [k for k in rows[0] if k in lists or k in axes]
    swept = [k for k in swept if len({r[k] for r in rows}) > 1]  # axes that vary
    report.write_csv(run_dir / "results.csv", rows)
    report.write_json(run_dir / "results.json", rows)
    report.write_json(run_dir / "history.json", {k: v.tolist() for k, v in res.history.items()})
    if not a.no_plots:
        report.plot_sweep(rows, swept, res.history, run_dir)
    if a.tensorboard:
        result_keys = [k for k in rows[0] if k in _ROW_RESULTS or k.startswith("best_")]
        tracking.write_sweep(
            run_dir, rows, res.history, params=res.states.params, results=result_keys,
            settings=[k for k in rows[0] if k not in result_keys],
        )  # fmt: skip
    best = max(
        (r for r in rows if not r["diverged"]),
        key=lambda r: r["best_val_accuracy"],
        default=rows[0],
    )
    summary = {
        "members": n,
        "compiles": res.compiles,
        "best": best,
        "results_path": str(run_dir / "results.csv"),
        "model_samples_per_second": res.samples_per_second,
        "devices": res.devices,
        "compile_seconds": res.compile_seconds,
        "train_seconds": res.seconds,
        "diverged": sum(r["diverged"] for r in rows),
        "run_dir": str(run_dir),
        "kernels": res.kernels,
    }
    report.write_json(run_dir / "summary.json", summary)
    return summary


def _use_cpu_devices(n: str | int) -> None:
    """Before JAX starts: the host's cores as devices, so the members run side by side.
    ``auto`` keeps what a caller that already started JAX (in-process use) has."""
    if n != "auto":
        try:
            devices.use_cpu_cores(n)
        except InputError as e:
            raise InputError(f"--cpu-devices: {e}") from None
        return
    with contextlib.suppress(InputError):
        devices.use_cpu_cores()


def _median(metrics: dict) -> dict[str, float]:
    """Per-epoch progress for a sweep: the median over the members still training."""
    return {
        k: float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")
        for k, v in metrics.items()
    }
