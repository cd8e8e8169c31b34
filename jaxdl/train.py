"""Compiled training: pure ``train_step``, a scan-fused epoch, and ``fit``.

The static ``Setup`` (model, optimizer structure, batch size, data size, loss, which
features are on) decides the compiled program; every number a user may sweep is in the
traced ``HParams``. One program per ``Setup`` is compiled and cached, so a second epoch
or a second ``fit`` with new hyperparameter values reuses it.

An epoch is one ``lax.scan`` over minibatches gathered from the device-resident data in
an order reshuffled every epoch from the state's key. When the data size is not a
multiple of the batch size, the last batch is padded and its padding weighted 0 (and
kept out of batch-norm statistics), so every example is seen exactly once per epoch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxdl import devices, inits, losses, lowering, models, optim, stopping, validate
from jaxdl.data import Dataset
from jaxdl.lowering import XLA, Lowering
from jaxdl.models import Model
from jaxdl.optim import Optimizer
from jaxdl.stopping import EarlyStopping

if TYPE_CHECKING:
    from jaxdl.checkpoint import Checkpointer

PRNGKey = jax.Array


class Batch(NamedTuple):
    x: jax.Array  # (B, *feature_shape) float32
    y: jax.Array  # (B,) int32
    weight: jax.Array | None = None  # (B,) 1 for real examples, 0 for padding


class HParams(NamedTuple):
    """Every sweepable number, as arrays (one set per member in a sweep)."""

    opt: dict[str, jax.Array]  # optim.defaults(name): optimizer and schedule numbers
    l1: jax.Array  # () coefficient of Σ|w|
    l2: jax.Array  # () coefficient of Σw²
    dropout: jax.Array  # (n_masked,) rates: input, then each hidden layer
    input_noise: jax.Array  # () σ of additive Gaussian input noise while training
    init_scale: jax.Array  # () multiplier of the initial kernels
    # A fixed subnetwork: one 0/1 mask per masked layer, (width_i,), used at every step and
    # at evaluation instead of sampled masks ("dropout bagging"); None: sample or no dropout.
    masks: models.Masks | None = None


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static part of training: equal setups share one compiled program."""

    model: Model
    optimizer: Optimizer
    feature_shape: tuple[int, ...]
    n_train: int
    batch_size: int = 100
    epochs: int = 20
    loss: str = "cross_entropy"
    dropout: bool = False  # sample dropout masks (rates themselves are traced)
    input_noise: bool = False
    penalty: bool = False  # add L1/L2 terms to the loss
    early_stopping: EarlyStopping | None = None
    eval_batch_size: int = 1000
    probe_size: int = 1000  # training examples for per-epoch activation and gradient statistics
    skip_nonfinite: bool = False  # skip steps whose loss or gradient is NaN/Inf (apply_if_finite)
    # How the programs run on this host (jaxdl.lowering; prepare() resolves ``kernels``).
    # It decides the compiled program, so equality and caches see it, but not what the
    # program computes: it stays out of repr, which is a checkpoint's identity.
    lowering: Lowering = dataclasses.field(default=XLA, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.batch_size)

    @property
    def widths(self) -> tuple[int, ...]:
        return models.masked_widths(self.model, self.feature_shape)


class TrainState(struct.PyTreeNode):
    step: jax.Array  # () int32, optimizer steps taken
    epoch: jax.Array  # () int32, epochs completed
    params: Any
    opt_state: optax.OptState
    batch_stats: Any
    key: PRNGKey  # fixed for the run; step and epoch keys are folded in from it
    rates: jax.Array | None  # dropout rates, needed at test time by the classic convention
    plateau: stopping.PlateauState
    stopping: stopping.StoppingState | None


def make_hparams(
    setup_or_model: Setup | Model,
    optimizer: Optimizer,
    feature_shape: Sequence[int],
    *,
    l1: float = 0.0,
    l2: float = 0.0,
    dropout: float | Sequence[float] | None = None,
    input_noise: float = 0.0,
    init_scale: float | None = None,
    **overrides: float,
) -> HParams:
    """Validated hyperparameters as float32 arrays.

    ``dropout``: one rate for every masked layer, or one per layer (input first).
    ``overrides`` replace the optimizer's numbers (e.g. ``learning_rate=3e-3``).
    """
    model = setup_or_model.model if isinstance(setup_or_model, Setup) else setup_or_model
    n_masked = len(models.masked_widths(model, feature_shape))
    if dropout is None:
        dropout = 0.0
    if np.ndim(dropout) == 0:
        dropout = [float(dropout)] * n_masked
    rates = validate.rates("dropout", dropout, n_masked)
    values = dict(optimizer.hyperparams) or optim.defaults(optimizer.name)
    for k, v in overrides.items():
        validate.choice(f"{optimizer.name} hyperparameter", k, values)
        values[k] = v
    optim.check_hyperparams(values)
    optim.check_structure(optimizer, values)
    validate.positive("l1", l1, allow_zero=True)
    validate.positive("l2", l2, allow_zero=True)
    validate.positive("input_noise", input_noise, allow_zero=True)
    scale = inits.default_scale(model.weight_init) if init_scale is None else init_scale
    validate.positive("init_scale", scale, allow_zero=True)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return HParams(
        opt={k: f32(v) for k, v in values.items()},
        l1=f32(l1),
        l2=f32(l2),
        dropout=f32(rates),
        input_noise=f32(input_noise),
        init_scale=f32(scale),
    )


def init_state(setup: Setup, key: PRNGKey, hp: HParams) -> TrainState:
    """Initial parameters (kernels × ``hp.init_scale``), optimizer state and trackers."""
    init_key, run_key = jax.random.split(key)
    dummy = jnp.zeros((1, *setup.feature_shape), jnp.float32)
    variables = setup.model.init(init_key, dummy, train=False)
    params = inits.scale_kernels(variables["params"], hp.init_scale)
    batch_stats = variables.get("batch_stats", {})
    zero = jnp.zeros((), jnp.int32)
    plateau = stopping.init_plateau()
    opt_state = setup.optimizer.tx.init(params)
    hyper = optim.current_hyperparams(setup.optimizer, hp.opt, 0.0, setup.epochs, plateau.scale)
    es = setup.early_stopping
    return TrainState(
        step=zero,
        epoch=zero,
        params=params,
        opt_state=optim.set_hyperparams(opt_state, hyper),
        batch_stats=batch_stats,
        key=run_key,
        rates=hp.dropout if setup.dropout else None,
        plateau=plateau,
        stopping=None if es is None else stopping.init_stopping(es, params, batch_stats),
    )


def _apply(model: Model, params, batch_stats, x, *, rates=None, masks=None, train=False, **kw):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    return model.apply(variables, x, train=train, rates=rates, masks=masks, **kw)


def layer_norms(tree) -> dict[str, jax.Array]:
    """L2 norm per top-level entry (layer) of a parameter-shaped tree."""
    return {k: optax.tree.norm(v) for k, v in tree.items() if not k.startswith(("bn_", "conv_bn_"))}


def _lowered(fn: Callable) -> Callable:
    """``fn(setup, ...)`` traced with the models lowered as ``setup.lowering`` says."""

    @functools.wraps(fn)
    def wrapper(setup: Setup, *args, **kwargs):
        with setup.lowering.scope():
            return fn(setup, *args, **kwargs)

    return wrapper


@_lowered
def train_step(setup: Setup, state: TrainState, batch: Batch, hp: HParams):
    """One optimizer step. Returns ``(state, metrics)`` with this batch's data loss,
    accuracy and weight (number of real examples)."""
    key = jax.random.fold_in(jax.random.fold_in(state.key, 0), state.step)
    k_mask, k_noise = jax.random.split(key)
    x = batch.x
    if setup.input_noise:
        x = x + hp.input_noise * jax.random.normal(k_noise, x.shape, x.dtype)
    rates = hp.dropout if setup.dropout or hp.masks is not None else None
    masks = hp.masks
    if masks is None and setup.dropout:
        masks = models.sample_masks(
            k_mask, hp.dropout, setup.widths, x.shape[0], draw=setup.lowering.draw
        )
    example_mask = None if batch.weight is None else batch.weight > 0

    def loss_fn(params):
        out = _apply(
            setup.model, params, state.batch_stats, x, rates=rates, masks=masks, train=True,
            example_mask=example_mask, mutable=["batch_stats"] if state.batch_stats else [],
        )  # fmt: skip
        logits, updates = out
        data = losses.data_loss(setup.loss, logits, batch.y, batch.weight)
        total = data
        if setup.penalty:
            total = total + hp.l1 * losses.l1_penalty(params) + hp.l2 * losses.l2_penalty(params)
        return total, (data, logits, updates.get("batch_stats", state.batch_stats))

    grads, (data, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    epoch_now = state.step.astype(jnp.float32) / setup.steps_per_epoch
    hyper = optim.current_hyperparams(
        setup.optimizer, hp.opt, epoch_now, setup.epochs, state.plateau.scale
    )
    opt_state = optim.set_hyperparams(state.opt_state, hyper)
    params, opt_state = setup.lowering.update(setup.optimizer, grads, opt_state, state.params)
    weight = jnp.float32(x.shape[0]) if batch.weight is None else batch.weight.sum()
    skipped = None
    if setup.skip_nonfinite:  # like optax.apply_if_finite: a bad step changes nothing but `step`
        ok = jnp.isfinite(data) & _all_finite(grads)
        params, opt_state, batch_stats = jax.tree_util.tree_map(
            lambda new, old: jnp.where(ok, new, old),
            (params, opt_state, batch_stats),
            (state.params, state.opt_state, state.batch_stats),
        )
        weight, skipped = jnp.where(ok, weight, 0.0), ~ok
    metrics = {
        "loss": data,
        "accuracy": losses.accuracy(logits, batch.y, batch.weight),
        "weight": weight,  # 0 for a skipped step: it is left out of the epoch's means
        **({} if skipped is None else {"skipped": skipped}),
    }
    new = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats
    )
    return new, metrics


def epoch_order(setup: Setup, key: PRNGKey, epoch: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Minibatch indices (steps, B) for one epoch and their weights (None: no padding)."""
    n, b, steps = setup.n_train, setup.batch_size, setup.steps_per_epoch
    perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 1), epoch), n)
    pad = steps * b - n
    if pad == 0:
        return perm.reshape(steps, b).astype(jnp.int32), None
    idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(steps, b)
    weights = (jnp.arange(steps * b) < n).astype(jnp.float32).reshape(steps, b)
    return idx.astype(jnp.int32), weights


def _all_finite(tree) -> jax.Array:
    return jnp.stack([jnp.isfinite(v).all() for v in jax.tree_util.tree_leaves(tree)]).all()


@_lowered
def train_epoch(setup: Setup, state: TrainState, train: Batch, hp: HParams):
    """One pass over ``train`` as a ``lax.scan``; returns (state, epoch-mean metrics).

    ``nonfinite_step`` is the 1-based step number (counted from the run's start) of the
    epoch's first step whose loss was NaN/Inf, else the epoch's last step if the
    parameters ended non-finite, else 0; ``skipped_steps`` (with
    ``setup.skip_nonfinite``) counts the steps skipped."""
    idx, weights = epoch_order(setup, state.key, state.epoch)

    def body(st, xs):
        i, w = xs
        x = setup.lowering.take_rows(train.x, i)
        return train_step(setup, st, Batch(x, train.y[i], w), hp)

    state, m = jax.lax.scan(body, state, (idx, weights))
    return state, epoch_metrics(setup, state, m)


def epoch_metrics(setup: Setup, state: TrainState, m: dict[str, jax.Array]):
    """The epoch's means from the per-step metrics ``m`` (each (steps,)) of ``train_step``."""
    w, loss = m["weight"], m["loss"]
    bad = ~jnp.isfinite(loss) & (w > 0)  # (steps,) steps that were applied with a bad loss
    if setup.skip_nonfinite:
        loss = jnp.where(w > 0, loss, 0.0)
    out = {
        "train_loss": (loss * w).sum() / w.sum(),
        "train_accuracy": (m["accuracy"] * w).sum() / w.sum(),
        "nonfinite_step": jnp.where(
            bad.any(),
            state.step - bad.shape[0] + jnp.argmax(bad) + 1,
            jnp.where(_all_finite(state.params), 0, state.step),
        ),
    }
    if setup.skip_nonfinite:
        out["skipped_steps"] = m["skipped"].sum()
    return out


def chunked_logits(
    model: Model,
    params,
    batch_stats,
    rates,
    x,
    batch_size: int,
    masks=None,
    lowered: Lowering = XLA,
) -> jax.Array:
    """Logits (N, C) of the deterministic network (or of the fixed subnetwork ``masks``),
    computed ``batch_size`` rows at a time so memory stays bounded whatever N (traceable;
    ``lowered``: how, see ``jaxdl.lowering``)."""
    n = x.shape[0]
    b = min(batch_size, n)
    steps = math.ceil(n / b)
    idx = jnp.minimum(jnp.arange(steps * b), n - 1).reshape(steps, b)
    out = jax.lax.map(
        lambda i: _apply(
            model, params, batch_stats, lowered.take_rows(x, i), rates=rates, masks=masks
        ),
        idx,
    )
    return out.reshape(steps * b, -1)[:n]


def evaluate_arrays(
    setup: Setup, params, batch_stats, rates, x, y, masks=None
) -> dict[str, jax.Array]:
    """Mean loss and accuracy over (x, y) (traceable)."""
    logits = chunked_logits(
        setup.model, params, batch_stats, rates, x, setup.eval_batch_size, masks, setup.lowering
    )
    return {
        "loss": losses.data_loss(setup.loss, logits, y),
        "accuracy": losses.accuracy(logits, y),
    }


def probe_stats(setup: Setup, params, batch_stats, rates, x, y, masks=None) -> dict[str, jax.Array]:
    """Diagnostics on a fixed probe batch with the deterministic network, once per epoch:

    - ``grad_norm/<layer>``: norm of the data-loss gradient per layer (taken here rather
      than at every step, where the extra reductions cost about a tenth of the epoch);
    - ``act_std/<layer>``, and ``dead_fraction/<layer>`` (ReLU units never positive) or
      ``saturated_fraction/<layer>`` (sigmoid outside (0.01, 0.99), tanh |h| > 0.99).
    """

    def loss(p):
        logits, inter = _apply(
            setup.model, p, batch_stats, x, rates=rates, masks=masks, mutable=["intermediates"]
        )
        return losses.data_loss(setup.loss, logits, y), inter["intermediates"]

    grads, inter = jax.grad(loss, has_aux=True)(params)
    out = {f"grad_norm/{k}": v for k, v in layer_norms(grads).items()}
    act = setup.model.activation
    for sown, (h,) in inter.items():
        name = sown.removeprefix("act_")
        h = h.reshape(h.shape[0], -1)
        out[f"act_std/{name}"] = h.std()
        if act == "relu":
            out[f"dead_fraction/{name}"] = (h.max(axis=0) <= 0).mean()
        elif act == "sigmoid":
            out[f"saturated_fraction/{name}"] = ((h < 0.01) | (h > 0.99)).mean()
        elif act == "tanh":
            out[f"saturated_fraction/{name}"] = (jnp.abs(h) > 0.99).mean()
    return out


def run_epoch(setup: Setup, state: TrainState, train: Batch, valid: Batch | None, hp: HParams):
    """A training epoch, then validation, schedules and early stopping (all traced)."""
    state, metrics = train_epoch(setup, state, train, hp)
    return end_epoch(setup, state, metrics, train, valid, hp)


@_lowered
def end_epoch(setup: Setup, state: TrainState, metrics, train: Batch, valid: Batch | None, hp):
    """After an epoch's steps: validation, probe statistics, schedules, early stopping."""
    # A fixed subnetwork is evaluated as itself; otherwise the deterministic network.
    rates = state.rates if hp.masks is None else hp.dropout
    variables = (state.params, state.batch_stats, rates)
    if valid is not None:
        ev = evaluate_arrays(setup, *variables, valid.x, valid.y, hp.masks)
        metrics["val_loss"], metrics["val_accuracy"] = ev["loss"], ev["accuracy"]
    probe = train.x[: setup.probe_size], train.y[: setup.probe_size]
    metrics.update(probe_stats(setup, *variables, *probe, hp.masks))
    metrics["learning_rate"] = optim.get_hyperparams(state.opt_state)["learning_rate"]
    epoch = state.epoch + 1
    plateau = state.plateau
    if setup.optimizer.schedule == "plateau":
        watched = metrics["val_loss" if valid is not None else "train_loss"]
        plateau = stopping.update_plateau(
            plateau, watched, epoch, hp.opt["lr_decay"], hp.opt["lr_patience"]
        )
    es = state.stopping
    if setup.early_stopping is not None:
        value = stopping.score(setup.early_stopping.monitor, metrics)
        es = stopping.update_stopping(es, value, epoch, state.params, state.batch_stats)
    return state.replace(epoch=epoch, plateau=plateau, stopping=es), metrics


class Programs(NamedTuple):
    """The compiled functions of one ``Setup`` and how often each was traced."""

    init: Callable
    epoch: Callable
    traces: collections.Counter
    executables: dict


def _counted(traces: collections.Counter, name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args):
        traces[name] += 1  # runs only while tracing
        return fn(*args)

    return wrapper


@functools.lru_cache(maxsize=32)
def programs(setup: Setup) -> Programs:
    """Jitted ``init_state`` and ``run_epoch`` for ``setup`` (cached per setup)."""
    traces: collections.Counter = collections.Counter()
    return Programs(
        init=jax.jit(_counted(traces, "init", functools.partial(init_state, setup))),
        epoch=jax.jit(
            _counted(traces, "epoch", functools.partial(run_epoch, setup)),
            donate_argnums=0,
            compiler_options=devices.compiler_options(),
        ),
        traces=traces,
        executables={},
    )


def compiled(progs: Programs, *args) -> tuple[Callable, float]:
    """``progs.epoch`` compiled for these arguments' shapes (and shardings), with the
    seconds compiling took (0.0 when it was compiled before)."""
    sig = (
        jax.tree_util.tree_structure(args),
        tuple(
            (a.shape, a.dtype, getattr(a, "sharding", None))
            for a in jax.tree_util.tree_leaves(args)
        ),
    )
    if sig in progs.executables:
        return progs.executables[sig], 0.0
    t0 = time.perf_counter()
    exe = progs.epoch.lower(*args).compile()
    progs.executables[sig] = exe
    return exe, time.perf_counter() - t0


def compile_epoch(setup: Setup, *args) -> tuple[Callable, float]:
    """The compiled single-run epoch of ``setup`` for these arguments (see ``compiled``)."""
    return compiled(programs(setup), *args)


def as_key(seed_or_key: int | jax.Array) -> PRNGKey:
    """A PRNG key from an int seed (or a key, returned as is)."""
    if isinstance(seed_or_key, int | np.integer):
        return jax.random.key(int(seed_or_key))
    return seed_or_key


def to_device(ds: Dataset) -> Batch:
    return Batch(jnp.asarray(ds.x, jnp.float32), jnp.asarray(ds.y, jnp.int32))


def check_data(ds: Dataset, what: str, num_classes: int, feature_shape=None) -> Dataset:
    x = validate.features(f"{what} x", ds.x, feature_shape)
    y = validate.labels(f"{what} y", ds.y, num_classes, n=x.shape[0])
    return Dataset(x.astype(np.float32, copy=False), y.astype(np.int32, copy=False))


@dataclasses.dataclass
class FitInfo:
    """Timings of a ``fit`` (host side)."""

    compile_seconds: float = 0.0
    train_seconds: float = 0.0
    samples_seen: int = 0
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.train_seconds if self.train_seconds else 0.0


def fit(
    model: Model,
    optimizer: Optimizer,
    train: Dataset,
    *,
    epochs: int,
    batch_size: int = 100,
    key: int | PRNGKey = 0,
    validation: Dataset | None = None,
    early_stopping: EarlyStopping | None = None,
    loss: str = "cross_entropy",
    l1: float = 0.0,
    l2: float = 0.0,
    dropout: float | Sequence[float] | None = None,
    input_noise: float = 0.0,
    init_scale: float | None = None,
    eval_batch_size: int = 1000,
    on_epoch: Callable[[int, Mapping[str, float]], None] | None = None,
    info: FitInfo | None = None,
    skip_nonfinite: bool = False,
    checkpointer: Checkpointer | None = None,
    kernels: str = "auto",
) -> tuple[TrainState, dict[str, list[float]]]:
    """Trains ``model`` and returns ``(state, history)``.

    ``history[metric]`` has one float per epoch run. With ``early_stopping`` the loop ends
    once it triggers and, with ``restore_best``, ``state.params`` are the best epoch's.
    ``on_epoch(epoch, metrics)`` is called on the host after each epoch (progress,
    logging). ``info``, if given, receives compile and training times. A NaN/Inf loss
    raises ``NonFiniteError``, unless ``skip_nonfinite`` skips such steps. With a
    ``checkpointer`` (``jaxdl.checkpoint``) the run is saved as it goes; see ``fit_state``.
    ``kernels`` (``"auto"``, ``"on"``, ``"off"``): whether the CPU kernels lower the
    compiled epoch (``jaxdl.lowering``); the trained values do not depend on it beyond
    float rounding.
    """
    setup, hp = prepare(
        model, optimizer, train, epochs=epochs, batch_size=batch_size, validation=validation,
        early_stopping=early_stopping, loss=loss, l1=l1, l2=l2, dropout=dropout,
        input_noise=input_noise, init_scale=init_scale, eval_batch_size=eval_batch_size,
        skip_nonfinite=skip_nonfinite, kernels=kernels,
    )  # fmt: skip
    state = programs(setup).init(as_key(key), hp)
    return fit_state(
        setup, state, hp, train, validation, on_epoch=on_epoch, info=info, checkpointer=checkpointer
    )


def prepare(
    model: Model,
    optimizer: Optimizer,
    train: Dataset,
    *,
    epochs: int,
    batch_size: int,
    validation: Dataset | None = None,
    early_stopping: EarlyStopping | None = None,
    loss: str = "cross_entropy",
    l1: float = 0.0,
    l2: float = 0.0,
    dropout: float | Sequence[float] | None = None,
    input_noise: float = 0.0,
    init_scale: float | None = None,
    eval_batch_size: int = 1000,
    skip_nonfinite: bool = False,
    kernels: str = "auto",
) -> tuple[Setup, HParams]:
    """Validates everything on the host and splits it into (static Setup, traced HParams).
    ``kernels`` is resolved here, once (``jaxdl.lowering.resolve``), into ``Setup.lowering``."""
    lowered = lowering.resolve(kernels)
    if not isinstance(optimizer, Optimizer):
        validate.fail(
            "optimizer", "an Optimizer from jaxdl.make_optimizer", type(optimizer).__name__
        )
    models.check_model(model)
    validate.choice("loss", loss, losses.LOSSES)
    train = check_data(train, "train", model.num_classes)
    feature_shape = tuple(train.x.shape[1:])
    if validation is not None:
        validation = check_data(validation, "validation", model.num_classes, feature_shape)
    if isinstance(model, models.CNN) and math.prod(feature_shape) != math.prod(model.image_shape):
        validate.fail("train x shape", f"images of {model.image_shape} values", train.x.shape)
    validate.positive_int("epochs", epochs)
    validate.positive_int("batch_size", batch_size)
    validate.positive_int("eval_batch_size", eval_batch_size)
    n = train.x.shape[0]
    if batch_size > n:
        validate.fail("batch_size", f"at most the {n} training examples", batch_size)
    if (
        early_stopping is not None
        and early_stopping.monitor.startswith("val_")
        and validation is None
    ):
        validate.fail(
            "early stopping", "validation data to monitor " + early_stopping.monitor, None
        )
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *feature_shape)))
    optim.check_layers(optimizer, list(shapes["params"]))
    hp = make_hparams(
        model, optimizer, feature_shape, l1=l1, l2=l2, dropout=dropout,
        input_noise=input_noise, init_scale=init_scale,
    )  # fmt: skip
    setup = Setup(
        model=model,
        optimizer=optimizer,
        feature_shape=feature_shape,
        n_train=n,
        batch_size=batch_size,
        epochs=epochs,
        loss=loss,
        dropout=bool(np.any(np.asarray(hp.dropout) > 0)),
        input_noise=input_noise > 0,
        penalty=l1 > 0 or l2 > 0,
        early_stopping=early_stopping,
        eval_batch_size=eval_batch_size,
        probe_size=min(1000, n),
        skip_nonfinite=bool(skip_nonfinite),
        lowering=lowered,
    )
    return setup, hp


def fit_state(
    setup: Setup,
    state: TrainState,
    hp: HParams,
    train: Dataset,
    validation: Dataset | None = None,
    *,
    on_epoch: Callable[[int, Mapping[str, float]], None] | None = None,
    on_state: Callable[[int, TrainState], None] | None = None,
    info: FitInfo | None = None,
    checkpointer: Checkpointer | None = None,
    history: Mapping[str, Sequence[float]] | None = None,
) -> tuple[TrainState, dict[str, list[float]]]:
    """Runs the epochs from ``state.epoch`` to ``setup.epochs`` (or until stopped).

    ``on_epoch(epoch, metrics)`` and ``on_state(epoch, state)`` are called on the host
    after each epoch. ``history``: the metrics of the epochs before ``state.epoch`` (a
    resumed run); the returned history continues it. A NaN/Inf loss or non-finite
    parameters raise ``NonFiniteError`` naming the epoch and step, before that epoch is
    checkpointed. ``checkpointer`` (``jaxdl.checkpoint.Checkpointer``) saves ``state``
    and the history after each epoch that is due (the last one as ``final_state``: the
    result's parameters), and stops the run (``Interrupted``) once a caught signal is
    saved.
    """
    info = FitInfo() if info is None else info
    tr = to_device(train)
    va = None if validation is None else to_device(validation)
    exe, info.compile_seconds = compile_epoch(setup, state, tr, va, hp)
    history = collections.defaultdict(list, {k: list(v) for k, v in (history or {}).items()})
    stopped = state.stopping is not None and bool(state.stopping.stopped)
    for epoch in range(int(state.epoch) + 1, setup.epochs + 1):
        if stopped:  # a resumed run that had already stopped early
            break
        t0 = time.perf_counter()
        state, metrics = exe(state, tr, va, hp)
        metrics = jax.device_get(metrics)
        bad_step = int(metrics.pop("nonfinite_step"))
        metrics = {k: float(v) for k, v in metrics.items()}
        dt = time.perf_counter() - t0
        info.epoch_seconds.append(dt)
        info.train_seconds += dt
        info.samples_seen += setup.n_train
        for k, v in metrics.items():
            history[k].append(v)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if on_state is not None:  # e.g. weight histograms (jaxdl.tracking)
            on_state(epoch, state)
        if bad_step or not all(math.isfinite(metrics.get(k, 0.0)) for k in _LOSSES):
            raise NonFiniteError(setup, epoch, bad_step or int(state.step), metrics, dict(history))
        stopped = state.stopping is not None and bool(state.stopping.stopped)
        if checkpointer is not None:
            es = setup.early_stopping
            score = None if es is None else -float(stopping.score(es.monitor, metrics))
            best = state.stopping is not None and int(state.stopping.tracker.best_epoch) == epoch
            last = stopped or epoch == setup.epochs
            # The last checkpoint holds the run's result (best epoch restored) as its
            # params, so a reader of the checkpoint alone gets the weights jaxdl reports.
            checkpointer.after_epoch(
                epoch, final_state(setup, state) if last else state, dict(history),
                score=score, best=best, last=last,
            )  # fmt: skip
    return final_state(setup, state), dict(history)


def final_state(setup: Setup, state: TrainState) -> TrainState:
    """The state a finished run returns: with early stopping's ``restore_best``, the best
    epoch's parameters and batch statistics (kept in ``state.stopping``)."""
    es = setup.early_stopping
    if es is not None and es.restore_best and int(state.stopping.tracker.best_epoch) > 0:
        state = state.replace(
            params=state.stopping.best_params, batch_stats=state.stopping.best_batch_stats
        )
    return state


_LOSSES = ("train_loss", "val_loss")


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or parameters. ``epoch`` and ``step`` (1-based,
    counted from the run's start) say where; ``history`` holds every epoch run, the bad
    one last."""

    def __init__(self, setup: Setup, epoch: int, step: int, metrics, history) -> None:
        self.epoch, self.step, self.history = epoch, step, history
        finite = {k: math.isfinite(metrics.get(k, 0.0)) for k in _LOSSES}
        what = ("training loss" if not finite["train_loss"] else
                "validation loss" if not finite["val_loss"] else "parameters")  # fmt: skip
        batch = step - (epoch - 1) * setup.steps_per_epoch
        super().__init__(
            f"{what} became NaN/Inf at epoch {epoch}, step {step} "
            f"(batch {batch} of {setup.steps_per_epoch})"
        )


def best_epoch(state: TrainState) -> int | None:
    """The 1-based epoch early stopping kept (None without early stopping)."""
    return None if state.stopping is None else int(state.stopping.tracker.best_epoch)


_predict_logits = jax.jit(chunked_logits, static_argnames=("model", "batch_size"))


def predict(model: Model, state: TrainState, x, *, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities (N, num_classes) of the deterministic network."""
    x = validate.features("x", x)
    logits = _predict_logits(
        model, state.params, state.batch_stats, state.rates, jnp.asarray(x, jnp.float32), batch_size
    )
    return np.asarray(jax.nn.softmax(logits))


def evaluate(
    model: Model, state: TrainState, data: Dataset, *, loss: str = "cross_entropy", batch_size=1000
) -> dict[str, float]:
    """Mean loss and accuracy of the deterministic network on ``data``."""
    data = check_data(data, "data", model.num_classes)
    x = jnp.asarray(data.x)
    logits = _predict_logits(model, state.params, state.batch_stats, state.rates, x, batch_size)
    y = jnp.asarray(data.y)
    return {
        "loss": float(losses.data_loss(validate.choice("loss", loss, losses.LOSSES), logits, y)),
        "accuracy": float(losses.accuracy(logits, y)),
    }
