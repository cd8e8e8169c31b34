"""Command line: ``jaxdl train`` and ``jaxdl data fetch``.

Thin by design: parses flags, calls the library, prints. Bad input exits with status 2
and one line naming the flag and what was expected, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxdl import data, inits, losses, models, optim, report, stopping, sweep, train, validate
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
        ("lr-decay", "step/plateau decay factor"), ("lr-decay-every", "step schedule period (epochs)"),
        ("lr-patience", "plateau patience (epochs)"), ("warmup-epochs", "warm-up length (epochs)"),
        ("lr-min-ratio", "cosine floor as a fraction of the learning rate"),
    ):  # fmt: skip
        g.add_argument(f"--{name}", type=number, default=None, help=text)
    g.add_argument(
        "--schedule", choices=optim.SCHEDULES, default="constant", help="learning-rate schedule"
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


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = _Parser(prog="jaxdl", description="Compiled JAX training for studying deep networks.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train one model", formatter_class=fmt,
                       description="Train one model. With no flags: the course's Keras example "
                       "(784-500-500-10 ReLU, cross-entropy, Adam 1e-3, batch 100, 20 epochs) on MNIST.")  # fmt: skip
    _add_train_flags(t)
    w = sub.add_parser(
        "sweep",
        help="train many models at once (one compiled program per structure)",
        formatter_class=fmt,
        description="Train every combination of the given values × seeds as one vmapped "
        "program. Sweepable flags take lists: --lr 1e-4,3e-4,1e-3 or logspace:1e-4:1e-1:16 "
        "or linspace:0:0.5:6.",
    )
    _add_train_flags(w, number=_values)
    w.add_argument("--seeds", type=int, default=1, help="seeds per configuration (0..N-1)")
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
              "clip_norm", "lr_decay", "lr_decay_every", "lr_patience", "warmup_epochs",
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


def cmd_train(a: argparse.Namespace) -> dict:
    model, optimizer, es, splits, tr = _common(a)
    dropout = _dropout(model, tr.x.shape[1:], a.dropout_input, a.dropout_hidden)
    setup, hp = train.prepare(
        model, optimizer, tr, epochs=a.epochs, batch_size=a.batch_size, validation=splits.valid,
        early_stopping=es, loss=a.loss, l1=a.l1, l2=a.l2, dropout=dropout,
        input_noise=a.input_noise, init_scale=a.init_scale,
    )  # fmt: skip
    run_dir = report.make_run_dir(a.runs_dir, a.name)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    config["resolved"] = {"hyperparams": {k: float(v) for k, v in hp.opt.items()},
                          "dropout": [float(r) for r in hp.dropout], "init_scale": float(hp.init_scale)}  # fmt: skip
    report.write_json(run_dir / "config.json", config)
    info = train.FitInfo()
    state = train.programs(setup).init(train.as_key(a.seed), hp)
    with report.Progress(a.epochs, enabled=not a.no_progress, stream=sys.stderr) as prog:
        state, history = train.fit_state(
            setup, state, hp, tr, splits.valid, on_epoch=prog.update, info=info
        )
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
    }
    report.write_json(run_dir / "results.json", results)
    return results


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
        early_stopping=es, loss=a.loss, **base,
    )  # fmt: skip
    sweep.prepare_sweep(
        model, optimizer, tr, member_configs, **settings
    )  # check all, write nothing
    run_dir = report.make_run_dir(a.runs_dir, a.name, prefix="sweep")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    report.write_json(run_dir / "config.json", config)
    n = len(configs) * a.seeds
    with report.Progress(a.epochs, enabled=not a.no_progress, stream=sys.stderr) as prog:
        res = sweep.sweep(
            model, optimizer, tr, member_configs, test=splits.test,
            on_epoch=lambda e, m: prog.update(e, _median(m)), **settings,
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
        "compile_seconds": res.compile_seconds,
        "train_seconds": res.seconds,
        "diverged": sum(r["diverged"] for r in rows),
        "run_dir": str(run_dir),
    }
    report.write_json(run_dir / "summary.json", summary)
    return summary


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        if a.command == "sweep":
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
        else:
            results = cmd_fetch(a)
            summary = f"{results['dataset']} ready at {results['path']}"
    except InputError as e:
        print(f"jaxdl {a.command}: error: {e}", file=sys.stderr)
        return 2
    print(summary)
    if getattr(a, "json", False):
        print(json.dumps(report.to_jsonable(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
