"""The pure training step and the scan-fused epoch: what jaxdl's programs compute.

The static ``Setup`` (model, optimizer structure, batch size, data size, loss, which
features are on) decides the compiled program; every number a user may sweep is in the
traced ``HParams``. Everything here is a pure function of arrays (jit-, vmap- and
scan-able); the host side (validation, the loop over epochs, checkpoints) is in
``jaxdl.train``, the compiled programs and their cache in ``jaxdl.compiled``.

An epoch is one ``lax.scan`` over minibatches gathered from the device-resident data in
an order reshuffled every epoch from the state's key. When the data size is not a
multiple of the batch size, the last batch is padded and its padding weighted 0 (and
kept out of batch-norm statistics), so every example is seen exactly once per epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util

from jaxdl import contract, inits, losses, models, optim, stopping, ticks
from jaxdl.lowering import XLA, Lowering
from jaxdl.models import Model
from jaxdl.optim import Optimizer
from jaxdl.stopping import EarlyStopping

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
    # A model's own numbers (``contract.Hyperparameter``), by key; {} when it has none.
    numbers: dict[str, jax.Array] = {}  # noqa: RUF012 (never mutated: a pytree node)


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
    # How many times an epoch reports its progress to the host (``jaxdl.ticks``; 0: never).
    # Like the lowering: part of the program, not of what it computes.
    ticks: int = dataclasses.field(default=0, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.batch_size)

    @property
    def widths(self) -> tuple[int, ...]:
        return contract.masked_widths(self.model, self.feature_shape)


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
    # The model's own numbers (``contract.Hyperparameter``), needed wherever it is applied.
    numbers: dict[str, jax.Array] = struct.field(default_factory=dict)


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
        numbers=dict(hp.numbers),
    )


def apply_variables(params, batch_stats=None, numbers=None) -> dict[str, Any]:
    """The ``apply`` variables: parameters, batch statistics and numbers, where there are."""
    out = {"params": params}
    if batch_stats:
        out["batch_stats"] = batch_stats
    if numbers:
        out[contract.NUMBERS] = numbers
    return out


def _apply(model: Model, params, batch_stats, x, numbers=None, **kw):
    return contract.call(model, apply_variables(params, batch_stats, numbers), x, **kw)


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
            setup.model, params, state.batch_stats, x, hp.numbers, rates=rates, masks=masks, train=True,
            example_mask=example_mask, mutable=["batch_stats"] if state.batch_stats else [],
            rng=None if contract.is_net(setup.model) else jax.random.fold_in(k_mask, 1),
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
    steps = idx.shape[0]
    every = max(1, steps // setup.ticks) if setup.ticks else 0

    def body(st, xs):
        i, w, k = xs
        x = setup.lowering.take_rows(train.x, i)
        out = train_step(setup, st, Batch(x, train.y[i], w), hp)
        if every:  # after this step's update (the callback takes its loss), every few steps
            done = k + 1
            jax.lax.cond(
                (done % every == 0) & (done < steps),
                lambda: jax.debug.callback(ticks.tick, done, steps, out[1]["loss"]),
                lambda: None,
            )
        return out

    state, m = jax.lax.scan(body, state, (idx, weights, jnp.arange(steps)))
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
    numbers=None,
) -> jax.Array:
    """Logits (N, C) of the deterministic network (or of the fixed subnetwork ``masks``),
    computed ``batch_size`` rows at a time so memory stays bounded whatever N (traceable;
    ``lowered``: how, see ``jaxdl.lowering``; ``numbers``: the model's own)."""
    n = x.shape[0]
    b = min(batch_size, n)
    steps = math.ceil(n / b)
    idx = jnp.minimum(jnp.arange(steps * b), n - 1).reshape(steps, b)
    out = jax.lax.map(
        lambda i: _apply(
            model, params, batch_stats, lowered.take_rows(x, i), numbers, rates=rates, masks=masks
        ),
        idx,
    )
    return out.reshape(steps * b, -1)[:n]


def evaluate_arrays(
    setup: Setup, params, batch_stats, rates, x, y, masks=None, numbers=None
) -> dict[str, jax.Array]:
    """Mean loss and accuracy over (x, y) (traceable)."""
    logits = chunked_logits(
        setup.model, params, batch_stats, rates, x, setup.eval_batch_size, masks, setup.lowering,
        numbers,
    )  # fmt: skip
    return {
        "loss": losses.data_loss(setup.loss, logits, y),
        "accuracy": losses.accuracy(logits, y),
    }


def probe_stats(
    setup: Setup, params, batch_stats, rates, x, y, masks=None, numbers=None
) -> dict[str, jax.Array]:
    """Diagnostics on a fixed probe batch with the deterministic network, once per epoch:

    - ``grad_norm/<layer>``: norm of the data-loss gradient per layer (taken here rather
      than at every step, where the extra reductions cost about a tenth of the epoch);
    - ``act_std/<layer>``, and ``dead_fraction/<layer>`` (ReLU units never positive) or
      ``saturated_fraction/<layer>`` (sigmoid outside (0.01, 0.99), tanh |h| > 0.99).
    """

    def loss(p):
        logits, inter = _apply(
            setup.model, p, batch_stats, x, numbers, rates=rates, masks=masks,
            mutable=["intermediates"],
        )  # fmt: skip
        return losses.data_loss(setup.loss, logits, y), inter.get("intermediates", {})

    grads, inter = jax.grad(loss, has_aux=True)(params)
    out = {f"grad_norm/{k}": v for k, v in layer_norms(grads).items()}
    act = getattr(setup.model, "activation", None)
    for sown, values in traverse_util.flatten_dict(inter, sep="/").items():
        name, h = sown.removeprefix("act_"), values[-1]
        if not isinstance(h, jax.Array) or h.ndim < 2 or h.shape[0] != x.shape[0]:
            continue  # a user module's own record, not per-example activations
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
        ev = evaluate_arrays(setup, *variables, valid.x, valid.y, hp.masks, state.numbers)
        metrics["val_loss"], metrics["val_accuracy"] = ev["loss"], ev["accuracy"]
    probe = train.x[: setup.probe_size], train.y[: setup.probe_size]
    metrics.update(probe_stats(setup, *variables, *probe, hp.masks, state.numbers))
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
