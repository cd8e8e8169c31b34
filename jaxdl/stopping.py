"""Early stopping and halve-on-plateau as jittable state (they work under ``vmap``).

Both watch one metric per epoch through a ``Tracker``. Nothing here branches in Python
on a traced value: ``stopped`` is a boolean array, and the best parameters are kept with
``jnp.where`` so a vmapped sweep can carry one tracker per member.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxdl import validate

MONITORS = {"val_loss": "min", "val_accuracy": "max", "train_loss": "min", "train_accuracy": "max"}


class Tracker(NamedTuple):
    """Best value so far of a metric, stored as a score to minimise."""

    best: jax.Array  # () float32, +inf before the first epoch
    best_epoch: jax.Array  # () int32, 1-based; 0 before the first epoch
    wait: jax.Array  # () int32, epochs since the last improvement


def init_tracker() -> Tracker:
    return Tracker(
        jnp.array(jnp.inf, jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
    )


def track(t: Tracker, score: jax.Array, epoch: jax.Array, min_delta) -> tuple[Tracker, jax.Array]:
    """Updates ``t`` with this epoch's ``score`` (lower is better). NaN never improves."""
    improved = score < t.best - min_delta
    return (
        Tracker(
            best=jnp.where(improved, score, t.best),
            best_epoch=jnp.where(improved, epoch, t.best_epoch).astype(jnp.int32),
            wait=jnp.where(improved, 0, t.wait + 1).astype(jnp.int32),
        ),
        improved,
    )


def score(monitor: str, metrics: dict[str, jax.Array]) -> jax.Array:
    """The monitored metric as a score to minimise."""
    value = metrics[monitor]
    return value if MONITORS[monitor] == "min" else -value


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Settings: stop after ``patience`` epochs without an improvement > ``min_delta``
    in ``monitor``; with ``restore_best``, ``fit`` returns the best epoch's parameters.
    ``patience=None`` never stops early but still keeps the best epoch (model selection
    on the validation set, like Keras' ``ModelCheckpoint(save_best_only=True)``)."""

    monitor: str = "val_loss"
    patience: int | None = 5
    min_delta: float = 0.0
    restore_best: bool = True

    def __post_init__(self):
        validate.choice("early stopping monitor", self.monitor, MONITORS)
        if self.patience is not None:
            validate.positive_int("patience", self.patience)
        validate.positive("min_delta", self.min_delta, allow_zero=True)


class StoppingState(NamedTuple):
    tracker: Tracker
    stopped: jax.Array  # () bool
    patience: jax.Array  # () int32 (traced, so it can be swept)
    min_delta: jax.Array  # () float32
    best_params: Any
    best_batch_stats: Any


def init_stopping(cfg: EarlyStopping, params, batch_stats) -> StoppingState:
    return StoppingState(
        tracker=init_tracker(),
        stopped=jnp.zeros((), bool),
        patience=jnp.asarray(
            jnp.iinfo(jnp.int32).max if cfg.patience is None else cfg.patience, jnp.int32
        ),
        min_delta=jnp.asarray(cfg.min_delta, jnp.float32),
        best_params=params,
        best_batch_stats=batch_stats,
    )


def update_stopping(
    s: StoppingState, value: jax.Array, epoch, params, batch_stats
) -> StoppingState:
    """One epoch of early stopping; ``value`` is the score (lower is better).

    Once stopped, the state no longer changes (a vmapped sweep may run a stopped member
    on, frozen, until every member is done)."""
    tracker, improved = track(s.tracker, value, epoch, s.min_delta)
    improved = improved & ~s.stopped
    tracker = jax.tree_util.tree_map(lambda n, o: jnp.where(s.stopped, o, n), tracker, s.tracker)

    def keep(new, old):
        return jax.tree_util.tree_map(lambda a, b: jnp.where(improved, a, b), new, old)

    return s._replace(
        tracker=tracker,
        stopped=s.stopped | (tracker.wait >= s.patience),
        best_params=keep(params, s.best_params),
        best_batch_stats=keep(batch_stats, s.best_batch_stats),
    )


class PlateauState(NamedTuple):
    """Halve-on-plateau: ``scale`` multiplies the base learning rate."""

    tracker: Tracker
    scale: jax.Array  # () float32


def init_plateau() -> PlateauState:
    return PlateauState(init_tracker(), jnp.ones((), jnp.float32))


def update_plateau(p: PlateauState, value, epoch, factor, patience) -> PlateauState:
    """After ``patience`` epochs without improvement, scale *= factor and wait restarts."""
    tracker, improved = track(p.tracker, value, epoch, 0.0)
    decay = ~improved & (tracker.wait >= patience)
    return PlateauState(
        tracker._replace(wait=jnp.where(decay, 0, tracker.wait).astype(jnp.int32)),
        jnp.where(decay, p.scale * factor, p.scale).astype(jnp.float32),
    )
