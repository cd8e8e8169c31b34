"""One training run on the host: validation of what a user gives (``prepare``), the loop
over compiled epochs (``fit``, ``fit_state``), and using the result (``predict``,
``evaluate``).

``prepare`` splits a run into the static ``Setup`` and the traced ``HParams``
(``jaxdl.step``); one program per ``Setup`` is compiled and cached (``jaxdl.compiled``), so
a second epoch or a second ``fit`` with new hyperparameter values reuses it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl import (
    contract,
    losses,
    lowering,
    models,
    optim,
    report,
    stopping,
    ticks,
    validate,
)
from jaxdl.compiled import compile_epoch, programs
from jaxdl.config import RunConfig, unknown_setting
from jaxdl.data import Dataset
from jaxdl.hparams import make_hparams
from jaxdl.models import Model
from jaxdl.optim import Optimizer
from jaxdl.step import Batch, HParams, PRNGKey, Setup, TrainState, chunked_logits

if TYPE_CHECKING:
    from jaxdl.checkpoint import Checkpointer


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
    validation: Dataset | None = None,
    key: int | PRNGKey = 0,
    on_epoch: Callable[[int, Mapping[str, float]], None] | None = None,
    info: FitInfo | None = None,
    checkpointer: Checkpointer | None = None,
    verbose: bool | None = None,
    **settings,
) -> tuple[TrainState, dict[str, list[float]]]:
    """Trains ``model`` and returns ``(state, history)``.

    ``settings``: any keyword of ``RunConfig.of`` (``batch_size``, ``early_stopping``,
    ``loss``, ``l1``, ``l2``, ``dropout``, ``dropout_input``, ``input_noise``,
    ``init_scale``, ``skip_nonfinite``, ``kernels``, an optimizer number such as
    ``learning_rate``, …); ``fit`` builds the run's ``RunConfig`` from them and
    ``prepare``s it. ``history[metric]`` has one float per epoch run. With
    ``early_stopping`` the loop ends once it triggers and, with ``restore_best``,
    ``state.params`` are the best epoch's. ``on_epoch(epoch, metrics)`` is called on the
    host after each epoch (progress, logging). ``info``, if given, receives compile and
    training times. A NaN/Inf loss raises ``NonFiniteError``, unless ``skip_nonfinite``
    skips such steps. With a ``checkpointer`` (``jaxdl.checkpoint``) the run is saved as
    it goes; see ``fit_state``. ``kernels`` (``"auto"``, ``"on"``, ``"off"``): whether the
    CPU kernels lower the compiled epoch (``jaxdl.lowering``); the trained values do not
    depend on it beyond float rounding. ``verbose``: a line per epoch on stderr (a live
    bar on a terminal); None (default): on a terminal or in Jupyter only.
    """
    seed = {"seed": int(key)} if isinstance(key, int | np.integer) else {}
    config = RunConfig.of(model, optimizer, epochs=epochs, **seed, **settings)
    setup, hp = prepare(config, train, validation)
    state = programs(setup).init(as_key(key), hp)
    show = report.interactive() if verbose is None else bool(verbose)
    with report.Progress(epochs, enabled=show) as prog, ticks.listen(prog.tick):
        setup = dataclasses.replace(setup, ticks=prog.ticks)  # a live bar moves within epochs
        state, history = fit_state(
            setup, state, hp, train, validation, info=info, checkpointer=checkpointer,
            on_epoch=each(prog.update, on_epoch),
        )  # fmt: skip
        prog.finish(len(history["train_loss"]) < epochs, best_epoch(state) or None)
    return state, history


def each(*callbacks: Callable | None) -> Callable:
    """One callback that calls each of ``callbacks`` that is not None, in order."""
    active = [c for c in callbacks if c is not None]

    def call(*args) -> None:
        for c in active:
            c(*args)

    return call


def num_classes(*datasets: Dataset | None) -> int:
    """1 + the largest integer label in ``datasets`` (at least 2)."""
    ys = [np.asarray(d.y) for d in datasets if d is not None]
    if not all(np.issubdtype(y.dtype, np.integer) and y.size for y in ys):
        return 10  # the label checks in ``prepare`` say what is wrong
    return max(2, 1 + max(int(y.max()) for y in ys))


def prepare(
    config: RunConfig, train: Dataset, validation: Dataset | None = None
) -> tuple[Setup, HParams]:
    """Validates a run on the host and splits it into (static Setup, traced HParams).

    ``config.kernels`` is resolved here, once (``jaxdl.lowering.resolve``), into
    ``Setup.lowering``. A model config without ``num_classes`` takes it from the labels.
    """
    if not isinstance(config, RunConfig):
        validate.fail("config", "a jaxdl.RunConfig (e.g. RunConfig.of(model, optimizer))",
                      type(config).__name__)  # fmt: skip
    t = config.training
    lowered = lowering.resolve(config.kernels)
    model = config.model.build(num_classes(train, validation))
    optimizer = config.optimizer.build()
    validate.choice("loss", t.loss, losses.LOSSES)
    if np.ndim(train.x) < 2:
        validate.features("train x", train.x)  # says what is wrong
    feature_shape = tuple(np.shape(train.x)[1:])
    models.check_features(model, np.shape(train.x))  # a CNN's images, named as given
    classes = contract.layout(model, feature_shape).classes  # the contract, checked here
    train = check_data(train, "train", classes)
    if validation is not None:
        validation = check_data(validation, "validation", classes, feature_shape)
    validate.positive_int("epochs", t.epochs)
    validate.positive_int("batch_size", t.batch_size)
    validate.positive_int("eval_batch_size", t.eval_batch_size)
    n = train.x.shape[0]
    if t.batch_size > n:
        validate.fail("batch_size", f"at most the {n} training examples", t.batch_size)
    es = t.early_stopping
    if es is not None and es.monitor.startswith("val_") and validation is None:
        validate.fail("early stopping", "validation data to monitor " + es.monitor, None)
    dummy = jnp.zeros((1, *feature_shape))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, train=False))
    optim.check_layers(optimizer, list(shapes["params"]))
    own = dict(contract.layout(model, feature_shape).numbers)
    for key in config.model.numbers:
        if key not in own:
            raise unknown_setting(key, own)
    r = config.regularisation
    hp = make_hparams(
        model, optimizer, feature_shape, **dataclasses.asdict(r), **config.model.numbers
    )
    setup = Setup(
        model=model,
        optimizer=optimizer,
        feature_shape=feature_shape,
        n_train=n,
        batch_size=t.batch_size,
        epochs=t.epochs,
        loss=t.loss,
        dropout=bool(np.any(np.asarray(hp.dropout) > 0)),
        input_noise=r.input_noise > 0,
        penalty=r.l1 > 0 or r.l2 > 0,
        early_stopping=es,
        eval_batch_size=t.eval_batch_size,
        probe_size=min(1000, n),
        skip_nonfinite=bool(t.skip_nonfinite),
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


_predict_logits = jax.jit(chunked_logits, static_argnames=("model", "batch_size", "lowered"))


def predict(model: Model, state: TrainState, x, *, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities (N, num_classes) of the deterministic network."""
    x = validate.features("x", x)
    logits = _predict_logits(
        model, state.params, state.batch_stats, state.rates, jnp.asarray(x, jnp.float32),
        batch_size, numbers=state.numbers,
    )  # fmt: skip
    return np.asarray(jax.nn.softmax(logits))


def evaluate(
    model: Model, state: TrainState, data: Dataset, *, loss: str = "cross_entropy", batch_size=1000
) -> dict[str, float]:
    """Mean loss and accuracy of the deterministic network on ``data``."""
    data = check_data(data, "data", contract.classes(model, np.shape(data.x)[1:]))
    x = jnp.asarray(data.x)
    logits = _predict_logits(
        model, state.params, state.batch_stats, state.rates, x, batch_size, numbers=state.numbers
    )
    y = jnp.asarray(data.y)
    return {
        "loss": float(losses.data_loss(validate.choice("loss", loss, losses.LOSSES), logits, y)),
        "accuracy": float(losses.accuracy(logits, y)),
    }
