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
from jaxdl import config as run_config
from jaxdl.cli.build import _common, _dropout
from jaxdl.cli.flags import _OPT_FLAGS
from jaxdl.cli.resume import _check_checkpoint_flags, _checkpointer, _faults
from jaxdl.validate import InputError

# Sweepable flags (dest) and the setting each sets.
_SWEEPABLE = {"lr": "learning_rate", **{k: k for k in _OPT_FLAGS},
              **{k: k for k in ("l1", "l2", "input_noise", "init_scale", "dropout_input", "dropout_hidden")}}  # fmt: skip


_ROW_RESULTS = ("best_val_accuracy", "best_epoch", "test_accuracy", "test_loss", "epochs_run",
                "diverged", "stopped")  # fmt: skip


def cmd_sweep(a: argparse.Namespace) -> dict:
    validate.positive_int("--seeds", a.seeds)
    lists = {d: getattr(a, d) for d in _SWEEPABLE if isinstance(getattr(a, d), list)}
    first = argparse.Namespace(**{**vars(a), **{d: v[0] for d, v in lists.items()}})
    model, optimizer, es, splits, tr = _common(first)
    axes = {_SWEEPABLE[d]: v for d, v in lists.items()}
    drop_in = axes.pop("dropout_input", [a.dropout_input])
    drop_hid = axes.pop("dropout_hidden", [a.dropout_hidden])
    configs = []
    for cfg in sweep.grid(**axes, dropout_input=drop_in, dropout_hidden=drop_hid):
        d_in, d_hid = cfg.pop("dropout_input"), cfg.pop("dropout_hidden")
        cfg["dropout"] = _dropout(model, tr.x.shape[1:], d_in, d_hid)
        configs.append((cfg, d_in, d_hid))
    base = {k: getattr(a, k) for k in ("l1", "l2", "input_noise", "init_scale") if k not in axes}
    member_configs = [c for c, _, _ in configs]
    settings = dict(
        seeds=a.seeds, epochs=a.epochs, batch_size=a.batch_size, validation=splits.valid,
        early_stopping=es, loss=a.loss, kernels=a.kernels, **base,
    )  # fmt: skip
    setup, hp, _, members = sweep.prepare_sweep(
        model, optimizer, tr, member_configs, **settings
    )  # check all, write nothing
    _check_checkpoint_flags(a)
    if a.resume is None:
        run_dir = report.make_run_dir(a.runs_dir, a.name, prefix="sweep")
        config = {**run_config.settings(a), "run_dir": str(run_dir)}
        report.write_json(run_dir / "config.json", config)
    else:
        run_dir = a.resume
    ckpt = _checkpointer(a, run_dir, checkpoint.describe(setup, hp, tr.x, tr.y, members=members))
    n = len(configs) * a.seeds
    with report.Progress(a.epochs, enabled=not a.no_progress, stream=sys.stderr) as prog:
        with _faults(ckpt, run_dir):
            res = sweep.sweep(
                model, optimizer, tr, member_configs, test=splits.test,
                on_epoch=lambda e, m: prog.update(e, _median(m)), checkpointer=ckpt,
                data_order=a.data_order, **settings,
            )  # fmt: skip
        prog.finish()
    rows = []
    for row, (_, d_in, d_hid) in zip(
        res.rows, [c for c in configs for _ in range(a.seeds)], strict=True
    ):
        row = {k: v for k, v in row.items() if k != "dropout"}
        given = {"dropout_input": d_in, "dropout_hidden": d_hid}
        row = {**{k: v for k, v in given.items() if k in lists}, **row}
        rows.append(row)
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
