"""From parsed flags to a ``RunConfig`` and its data, and back to what ``config.json``
holds (the run's config, plus the flags that only say how it is shown)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl import data, model_source, optim, report, train, validate
from jaxdl.cli import config_file
from jaxdl.config import MODEL_FLAGS, OPTIMIZER_FLAGS, RUN_FLAGS, RunConfig
from jaxdl.model_config import module_fields
from jaxdl.validate import InputError


def num_classes(a: argparse.Namespace, splits: data.Splits) -> int:
    """10 for MNIST; for a file, 1 + the largest integer label of any split."""
    return 10 if a.data == "mnist" else train.num_classes(*splits)


def check_paths(a: argparse.Namespace) -> None:
    """``--runs-dir`` and ``--data-dir`` must be directories (or not exist yet)."""
    for dest in ("runs_dir", "data_dir"):
        path = getattr(a, dest, None)
        if path is not None and path.exists() and not path.is_dir():
            flag = "--" + dest.replace("_", "-")
            raise InputError(f"{flag}: {str(path)!r} is a file; expected a directory")


def _each(value) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def check_numbers(a: argparse.Namespace) -> None:
    """The numbers a user types most, checked under their flags' names (a sweep's lists
    value by value); ``prepare`` checks the rest."""
    for dest in ("dropout_input", "dropout_hidden"):
        for v in _each(getattr(a, dest)):
            if v is not None:
                validate.in_range("--" + dest.replace("_", "-"), v, 0.0, 1.0)
    for dest in ("l1", "l2", "input_noise", "init_scale"):
        for v in _each(getattr(a, dest)):
            if v is not None:
                validate.positive("--" + dest.replace("_", "-"), v, allow_zero=True)
    for v in _each(a.lr):
        if v is not None:
            validate.positive("--lr", v)
    for dest in ("epochs", "batch_size"):
        validate.positive_int("--" + dest.replace("_", "-"), getattr(a, dest))
    if a.train_size is not None:
        validate.positive_int("--train-size", a.train_size)


def run_config(a: argparse.Namespace) -> RunConfig:
    """The run the training flags describe; the model and optimizer are built once here
    so that a bad flag fails before any data is loaded."""
    check_numbers(a)
    validate.positive_int("--early-stopping", a.early_stopping, allow_zero=True)
    known = optim.defaults(validate.choice("--optimizer", a.optimizer, optim.FAMILIES))
    for k in OPTIMIZER_FLAGS:
        if getattr(a, k) is not None and k not in known:
            raise InputError(f"--{k.replace('_', '-')}: not a hyperparameter of {a.optimizer}; "
                             f"it takes {', '.join(sorted(known))}")  # fmt: skip
    if ":" in a.model:  # a module of one's own: the flags of jaxdl's modules mean nothing
        from jaxdl.cli.parser import build_parser

        defaults = vars(build_parser().parse_args([a.command]))
        for dest in MODEL_FLAGS:
            if getattr(a, dest, None) != defaults.get(dest):
                raise InputError(f"--{dest.replace('_', '-')}: a flag of jaxdl's mlp and cnn; "
                                 f"{a.model.rpartition(':')[2]} takes its arguments from "
                                 "--model-args")  # fmt: skip
    config = RunConfig.from_flags(vars(a))
    config.model.build(10)
    config.optimizer.build()
    return config


def load_data(a: argparse.Namespace, config: RunConfig):
    """``(config, splits, train)``: the data the config names (from ``--data-dir``), the
    model's class count set from it (and a CNN's image shape, from (N, H, W, C) images),
    and the training split cut to ``--train-size``."""
    d = config.data
    splits = data.standardize(data.load(d.source, directory=a.data_dir), d.preprocess)
    args = dict(config.model.args)
    if "num_classes" in module_fields(config.model.module_class()):
        args["num_classes"] = num_classes(a, splits)
    shape = np.shape(splits.train.x)[1:]
    if config.model.module == "cnn" and len(shape) == 3:
        args["image_shape"] = tuple(int(s) for s in shape)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, args=args))
    n = len(splits.train.x)
    if d.train_size is not None and d.train_size > n:
        validate.fail("--train-size", f"at most the {n} training examples", d.train_size)
    tr = splits.train if d.train_size is None else data.subset(splits.train, d.train_size)
    return config, splits, tr


def saved_config(a: argparse.Namespace, config: RunConfig, **extra: Any) -> dict[str, Any]:
    """What ``config.json`` holds: the command, the run's config under ``"run"``, and the
    command's other flags (display, output, sweep and ensemble settings) under
    ``"options"``; ``extra`` keys (``space``, ``run_dir``, ``resolved``) as given; for a
    model from a file, ``"model_source"``: its path and sha256 (``write_config`` keeps a
    copy of it beside)."""
    options = {k: v for k, v in config_file.settings(a).items()
               if k not in RUN_FLAGS and k not in extra.get("space", {}) and k != "command"}  # fmt: skip
    out = {"command": a.command, "run": config.to_dict(), "options": options, **extra}
    if model_source.is_file_spec(config.model.module):
        _, digest = model_source.source(config.model.module)
        out["model_source"] = {"spec": config.model.module, "sha256": digest,
                               "copy": MODEL_COPY}  # fmt: skip
    return out


MODEL_COPY = "model_source.py"  # a run directory's copy of a model file


def write_config(run_dir: Path, record: dict[str, Any]) -> None:
    """Writes ``config.json`` into ``run_dir``, and the model file's copy if it names one."""
    if "model_source" in record:
        text, digest = model_source.source(record["model_source"]["spec"])
        if digest != record["model_source"]["sha256"]:
            raise InputError(f"--model: {record['model_source']['spec']!r} changed while the "
                             "run started; run it again")  # fmt: skip
        (run_dir / MODEL_COPY).write_text(text)
    report.write_json(run_dir / "config.json", record)
