"""Command line: ``jaxdl train`` and ``jaxdl data fetch``.

Thin by design: parses flags, calls the library, prints. Bad input exits with status 2
and one line naming the flag and what was expected, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from jaxdl import (
    checkpoint,
    data,
    devices,
    ensemble,
    htmlreport,
    inits,
    losses,
    lowering,
    models,
    optim,
    report,
    runs,
    stopping,
    sweep,
    tracking,
    train,
    validate,
)
from jaxdl import config as run_config
from jaxdl.validate import InputError


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors on one line and exits 2 (never prints usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 500,500, got {text!r}")
    return values


def _cpu_devices(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {text!r}")
    return n


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _values(text: str) -> list[float]:
    try:
        return sweep.parse_values(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("values: ")) from None


def _multipliers(text: str) -> dict[str, float]:
    out = {}
    for item in _names(text):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected LAYER=FACTOR pairs like output=10,layer_0=0.5, got {item!r}"
            ) from None
    return out


def _add_train_flags(p: argparse.ArgumentParser, number=float) -> None:
    """The flags of ``train``; ``number`` parses the sweepable ones (a list in ``sweep``)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="architecture")
    g.add_argument(
        "--hidden", type=_ints, default=(500, 500), help="MLP hidden widths, e.g. 500,500"
    )
    g.add_argument("--activation", default="relu", help=f"one of {', '.join(models.ACTIVATIONS)}")
    g.add_argument("--maxout-pieces", type=int, default=2, help="pieces per maxout unit")
    g.add_argument("--init", default="xavier_uniform", help=f"one of {', '.join(inits.NAMES)}")
    g.add_argument(
        "--init-scale",
        type=number,
        default=None,
        help="kernel multiplier (σ for 'normal'; default: the init's own)",
    )
    g.add_argument("--batch-norm", action="store_true", help="batch norm after each hidden layer")
    g.add_argument(
        "--conv-features", type=_ints, default=(32, 64), help="CNN channels per conv block"
    )
    g.add_argument("--conv-kernel", type=int, default=5, help="CNN kernel size")
    g.add_argument(
        "--conv-dense", type=_ints, default=(512,), help="CNN dense widths after the conv blocks"
    )
    g = p.add_argument_group("regularisation")
    g.add_argument(
        "--dropout-input",
        type=number,
        default=0.0,
        help="dropout rate on the input (CNN: on the conv features)",
    )
    g.add_argument(
        "--dropout-hidden", type=number, default=0.0, help="dropout rate on each hidden layer"
    )
    g.add_argument(
        "--dropout-convention",
        choices=models.CONVENTIONS,
        default="inverted",
        help="scale at train time (inverted) or at test time (classic)",
    )
    g.add_argument("--l1", type=number, default=0.0, help="L1 coefficient on the kernels")
    g.add_argument("--l2", type=number, default=0.0, help="L2 coefficient on the kernels (× Σw²)")
    g.add_argument(
        "--input-noise",
        type=number,
        default=0.0,
        help="σ of Gaussian noise added to training inputs",
    )
    g.add_argument(
        "--early-stopping",
        type=int,
        default=0,
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without improvement in --monitor (0: never stop early)",
    )
    g.add_argument(
        "--monitor",
        choices=tuple(stopping.MONITORS),
        default="val_accuracy",
        help="validation metric that picks the best epoch (and stops early)",
    )
    g.add_argument(
        "--min-delta", type=float, default=0.0, help="smallest change that counts as an improvement"
    )
    g.add_argument(
        "--no-restore-best",
        action="store_true",
        help="keep the last epoch's parameters, not the best epoch's",
    )
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adam", help=f"one of {', '.join(optim.FAMILIES)}")
    g.add_argument(
        "--lr", type=number, default=None, help="learning rate (default: the optimizer's)"
    )
    for name, text in (
        ("momentum", "momentum μ (momentum, momentum_ema, nesterov)"),
        ("b1", "Adam β1"), ("b2", "Adam β2"), ("eps", "ε (adagrad, rmsprop, adam)"),
        ("decay", "RMSProp ρ"), ("weight-decay", "decoupled weight decay on the kernels"),
        ("decay-start-epoch", "epoch from which weight decay applies"),
        ("clip-norm", "clip gradients to this global norm"),
        ("max-norm", "max-norm constraint: each unit's incoming weights kept within this L2 norm"),
        ("lr-decay", "step/plateau decay factor"), ("lr-decay-every", "step schedule period (epochs)"),
        ("lr-patience", "plateau patience (epochs)"), ("warmup-epochs", "warm-up length (epochs)"),
        ("lr-min-ratio", "cosine floor as a fraction of the learning rate"),
    ):  # fmt: skip
        g.add_argument(f"--{name}", type=number, default=None, help=text)
    g.add_argument(
        "--schedule",
        choices=optim.SCHEDULES,
        default="warmup_cosine",
        help="learning-rate schedule (default: a cosine from the learning rate to 0 over --epochs)",
    )
    g.add_argument(
        "--freeze", type=_names, default=(), help="comma-separated layers to freeze, e.g. layer_0"
    )
    g.add_argument(
        "--layer-lr",
        type=_multipliers,
        default={},
        help="per-layer learning-rate multipliers, e.g. output=10,layer_0=0.5",
    )
    g = p.add_argument_group("training")
    g.add_argument("--loss", choices=losses.LOSSES, default="cross_entropy", help="data loss")
    g.add_argument("--epochs", type=int, default=20, help="maximum number of epochs")
    g.add_argument("--batch-size", type=int, default=100, help="minibatch size")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed (initialisation, order, dropout)")
    g = p.add_argument_group("data and output")
    g.add_argument(
        "--data",
        default="mnist",
        help="'mnist', or an .npz with x_train, y_train, x_valid, y_valid, x_test, y_test",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data cache (default $JAXDL_DATA_DIR or ~/.cache/jaxdl)",
    )
    g.add_argument(
        "--preprocess",
        choices=("none", "pixel_mean", "global"),
        default="none",
        help="input standardisation (statistics from the training split)",
    )
    g.add_argument(
        "--train-size", type=int, default=None, help="use only the first N training examples"
    )
    g.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run directories go")
    g.add_argument("--name", default=None, help="run directory name (default: train-<timestamp>)")
    g.add_argument(
        "--json", action="store_true", help="print a JSON summary as the last line of stdout"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress display")
    g.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    g.add_argument(
        "--kernels",
        choices=lowering.KERNELS,
        default="auto",
        help="CPU kernels for the compiled programs: auto (where the CPU has AVX-512 and "
        "they build), on (or fail saying why), off (XLA alone, as on a GPU/TPU); how the "
        "run is computed, not what: a run may resume with another setting",
    )
    g.add_argument(
        "--tensorboard",
        action="store_true",
        help="write TensorBoard event files into the run directory "
        "(needs tensorboardX: pip install 'jaxdl[tensorboard]')",
    )
    g.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="read settings from a TOML or JSON file (a run's config.json reruns it); "
        "flags given on the command line override the file",
    )


def _add_checkpoint_flags(p: argparse.ArgumentParser, *, skip: bool = True) -> None:
    g = p.add_argument_group("checkpoints and faults")
    g.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint, with the settings of "
        "its config.json (only --json, --no-progress, --no-plots, --data-dir and --kernels "
        "may be given)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="checkpoint every N epochs, at each new best epoch and at the last (0: never)",
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=2,
        metavar="K",
        help="keep the K latest checkpoints (and the best one)",
    )
    if skip:
        g.add_argument(
            "--skip-nonfinite",
            action="store_true",
            help="skip optimizer steps whose loss or gradient is NaN/Inf (default: stop the "
            "run at the first one, exit status 3)",
        )


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = _Parser(prog="jaxdl", description="Compiled JAX training for studying deep networks.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train one model", formatter_class=fmt,
                       description="Train one model. With no flags: the course's Keras example "
                       "(784-500-500-10 ReLU, cross-entropy, Adam 1e-3, batch 100, 20 epochs) on MNIST.")  # fmt: skip
    _add_train_flags(t)
    _add_checkpoint_flags(t)
    w = sub.add_parser(
        "sweep",
        help="train many models at once (one compiled program per structure)",
        formatter_class=fmt,
        description="Train every combination of the given values × seeds as one vmapped "
        "program. Sweepable flags take lists: --lr 1e-4,3e-4,1e-3 or logspace:1e-4:1e-1:16 "
        "or linspace:0:0.5:6.",
    )
    _add_train_flags(w, number=_values)
    _add_checkpoint_flags(w, skip=False)
    w.add_argument("--seeds", type=int, default=1, help="seeds per configuration (0..N-1)")
    w.add_argument(
        "--data-order", choices=sweep.DATA_ORDERS, default="auto",
        help="own: each member shuffles with its seed; shared: all use the first member's "
        "order (faster: one minibatch per step for all); auto: shared when one seed",
    )  # fmt: skip
    w.add_argument(
        "--cpu-devices", type=_cpu_devices, default="auto", metavar="auto|N",
        help="on a CPU, run the members on N devices of the host's cores (auto: one per "
        "core, unless XLA_FLAGS or JAX_NUM_CPU_DEVICES set a count); GPUs are unaffected",
    )  # fmt: skip
    _add_view_commands(sub, fmt)
    e = _add_ensemble_command(sub, fmt)
    p.commands = {"train": t, "sweep": w, "ensemble": e}  # for --config: set a command's defaults
    d = sub.add_parser("data", help="data sets", formatter_class=fmt)
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    f = dsub.add_parser(
        "fetch", help="download and verify a data set into the cache", formatter_class=fmt
    )
    f.add_argument("name", choices=("mnist",), help="data set")
    f.add_argument("--data-dir", type=Path, default=None, help="cache directory")
    f.add_argument("--force", action="store_true", help="fetch again even if cached")
    return p


_OPT_FLAGS = ("momentum", "b1", "b2", "eps", "decay", "weight_decay", "decay_start_epoch",
              "clip_norm", "max_norm", "lr_decay", "lr_decay_every", "lr_patience", "warmup_epochs",
              "lr_min_ratio")  # fmt: skip


def num_classes(a: argparse.Namespace, splits: data.Splits) -> int:
    """10 for MNIST; for a file, 1 + the largest integer label of any split."""
    if a.data == "mnist":
        return 10
    ys = [np.asarray(s.y) for s in splits]
    if not all(np.issubdtype(y.dtype, np.integer) and y.size for y in ys):
        return 10  # the label checks in train.prepare will say what is wrong
    return max(2, 1 + max(int(y.max()) for y in ys))


def make_model(a: argparse.Namespace, classes: int = 10) -> models.Model:
    common = dict(
        num_classes=classes, activation=a.activation, maxout_pieces=a.maxout_pieces,
        weight_init=a.init, batch_norm=a.batch_norm, dropout_convention=a.dropout_convention,
    )  # fmt: skip
    if a.model == "cnn":
        return models.CNN(
            features=a.conv_features, kernel_size=a.conv_kernel, dense=a.conv_dense, **common
        )
    return models.MLP(hidden=a.hidden, **common)


def make_opt(a: argparse.Namespace) -> optim.Optimizer:
    given = {k: getattr(a, k) for k in _OPT_FLAGS if getattr(a, k) is not None}
    if a.lr is not None:
        given["learning_rate"] = a.lr
    known = optim.defaults(validate.choice("--optimizer", a.optimizer, optim.FAMILIES))
    for k in given:
        if k not in known:
            raise InputError(f"--{k.replace('_', '-')}: not a hyperparameter of {a.optimizer}; "
                             f"it takes {', '.join(sorted(known))}")  # fmt: skip
    return optim.make_optimizer(
        a.optimizer, schedule=a.schedule, freeze=a.freeze, layer_lr=a.layer_lr, **given
    )


def _common(a: argparse.Namespace):
    """Model, optimizer, early stopping and data from the flags shared by train and sweep."""
    model = models.check_model(make_model(a))  # fail fast, before loading data
    optimizer = make_opt(a)
    validate.positive_int("--early-stopping", a.early_stopping, allow_zero=True)
    patience = a.early_stopping or None  # 0: never stop, but still select the best epoch
    es = stopping.EarlyStopping(a.monitor, patience, a.min_delta, not a.no_restore_best)
    splits = data.standardize(data.load(a.data, directory=a.data_dir), a.preprocess)
    model = models.check_model(model.clone(num_classes=num_classes(a, splits)))
    tr = splits.train if a.train_size is None else data.subset(splits.train, a.train_size)
    return model, optimizer, es, splits, tr


def _dropout(model: models.Model, feature_shape, inp: float, hidden: float) -> list[float]:
    return [inp] + [hidden] * (len(models.masked_widths(model, feature_shape)) - 1)


def _check_checkpoint_flags(a: argparse.Namespace) -> None:
    validate.positive_int("--checkpoint-every", a.checkpoint_every, allow_zero=True)
    validate.positive_int("--keep-checkpoints", a.keep_checkpoints)
    if a.resume is not None and not a.checkpoint_every:
        raise InputError(f"--resume: {str(a.resume)!r} was run with --checkpoint-every 0, so "
                         "it has no checkpoints to resume from")  # fmt: skip


def _checkpointer(a: argparse.Namespace, run_dir: Path, config) -> checkpoint.Checkpointer | None:
    if not a.checkpoint_every:
        return None
    return checkpoint.Checkpointer(
        run_dir / "checkpoints", config, every=a.checkpoint_every, max_to_keep=a.keep_checkpoints
    )


@contextlib.contextmanager
def _faults(ckpt: checkpoint.Checkpointer | None, run_dir: Path):
    """Catches SIGINT/SIGTERM from here to the end of the command (``main`` restores the
    handlers): during training the run is saved at the end of the epoch and stops; once
    training is done it finishes writing its results. On a NaN/Inf loss writes the
    history so far and says where the last good checkpoint is."""
    with ckpt.catch_signals(restore=False) if ckpt is not None else contextlib.nullcontext():
        try:
            yield
        except train.NonFiniteError as e:
            report.save_history(run_dir, e.history)
            kept = [] if ckpt is None else ckpt.epochs()
            where = (f"the last good checkpoint is epoch {kept[-1]} in {ckpt.directory}" if kept
                     else "no checkpoint was kept")  # fmt: skip
            e.args = (f"{e}; {where}; history in {run_dir}; lower --lr, add --clip-norm or "
                      "--skip-nonfinite and start a new run",)  # fmt: skip
            raise
        except checkpoint.Interrupted as e:
            e.run_dir = run_dir
            raise


# Flags a resumed run may set: they change what is shown, not what is computed.
_RESUME_MAY_SET = ("resume", "json", "no_progress", "no_plots", "data_dir", "kernels")


def _given_flags(argv: Sequence[str]) -> dict:
    """The flags given on the command line (not their defaults), by dest."""
    p = build_parser()
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub._defaults.clear()  # set_defaults() values (e.g. ensemble's dropout rates)
                for act in sub._actions:
                    act.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


def _run_config(flag: str, run_dir: Path, command: str) -> dict:
    """The config.json of the ``command`` run in ``run_dir`` (for ``flag``'s message)."""
    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError:
        raise InputError(f"{flag}: expected a run directory with a config.json, got "
                         f"{str(run_dir)!r}") from None  # fmt: skip
    except ValueError as e:
        raise InputError(f"{flag}: {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("command") != command:
        raise InputError(f"{flag}: {str(run_dir)!r} is not a {command} run")
    return config


def _with_settings(a: argparse.Namespace, config: Mapping, keep: Sequence[str]) -> dict:
    """``a``'s values, with every setting of ``config`` that ``a`` has too, except ``keep``."""
    out = vars(a).copy()
    for dest, value in config.items():
        if dest in out and dest not in keep:
            if value is not None and dest in ("runs_dir", "data_dir"):
                value = Path(value)
            elif isinstance(out[dest], tuple) and isinstance(value, list):
                value = tuple(value)
            out[dest] = value
    return out


def _resumed(a: argparse.Namespace, argv: Sequence[str]) -> argparse.Namespace:
    """``a`` with the settings of the run being resumed (its config.json); refuses
    flags that would change what is computed."""
    run_dir = Path(a.resume)
    config = _run_config("--resume", run_dir, a.command)
    if (run_dir / ("results.json" if a.command == "train" else "summary.json")).exists():
        raise InputError(f"--resume: {str(run_dir)!r} has finished already; nothing to resume")
    given = _given_flags(argv)
    for dest, value in given.items():
        if dest in (*_RESUME_MAY_SET, "command") or report.to_jsonable(value) == config.get(dest):
            continue
        flag = "--" + dest.replace("_", "-")
        raise InputError(f"{flag}: {str(run_dir)!r} was started with {config.get(dest)!r}, got "
                         f"{value!r}; a resumed run keeps its settings (only --json, "
                         "--no-progress, --no-plots, --data-dir and --kernels may be given)")  # fmt: skip
    out = _with_settings(a, config, keep=list(given))
    out["resume"] = run_dir
    return argparse.Namespace(**out)


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
    state = train.programs(setup).init(train.as_key(a.seed), hp)
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


def cmd_fetch(a: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    path = data.fetch_mnist(a.data_dir, force=a.force)
    return {"dataset": a.name, "path": str(path), "seconds": time.perf_counter() - t0}


def _add_ensemble_command(sub, fmt) -> argparse.ArgumentParser:
    e = sub.add_parser(
        "ensemble",
        help="train a dropout net and measure it as an ensemble of subnetworks",
        formatter_class=fmt,
        description="Train a dropout net (the train flags; dropout 0.2 on the input and 0.5 "
        "on hidden layers by default), then compare weight scaling with Monte-Carlo "
        "averages of k sampled subnetworks (arithmetic and geometric), the exact ensemble "
        "of all subnetworks when they are few, and optionally explicit ensembles.",
    )
    _add_train_flags(e)
    e.set_defaults(dropout_input=0.2, dropout_hidden=0.5)
    g = e.add_argument_group("ensemble")
    g.add_argument("--k", type=int, default=100, help="subnetworks sampled (curve for k=1..K)")
    g.add_argument("--repeats", type=int, default=5, help="independent k-samples (spread)")
    g.add_argument(
        "--exact",
        choices=("auto", "on", "off"),
        default="auto",
        help="enumerate all 2^M subnetworks (auto: when M <= --max-units)",
    )
    g.add_argument("--max-units", type=int, default=20, help="most masked units to enumerate")
    g.add_argument(
        "--explicit",
        type=int,
        default=0,
        metavar="N",
        help="also train N independent nets and N fixed-mask subnetworks (0: skip)",
    )
    g.add_argument(
        "--from",
        dest="from_run",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="analyse the net a finished 'jaxdl train' run in RUN_DIR trained (its final "
        "parameters, from its checkpoints) instead of training one; the train flags are "
        "then the run's own",
    )
    g.add_argument("--test-size", type=int, default=None, help="use the first N test examples")
    g.add_argument(
        "--ood-size", type=int, default=1000, help="test images turned out-of-distribution"
    )
    return e


def cmd_ensemble(a: argparse.Namespace, argv: Sequence[str] = ()) -> dict:
    for flag in ("k", "repeats", "max_units", "ood_size"):
        validate.positive_int("--" + flag.replace("_", "-"), getattr(a, flag))
    validate.positive_int("--explicit", a.explicit, allow_zero=True)
    if a.test_size is not None:
        validate.positive_int("--test-size", a.test_size)
    if a.tensorboard:
        raise InputError("--tensorboard: not available for ensemble (use jaxdl train)")
    # t: the settings of the net (this command's train flags, or the --from run's)
    t = a if a.from_run is None else _trained_settings(a, argv)
    model, optimizer, es, splits, tr = _common(t)
    rates = _dropout(model, tr.x.shape[1:], t.dropout_input, t.dropout_hidden)
    if max(rates) <= 0:
        flag = "--from" if a.from_run is not None else "--dropout-input/--dropout-hidden"
        raise InputError(f"{flag}: the ensemble view needs dropout; expected a rate above 0, "
                         "got 0")  # fmt: skip
    widths = models.masked_widths(model, tr.x.shape[1:])
    units = sum(w for w, r in zip(widths, rates, strict=True) if r > 0)
    if a.exact == "on" and units > a.max_units:
        raise InputError(f"--exact on: {units} masked units are more than --max-units "
                         f"{a.max_units}; mask fewer units or use --exact auto")  # fmt: skip
    setup, hp = _prepare(t, model, optimizer, es, splits, tr, rates)
    test = splits.test if a.test_size is None else data.subset(splits.test, a.test_size)
    state = train.programs(setup).init(train.as_key(t.seed), hp)
    if a.from_run is not None:  # before a run directory exists: a bad run writes nothing
        state = _trained_state(t, setup, hp, tr, state)
    run_dir = report.make_run_dir(a.runs_dir, a.name, prefix="ensemble")
    report.write_json(run_dir / "config.json", {**run_config.settings(a), "run_dir": str(run_dir)})
    if a.from_run is None:
        with report.Progress(a.epochs, enabled=not a.no_progress, stream=sys.stderr) as prog:
            state, history = train.fit_state(
                setup, state, hp, tr, splits.valid, on_epoch=prog.update
            )
            prog.finish(best_epoch=train.best_epoch(state) or None)
        report.save_history(run_dir, history)
    key = jax.random.fold_in(train.as_key(t.seed), 7)
    exact = {"auto": None, "on": True, "off": False}[a.exact]
    result = ensemble.analyse(
        model, ensemble.variables_of(state), rates, test, key=key, k=a.k, repeats=a.repeats,
        exact=exact, max_units=a.max_units, ood_size=min(a.ood_size, len(test.x)),
        kernels=a.kernels,
    )  # fmt: skip
    explicit = {}
    if a.explicit:
        shared = {"l1": t.l1, "l2": t.l2, "input_noise": t.input_noise, "init_scale": t.init_scale}
        trained = ensemble.train_explicit(
            model, optimizer, tr, n=a.explicit, rates=rates, key=jax.random.fold_in(key, 1),
            epochs=t.epochs, seed=t.seed + 1, batch_size=t.batch_size, validation=splits.valid,
            early_stopping=es, loss=t.loss, kernels=a.kernels,
            config={k: v for k, v in shared.items() if v is not None},
        )  # fmt: skip
        for name in ("independent", "bagging"):
            masks = trained["masks"] if name == "bagging" else None
            explicit[name] = ensemble.member_stats(
                model, trained[name].states, test.x, test.y, masks=masks, kernels=a.kernels
            )
    summary = ensemble.summary(result)
    for name, stats in explicit.items():
        summary[f"{name}_accuracy"] = {
            str(j + 1): float(v) for j, v in enumerate(stats["accuracy"])
        }
    summary["run_dir"] = str(run_dir)
    summary["kernels"] = setup.lowering.kernels
    report.write_json(run_dir / "ensemble.json", {**result, "explicit": explicit})
    report.write_json(run_dir / "summary.json", summary)
    if not a.no_plots:
        report.plot_ensemble(result, run_dir, explicit=explicit)
    return summary


# The flags of ``ensemble`` that are not the net's settings (allowed with --from).
_ENSEMBLE_OWN = ("command", "from_run", "k", "repeats", "exact", "max_units", "explicit",
                 "test_size", "ood_size", "name", "runs_dir", "json", "no_progress",
                 "no_plots", "data_dir", "config", "kernels")  # fmt: skip


def _trained_settings(a: argparse.Namespace, argv: Sequence[str]) -> argparse.Namespace:
    """The settings of the finished train run ``a.from_run`` (every train flag, as
    ``jaxdl train`` parsed them), with ``a``'s data directory; refuses train flags given
    with ``--from`` (they would describe another net than the one loaded)."""
    run_dir = Path(a.from_run)
    config = _run_config("--from", run_dir, "train")
    if not (run_dir / "results.json").exists():
        raise InputError(f"--from: {str(run_dir)!r} has not finished (no results.json); "
                         f"finish it with: jaxdl train --resume {run_dir}")  # fmt: skip
    for dest in _given_flags(argv):
        if dest not in _ENSEMBLE_OWN:
            flag = "--" + dest.replace("_", "-")
            raise InputError(f"{flag}: with --from the net and its settings are those of "
                             f"{str(run_dir)!r}; give only the ensemble flags")  # fmt: skip
    t = _with_settings(build_parser().parse_args(["train"]), config, keep=())
    t.update(data_dir=a.data_dir, from_run=run_dir)
    return argparse.Namespace(**t)


def _trained_state(t: argparse.Namespace, setup, hp, tr, like) -> train.TrainState:
    """The final state of the train run ``t.from_run``, read from its last checkpoint and
    checked against the ``params_digest`` its results.json reports."""
    run_dir = t.from_run
    ckpt = _checkpointer(t, run_dir, checkpoint.describe(setup, hp, tr.x, tr.y))
    saved = None if ckpt is None else ckpt.restore(like)
    if saved is None:
        raise InputError(f"--from: {str(run_dir)!r} kept no checkpoint (it was run with "
                         "--checkpoint-every 0); train it again with checkpoints")  # fmt: skip
    state = train.final_state(setup, saved.state)
    reported = json.loads((run_dir / "results.json").read_text()).get("params_digest")
    if report.params_digest(state.params) != reported:
        raise InputError(f"--from: the last checkpoint of {str(run_dir)!r} (epoch "
                         f"{saved.epoch}) does not hold the parameters its results.json "
                         "reports (params_digest differs)")  # fmt: skip
    return state


def _add_view_commands(sub, fmt) -> None:
    """``runs``, ``compare`` and ``report``: read run directories, train nothing."""
    r = sub.add_parser("runs", help="list run directories, newest first", formatter_class=fmt)
    r.add_argument("runs_dir", nargs="?", type=Path, default=Path("runs"), help="where runs are")
    r.add_argument("--limit", type=int, default=0, help="show only the N newest (0: all)")
    c = sub.add_parser(
        "compare", help="print the settings and results that differ", formatter_class=fmt
    )
    c.add_argument("paths", nargs="+", type=Path, metavar="RUN_DIR", help="two or more runs")
    h = sub.add_parser(
        "report", help="write one self-contained HTML page about runs", formatter_class=fmt
    )
    h.add_argument(
        "paths", nargs="+", type=Path, metavar="RUN_DIR", help="runs, or directories of runs"
    )
    h.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML file")
    h.add_argument("--title", default="jaxdl report", help="page title")
    for q in (r, c, h):
        q.add_argument(
            "--json", action="store_true", help="print a JSON summary as the last line of stdout"
        )


def cmd_runs(a: argparse.Namespace) -> tuple[dict, str]:
    validate.positive_int("--limit", a.limit, allow_zero=True)
    found = runs.find_runs(a.runs_dir)[: a.limit or None]
    table = runs.run_table(found) if found else f"no runs in {a.runs_dir}"
    return {"runs": [runs.summary_row(r) for r in found], "runs_dir": str(a.runs_dir)}, table


def cmd_compare(a: argparse.Namespace) -> tuple[dict, str]:
    found = [runs.load_run(p) for p in a.paths]
    diff = runs.differences(found)
    return {"runs": [str(r.path) for r in found], **diff}, runs.compare_text(found, diff)


def cmd_report(a: argparse.Namespace) -> tuple[dict, str]:
    res = htmlreport.write(a.paths, a.out, title=a.title)
    return res, f"report {res['report']}: {res['runs']} run(s), {res['plots']} plot(s)"


_VIEWS = {"runs": cmd_runs, "compare": cmd_compare, "report": cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parser.parse_args(argv)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if getattr(a, "config", None) is not None:
            a = run_config.reparse(parser, parser.commands[a.command], argv, a)
        if getattr(a, "tensorboard", False):
            tracking.require()  # before anything is written
        if getattr(a, "resume", None) is not None:
            a = _resumed(a, argv)
        if a.command == "sweep":
            _use_cpu_devices(a.cpu_devices)
            results = cmd_sweep(a)
            b = results["best"]
            summary = (f"{results['members']} members, {results['compiles']} compile(s), "
                       f"{results['diverged']} diverged; best val accuracy "
                       f"{b['best_val_accuracy']:.4f} (test {b['test_accuracy']:.4f}) with "
                       f"{ {k: v for k, v in b.items() if k not in _ROW_RESULTS} }; "
                       f"results {results['results_path']}")  # fmt: skip
        elif a.command == "train":
            results = cmd_train(a)
            summary = (f"test accuracy {results['test_accuracy']:.4f}  test loss {results['test_loss']:.4f}  "
                       f"best epoch {results['best_epoch']}/{results['epochs_run']}  "
                       f"{results['samples_per_second']:,.0f} samples/s  run {results['run_dir']}")  # fmt: skip
        elif a.command == "ensemble":
            results = cmd_ensemble(a, argv)
            summary = (f"weight scaling {results['weight_scaling_accuracy']:.4f}; MC "
                       + ", ".join(f"k={k}: {v:.4f}" for k, v in results["mc_accuracy"].items())
                       + (f"; exact {results['exact_accuracy']:.4f}" if "exact_accuracy" in results else "")
                       + f"; run {results['run_dir']}")  # fmt: skip
        elif a.command in _VIEWS:
            results, summary = _VIEWS[a.command](a)
        else:
            results = cmd_fetch(a)
            summary = f"{results['dataset']} ready at {results['path']}"
    except InputError as e:
        print(f"jaxdl {a.command}: error: {e}", file=sys.stderr)
        return 2
    except train.NonFiniteError as e:
        print(f"jaxdl {a.command}: error: {e}", file=sys.stderr)
        return 3
    except checkpoint.Interrupted as e:
        run = getattr(e, "run_dir", e.directory)
        print(f"jaxdl {a.command}: {e}; continue with: jaxdl {a.command} --resume {run}",
              file=sys.stderr)  # fmt: skip
        return 128 + e.signum
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print(f"jaxdl {a.command}: interrupted; checkpoints already written are kept",
              file=sys.stderr)  # fmt: skip
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, h in handlers.items():  # as they were: the command may have caught them
                signal.signal(s, h)
    print(summary)
    if getattr(a, "json", False):
        print(json.dumps(report.to_jsonable(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
