"""A run's traced numbers (``HParams``) from its settings, checked on the host: the
optimizer's numbers, L1/L2, dropout rates (one per masked layer, or each
``jaxdl.Dropout`` layer's own), input noise, init scale and the model's own numbers."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxdl import contract, inits, optim, validate
from jaxdl.models import Model
from jaxdl.optim import Optimizer
from jaxdl.step import HParams, Setup


def make_hparams(
    setup_or_model: Setup | Model,
    optimizer: Optimizer,
    feature_shape: Sequence[int],
    *,
    l1: float = 0.0,
    l2: float = 0.0,
    dropout: float | Sequence[float] | None = None,
    dropout_input: float | None = None,
    input_noise: float = 0.0,
    init_scale: float | None = None,
    **overrides: float,
) -> HParams:
    """Validated hyperparameters as float32 arrays.

    ``dropout``: one rate for every masked layer, or one per layer (input first);
    ``dropout_input``, if given, the input layer's rate (``dropout`` then the others').
    None: no dropout (``jaxdl.MLP``/``CNN``) or each ``jaxdl.Dropout`` layer's own rate.
    ``overrides`` replace the optimizer's numbers (e.g. ``learning_rate=3e-3``) and the
    model's own (``jaxdl.Hyperparameter`` keys, e.g. ``temperature=2.0``).
    """
    model = setup_or_model.model if isinstance(setup_or_model, Setup) else setup_or_model
    lay = contract.layout(model, tuple(feature_shape))
    n_masked = len(lay.widths)
    if dropout_input is not None and not contract.is_net(model):
        validate.fail("dropout_input", f"None: {type(model).__name__} has no input layer of "
                      "jaxdl's (give dropout, one rate per jaxdl.Dropout layer)", dropout_input)  # fmt: skip
    if dropout is None and dropout_input is None and lay.rates:
        dropout = lay.rates
    if dropout is None:
        dropout = 0.0
    if dropout_input is not None and np.ndim(dropout) != 0:
        validate.fail("dropout", "one rate for the hidden layers with dropout_input", dropout)
    if n_masked == 0 and np.any(np.asarray(dropout, np.float64) > 0):
        validate.fail("dropout", f"no rate: {type(model).__name__} has no jaxdl.Dropout layer "
                      "(Flax's nn.Dropout keeps its own rate)", dropout)  # fmt: skip
    if n_masked == 0:
        dropout = []
    elif np.ndim(dropout) == 0:
        first = float(dropout) if dropout_input is None else float(dropout_input)
        dropout = [first] + [float(dropout)] * (n_masked - 1)
    rates = validate.rates("dropout", dropout, n_masked)
    values = dict(optimizer.hyperparams) or optim.defaults(optimizer.name)
    numbers = dict(lay.numbers)  # the model's own (contract.Hyperparameter), by key
    for k, v in overrides.items():
        if k in numbers:
            ok = isinstance(v, int | float | np.number) and math.isfinite(v)
            numbers[k] = v if ok else validate.fail(k, "a finite number", v)
            continue
        validate.choice(f"{optimizer.name} hyperparameter", k, [*values, *numbers])
        values[k] = v
    optim.check_hyperparams(values)
    optim.check_structure(optimizer, values)
    validate.positive("l1", l1, allow_zero=True)
    validate.positive("l2", l2, allow_zero=True)
    validate.positive("input_noise", input_noise, allow_zero=True)
    own = getattr(model, "weight_init", None)  # a user module's kernels: as initialised
    scale = (1.0 if own is None else inits.default_scale(own)) if init_scale is None else init_scale
    validate.positive("init_scale", scale, allow_zero=True)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return HParams(
        opt={k: f32(v) for k, v in values.items()},
        l1=f32(l1),
        l2=f32(l2),
        dropout=f32(rates),
        input_noise=f32(input_noise),
        init_scale=f32(scale),
        numbers={k: f32(v) for k, v in numbers.items()},
    )
