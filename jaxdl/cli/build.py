"""From parsed flags to the library's objects: model, optimizer, early stopping and data."""

from __future__ import annotations

import argparse

import numpy as np

from jaxdl import (
    data,
    models,
    optim,
    stopping,
    validate,
)
from jaxdl.cli.flags import _OPT_FLAGS
from jaxdl.validate import InputError


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
