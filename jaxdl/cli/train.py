"""``jaxdl train``: one run, its run directory, checkpoints and results."""

from __future__ import annotations

import argparse
import sys

from jaxdl import (
    checkpoint,
    compiled,
    report,
    tracking,
    train,
)
from jaxdl import config as run_config
from jaxdl.cli.build import _common, _dropout
from jaxdl.cli.resume import _check_checkpoint_flags, _checkpointer, _faults


def _prepare(a: argparse.Namespace, model, optimizer, es, splits, tr, dropout):
    """``train.prepare`` with the settings of the train flags."""
    return train.prepare(
        model, optimizer, tr, epochs=a.epochs, batch_size=a.batch_size, validation=splits.valid,
        early_stopping=es, loss=a.loss, l1=a.l1, l2=a.l2, dropout=dropout,
        input_noise=a.input_noise, init_scale=a.init_scale,
        skip_nonfinite=getattr(a, "skip_nonfinite", False), kernels=a.kernels,
    )  # fmt: skip


def cmd_train(a: argparse.Namespace) -> dict:
    model, optimizer, es, splits, tr = _common(a)
    dropout = _dropout(model, tr.x.shape[1:], a.dropout_input, a.dropout_hidden)
    setup, hp = _prepare(a, model, optimizer, es, splits, tr, dropout)
    _check_checkpoint_flags(a)
    if a.resume is None:
        run_dir = report.make_run_dir(a.runs_dir, a.name)
        config = {**run_config.settings(a), "run_dir": str(run_dir)}
        config["resolved"] = {"hyperparams": {k: float(v) for k, v in hp.opt.items()},
                              "dropout": [float(r) for r in hp.dropout], "init_scale": float(hp.init_scale),
                              "kernels": setup.lowering.kernels}  # fmt: skip
        report.write_json(run_dir / "config.json", config)
    else:
        run_dir = a.resume
    info = train.FitInfo()
    state = compiled.programs(setup).init(train.as_key(a.seed), hp)
    ckpt = _checkpointer(a, run_dir, checkpoint.describe(setup, hp, tr.x, tr.y))
    history = saved = None
    if ckpt is not None and a.resume is not None and (saved := ckpt.restore(state)) is not None:
        state, history = saved.state, saved.host
    tb = None
    if a.tensorboard:
        tb = tracking.RunWriter(run_dir, model, tr.x[: setup.probe_size], run_config.settings(a),
                                resumed_from=None if a.resume is None else getattr(saved, "epoch", 0))  # fmt: skip
    with report.Progress(a.epochs, enabled=not a.no_progress, stream=sys.stderr) as prog:
        with _faults(ckpt, run_dir):
            state, history = train.fit_state(
                setup, state, hp, tr, splits.valid, on_epoch=_each(prog.update, tb and tb.epoch),
                on_state=tb and tb.state, info=info,
                checkpointer=ckpt, history=history,
            )  # fmt: skip
        best = train.best_epoch(state) or None  # 0: no epoch improved (all NaN)
        prog.finish(stopped_early=len(history["train_loss"]) < a.epochs, best_epoch=best)
    test = train.evaluate(model, state, splits.test, loss=a.loss)
    report.save_history(run_dir, history)
    if not a.no_plots:
        report.plot_curves(history, run_dir / "curves.png", best_epoch=best)
        report.plot_layer_stats(history, run_dir / "layers.png")
    epochs_run = len(history["train_loss"])
    results = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_accuracy": history["val_accuracy"][(best or epochs_run) - 1],
        "best_epoch": best,
        "epochs_run": epochs_run,
        "samples_per_second": info.samples_per_second,
        "compile_seconds": info.compile_seconds,
        "train_seconds": info.train_seconds,
        "params_digest": report.params_digest(state.params),
        "run_dir": str(run_dir),
        "kernels": setup.lowering.kernels,
    }
    report.write_json(run_dir / "results.json", results)
    if tb is not None:
        tb.close(results)
    return results


def _each(*callbacks):
    """One callback that calls each of ``callbacks`` that is not None, in order."""
    active = [c for c in callbacks if c is not None]

    def call(*args) -> None:
        for c in active:
            c(*args)

    return call
