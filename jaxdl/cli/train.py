"""``jaxdl train``: one run, its run directory, checkpoints and results."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from jaxdl import (
    checkpoint,
    compiled,
    report,
    runs,
    ticks,
    tracking,
    train,
)
from jaxdl.cli import config_file
from jaxdl.cli.build import load_data, run_config, saved_config, write_config
from jaxdl.cli.resume import _check_checkpoint_flags, _checkpointer, _faults

log = logging.getLogger("jaxdl")


def cmd_train(a: argparse.Namespace) -> dict:
    config, splits, tr = load_data(a, run_config(a))
    setup, hp = train.prepare(config, tr, splits.valid)
    _check_checkpoint_flags(a)
    if a.resume is None:
        run_dir = report.make_run_dir(a.runs_dir, a.name)
        resolved = {"hyperparams": {k: float(v) for k, v in hp.opt.items()},
                    "dropout": [float(r) for r in hp.dropout], "init_scale": float(hp.init_scale),
                    "kernels": setup.lowering.kernels}  # fmt: skip
        record = saved_config(a, config, resolved=resolved, run_dir=str(run_dir))
        write_config(run_dir, record)
    else:
        run_dir = a.resume
    info = train.FitInfo()
    state = compiled.programs(setup).init(train.as_key(config.training.seed), hp)
    ckpt = _checkpointer(config.checkpointing, run_dir, checkpoint.describe(setup, hp, tr.x, tr.y))
    history = saved = None
    if ckpt is not None and a.resume is not None and (saved := ckpt.restore(state)) is not None:
        state, history = saved.state, saved.host
    tb = None
    if a.tensorboard:
        tb = tracking.RunWriter(run_dir, setup.model, tr.x[: setup.probe_size], config_file.settings(a),
                                resumed_from=None if a.resume is None else getattr(saved, "epoch", 0))  # fmt: skip
    start = int(state.epoch)
    if saved is not None:
        log.info("resuming %s after epoch %d of %d (its latest checkpoint)", run_dir, start,
                 config.training.epochs)  # fmt: skip
    progress = dict(enabled=not a.no_progress, stream=sys.stderr, start=start)
    with report.Progress(a.epochs, **progress) as prog, ticks.listen(prog.tick):
        setup = dataclasses.replace(setup, ticks=prog.ticks)  # a live bar moves within epochs
        with _faults(ckpt, run_dir, "train", tell=not a.no_progress):
            state, history = train.fit_state(
                setup, state, hp, tr, splits.valid, on_epoch=train.each(prog.update, tb and tb.epoch),
                on_state=tb and tb.state, info=info,
                checkpointer=ckpt, history=history,
            )  # fmt: skip
        best = train.best_epoch(state) or None  # 0: no epoch improved (all NaN)
        prog.finish(stopped_early=len(history["train_loss"]) < a.epochs, best_epoch=best)
    test = train.evaluate(setup.model, state, splits.test, loss=setup.loss)
    report.save_history(run_dir, history)
    if not a.no_plots:
        flags = config.as_flags()
        title = (f"{run_dir.name}: {runs.describe_model(flags)}, {config.optimizer.name} "
                 f"lr {float(hp.opt['learning_rate']):g} ({flags['schedule']}), batch "
                 f"{config.training.batch_size}")  # fmt: skip
        report.plot_curves(history, run_dir / "curves.png", best_epoch=best, title=title)
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
