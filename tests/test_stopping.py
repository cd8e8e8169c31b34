"""Early stopping and halve-on-plateau on scripted metric curves, alone, under vmap and
through ``fit``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl
from jaxdl import stopping, train
from jaxdl.stopping import EarlyStopping
from jaxdl.validate import InputError

NAN = math.nan


def _params(epoch: int):
    """Parameters that say which epoch produced them."""
    return {"layer_0": {"kernel": jnp.full((2, 2), epoch, jnp.float32)}}


def _run(curve, patience, min_delta=0.0, monitor="val_loss"):
    """Feeds ``curve`` one epoch at a time, as ``fit`` does, until stopped.

    Returns (epochs run, final state)."""
    cfg = EarlyStopping(monitor=monitor, patience=patience, min_delta=min_delta)
    s = stopping.init_stopping(cfg, _params(0), {})
    for epoch, value in enumerate(curve, start=1):
        score = stopping.score(monitor, {monitor: jnp.float32(value)})
        s = stopping.update_stopping(s, score, epoch, _params(epoch), {})
        if bool(s.stopped):
            return epoch, s
    return len(curve), s


def _kept_epoch(s) -> float:
    kernel = np.asarray(s.best_params["layer_0"]["kernel"])
    assert np.all(kernel == kernel.flat[0])
    return float(kernel.flat[0])


def test_stops_after_patience_epochs_without_improvement():
    curve = [1.0, 0.8, 0.7, 0.75, 0.72, 0.9, 0.6, 0.5]
    ran, s = _run(curve, patience=3)
    assert ran == 6
    assert int(s.tracker.best_epoch) == 3
    assert float(s.tracker.best) == pytest.approx(0.7)
    assert _kept_epoch(s) == 3.0
    assert int(s.tracker.wait) == 3


def test_patience_counts_epochs_since_the_last_improvement():
    # improvements at 1, 2, 5: each one restarts the count
    ran, s = _run([1.0, 0.9, 0.95, 0.92, 0.85, 0.86, 0.87, 0.88, 0.1], patience=3)
    assert (ran, int(s.tracker.best_epoch), _kept_epoch(s)) == (8, 5, 5.0)
    ran, s = _run([1.0, 0.9, 0.8, 0.7], patience=1)
    assert (ran, int(s.tracker.best_epoch), bool(s.stopped)) == (4, 4, False)


def test_mode_max_for_accuracy():
    assert stopping.MONITORS["val_accuracy"] == "max"
    assert float(stopping.score("val_accuracy", {"val_accuracy": jnp.float32(0.75)})) == -0.75
    assert float(stopping.score("val_loss", {"val_loss": jnp.float32(0.75)})) == 0.75
    # 0.66 twice: an equal value is not an improvement
    curve = [0.5, 0.6, 0.65, 0.64, 0.66, 0.66, 0.65, 0.9]
    ran, s = _run(curve, patience=2, monitor="val_accuracy")
    assert ran == 7
    assert int(s.tracker.best_epoch) == 5
    assert float(s.tracker.best) == pytest.approx(-0.66)
    assert _kept_epoch(s) == 5.0


def test_min_delta_requires_a_large_enough_improvement():
    curve = [1.0, 0.97, 0.94, 0.9, 0.895, 0.5]
    ran, s = _run(curve, patience=2, min_delta=0.05)
    # 0.97 is within 0.05 of 1.0; 0.94 is not (improvement); 0.9 and 0.895 are within 0.05.
    assert (ran, int(s.tracker.best_epoch), _kept_epoch(s)) == (5, 3, 3.0)
    assert float(s.tracker.best) == pytest.approx(0.94)
    ran, s = _run(curve, patience=2)  # every decrease counts without min_delta
    assert (ran, int(s.tracker.best_epoch), bool(s.stopped)) == (6, 6, False)


def test_nan_never_counts_as_improvement():
    ran, s = _run([1.0, NAN, NAN, 0.9], patience=3)
    assert (ran, int(s.tracker.best_epoch), float(s.tracker.best)) == (4, 4, pytest.approx(0.9))
    ran, s = _run([1.0, NAN, NAN], patience=2)
    assert (ran, bool(s.stopped), int(s.tracker.best_epoch), _kept_epoch(s)) == (3, True, 1, 1.0)
    ran, s = _run([NAN, NAN], patience=5, monitor="val_accuracy")
    assert int(s.tracker.best_epoch) == 0
    assert int(s.tracker.wait) == 2
    assert float(s.tracker.best) == math.inf
    assert _kept_epoch(s) == 0.0  # the initial parameters
    ran, s = _run([NAN, 2.0], patience=5)
    assert (int(s.tracker.best_epoch), float(s.tracker.best)) == (2, 2.0)


def test_track_reports_improvement():
    t = stopping.init_tracker()
    t, improved = stopping.track(t, jnp.float32(1.0), 1, 0.0)
    assert bool(improved) and int(t.best_epoch) == 1 and int(t.wait) == 0
    t, improved = stopping.track(t, jnp.float32(1.0), 2, 0.0)
    assert not bool(improved) and int(t.best_epoch) == 1 and int(t.wait) == 1
    assert t.best.dtype == jnp.float32 and t.best_epoch.dtype == jnp.int32


# Three members; each stops before any later improvement, so the full curve can be fed.
VMAP_CURVES = np.array(
    [
        [1.0, 0.8, 0.7, 0.75, 0.72, 0.9, 0.95, 0.99],  # patience 3 -> stops at 6, best 3
        [0.5, 0.6, 0.4, 0.45, 0.41, 0.42, 0.43, 0.44],  # patience 2 -> stops at 5, best 3
        [2.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # patience 1 -> never stops, best 8
    ],
    np.float32,
)
VMAP_PATIENCE = np.array([3, 2, 1], np.int32)
VMAP_ANSWERS = [(6, 3), (5, 3), (None, 8)]  # (first stopped epoch, best epoch)


def test_update_stopping_under_vmap():
    members = len(VMAP_PATIENCE)
    one = stopping.init_stopping(EarlyStopping(patience=1), _params(0), {})
    s = jax.tree_util.tree_map(lambda x: jnp.stack([x] * members), one)
    s = s._replace(patience=jnp.asarray(VMAP_PATIENCE))
    step = jax.jit(jax.vmap(stopping.update_stopping, in_axes=(0, 0, None, 0, None)))
    first_stop = [None] * members
    for epoch in range(1, VMAP_CURVES.shape[1] + 1):
        params = jax.tree_util.tree_map(
            lambda x, e=epoch: jnp.stack([x + 10 * m for m in range(members)]), _params(epoch)
        )
        s = step(s, jnp.asarray(VMAP_CURVES[:, epoch - 1]), epoch, params, {})
        for m in range(members):
            if first_stop[m] is None and bool(s.stopped[m]):
                first_stop[m] = epoch
    for m, (stop, best) in enumerate(VMAP_ANSWERS):
        assert first_stop[m] == stop, m
        assert bool(s.stopped[m]) == (stop is not None)
        assert int(s.tracker.best_epoch[m]) == best, m
        kept = np.asarray(s.best_params["layer_0"]["kernel"][m])
        np.testing.assert_array_equal(kept, best + 10 * m)
        # same answer as a single run
        ran, single = _run(VMAP_CURVES[m], int(VMAP_PATIENCE[m]))
        assert int(single.tracker.best_epoch) == best
        assert ran == (stop or VMAP_CURVES.shape[1])


def test_stopped_member_keeps_its_best_epoch():
    s = stopping.init_stopping(EarlyStopping(patience=2), _params(0), {})
    for epoch, value in enumerate([1.0, 1.1, 1.2, 0.5], start=1):
        s = stopping.update_stopping(s, jnp.float32(value), epoch, _params(epoch), {})
    assert bool(s.stopped)
    assert int(s.tracker.best_epoch) == 1
    assert _kept_epoch(s) == 1.0


def test_plateau_halves_the_scale_and_restarts_the_wait():
    curve = [1.0, 0.9, 0.95, 0.93, 0.92, 0.91, 0.8, 0.85, 0.86, 0.87]
    want_scale = [1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125, 0.125]
    want_wait = [0, 0, 1, 0, 1, 0, 0, 1, 0, 1]
    p = stopping.init_plateau()
    assert float(p.scale) == 1.0
    for epoch, value in enumerate(curve, start=1):
        p = stopping.update_plateau(p, jnp.float32(value), epoch, jnp.float32(0.5), jnp.float32(2))
        assert float(p.scale) == want_scale[epoch - 1], epoch
        assert int(p.tracker.wait) == want_wait[epoch - 1], epoch
        assert p.scale.dtype == jnp.float32
    assert int(p.tracker.best_epoch) == 7


def test_plateau_scale_sets_the_learning_rate():
    opt = jaxdl.make_optimizer("sgd", schedule="plateau", learning_rate=0.2)
    base = {k: jnp.float32(v) for k, v in opt.hyperparams.items()}
    p = stopping.init_plateau()
    for epoch, value in enumerate([1.0, 1.0, 1.0], start=1):
        p = stopping.update_plateau(p, jnp.float32(value), epoch, base["lr_decay"], 2.0)
    hyper = jaxdl.optim.current_hyperparams(opt, base, jnp.float32(3.0), 10, p.scale)
    assert float(hyper["learning_rate"]) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (
            {"monitor": "val_los"},
            ["early stopping monitor", "'val_los'", "did you mean 'val_loss'"],
        ),
        ({"monitor": "accuracy"}, ["early stopping monitor", "'accuracy'"]),
        ({"patience": 0}, ["patience", "integer > 0", "got 0"]),
        ({"patience": 2.5}, ["patience"]),
        ({"min_delta": -0.1}, ["min_delta", ">= 0"]),
    ],
)
def test_early_stopping_config_errors(kwargs, words):
    with pytest.raises(InputError) as err:
        EarlyStopping(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_fit_stops_early_and_restores_the_best_epoch():
    data = jaxdl.synthetic_splits(
        64, 128, 8, num_features=20, num_classes=3, seed=0, separation=1.5
    )
    model = jaxdl.MLP(hidden=(64, 64), num_classes=3)
    opt = jaxdl.make_optimizer("adam", learning_rate=1e-2)
    epochs = 100
    state, history = jaxdl.fit(
        model, opt, data.train, epochs=epochs, batch_size=32, validation=data.valid,
        early_stopping=EarlyStopping(patience=2),
    )  # fmt: skip
    val = history["val_loss"]
    assert len(val) < epochs
    assert len(history["train_loss"]) == len(val)
    best = train.best_epoch(state)
    assert best == 1 + int(np.argmin(val))
    assert len(val) == best + 2  # stopped after `patience` epochs without improvement
    assert min(val[best:]) >= val[best - 1]
    ev = train.evaluate(model, state, data.valid)
    np.testing.assert_allclose(ev["loss"], val[best - 1], rtol=1e-5)
    np.testing.assert_allclose(ev["accuracy"], history["val_accuracy"][best - 1], rtol=1e-6)


def test_plateau_with_zero_patience_decays_only_on_epochs_without_improvement():
    p = stopping.init_plateau()
    scales = []
    for epoch, value in enumerate([1.0, 0.9, 0.95, 0.8], start=1):
        p = stopping.update_plateau(p, jnp.float32(value), epoch, 0.5, 0)
        scales.append(float(p.scale))
    assert scales == [1.0, 1.0, 0.5, 0.5]
