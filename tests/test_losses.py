"""Losses, accuracy and penalties against NumPy formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl
from jaxdl import losses

RNG = np.random.default_rng(0)
LOGITS = (3.0 * RNG.normal(size=(6, 4))).astype(np.float32)
LABELS = np.array([0, 3, 1, 1, 2, 0], np.int32)


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _np_cross_entropy(logits, labels):
    return -_log_softmax(logits)[np.arange(len(labels)), labels]


def _np_mse(logits, labels):
    probs = np.exp(_log_softmax(logits))
    onehot = np.eye(logits.shape[-1])[labels]
    return ((probs - onehot) ** 2).mean(-1)


def _call(fn, logits, labels, weights=None):
    w = None if weights is None else jnp.asarray(weights, jnp.float32)
    return float(jax.jit(fn)(jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.int32), w))


def test_cross_entropy_matches_numpy():
    got = _call(losses.cross_entropy, LOGITS, LABELS)
    assert got == pytest.approx(_np_cross_entropy(LOGITS, LABELS).mean(), rel=1e-6)
    # a confident correct prediction costs ~0, a uniform one log(C)
    assert _call(losses.cross_entropy, np.zeros((2, 4)), np.array([0, 3])) == pytest.approx(
        np.log(4)
    )
    big = np.array([[50.0, 0.0, 0.0]], np.float32)
    assert _call(losses.cross_entropy, big, np.array([0])) == pytest.approx(0.0, abs=1e-6)
    assert _call(losses.cross_entropy, big, np.array([1])) == pytest.approx(50.0, rel=1e-6)


def test_mse_matches_numpy():
    got = _call(losses.mse, LOGITS, LABELS)
    assert got == pytest.approx(_np_mse(LOGITS, LABELS).mean(), rel=1e-6)
    # uniform prediction over C classes: ((1 - 1/C)^2 + (C - 1)/C^2) / C
    c = 4
    want = ((1 - 1 / c) ** 2 + (c - 1) / c**2) / c
    assert _call(losses.mse, np.zeros((3, c)), np.array([0, 1, 2])) == pytest.approx(want, rel=1e-6)


def test_accuracy():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.5]])
    labels = np.array([0, 1, 1, 2])
    assert _call(losses.accuracy, logits, labels) == pytest.approx(0.5)
    assert _call(losses.accuracy, logits, labels, [1, 1, 1, 0]) == pytest.approx(2 / 3)
    assert _call(losses.accuracy, LOGITS, LOGITS.argmax(-1)) == 1.0


@pytest.mark.parametrize("name", losses.LOSSES)
def test_padding_with_weight_zero_does_not_change_the_loss(name):
    fn = getattr(losses, name)
    pad_logits = np.array([[100.0, -100.0, 0.0, 7.0], [-30.0, 0.0, 30.0, 1.0]], np.float32)
    logits = np.concatenate([LOGITS, pad_logits])
    labels = np.concatenate([LABELS, [1, 0]]).astype(np.int32)
    weights = np.array([1] * len(LABELS) + [0, 0], np.float32)
    assert _call(fn, logits, labels, weights) == pytest.approx(_call(fn, LOGITS, LABELS), rel=1e-6)
    # the dispatcher gives the same value
    dispatched = _call(lambda *a: losses.data_loss(name, *a), logits, labels, weights)
    assert dispatched == pytest.approx(_call(fn, logits, labels, weights), rel=1e-7)


@pytest.mark.parametrize("name", losses.LOSSES)
def test_weights_give_the_weighted_mean(name):
    per_example = {"cross_entropy": _np_cross_entropy, "mse": _np_mse}[name](LOGITS, LABELS)
    w = np.array([2.0, 1.0, 0.5, 0.0, 3.0, 1.5])
    want = (per_example * w).sum() / w.sum()
    assert _call(getattr(losses, name), LOGITS, LABELS, w) == pytest.approx(want, rel=1e-6)


def _params():
    """A batch-norm MLP's parameters: kernels, biases, batch-norm scales and biases."""
    model = jaxdl.MLP(hidden=(4, 3), num_classes=2, batch_norm=True)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 5)), train=False))
    rng = np.random.default_rng(1)
    # non-zero everywhere, so that counting a bias or a scale would show
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(
            rng.uniform(0.5, 2.0, s.shape) * rng.choice([-1, 1], s.shape), s.dtype
        ),
        shapes["params"],
    )


def test_penalties_count_kernels_only():
    params = _params()
    assert {"bn_0", "layer_0", "output"} <= set(params)
    kernels = [
        np.asarray(params[k]["kernel"], np.float64) for k in ("layer_0", "layer_1", "output")
    ]
    others = [
        np.asarray(v)
        for layer, leaves in params.items()
        for name, v in leaves.items()
        if name != "kernel"
    ]
    assert others and all(np.all(o != 0) for o in others)
    l1 = sum(np.abs(k).sum() for k in kernels)
    l2 = sum((k**2).sum() for k in kernels)
    assert float(jax.jit(losses.l1_penalty)(params)) == pytest.approx(l1, rel=1e-6)
    assert float(jax.jit(losses.l2_penalty)(params)) == pytest.approx(l2, rel=1e-6)


def test_penalty_gradients_vanish_off_kernels():
    params = _params()
    g1, g2 = jax.jit(lambda p: (jax.grad(losses.l1_penalty)(p), jax.grad(losses.l2_penalty)(p)))(
        params
    )
    for layer, leaves in params.items():
        for name, w in leaves.items():
            w = np.asarray(w)
            if name == "kernel":
                np.testing.assert_allclose(g1[layer][name], np.sign(w))
                np.testing.assert_allclose(g2[layer][name], 2 * w, rtol=1e-6)
            else:
                assert not np.any(g1[layer][name]) and not np.any(g2[layer][name]), (layer, name)


def test_penalties_of_hand_made_tree():
    params = {
        "conv_0": {"kernel": jnp.array([[-1.0, 2.0]]), "bias": jnp.array([5.0])},
        "bn_0": {"scale": jnp.array([3.0]), "bias": jnp.array([-4.0])},
        "output": {"kernel": jnp.array([[0.5], [-0.5]]), "bias": jnp.array([9.0])},
    }
    assert float(jax.jit(losses.l1_penalty)(params)) == pytest.approx(1 + 2 + 0.5 + 0.5)
    assert float(jax.jit(losses.l2_penalty)(params)) == pytest.approx(1 + 4 + 0.25 + 0.25)


def test_weighted_mean_with_fractional_weights_is_the_weighted_mean():
    logits = jnp.zeros((2, 4))
    labels = jnp.array([0, 1])
    value = losses.cross_entropy(logits, labels, jnp.array([0.25, 0.25]))
    np.testing.assert_allclose(value, np.log(4.0), rtol=1e-6)
