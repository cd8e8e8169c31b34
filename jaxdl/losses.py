"""Losses, penalties and accuracy.

Every data loss takes logits (B, C), integer labels (B,) and optional per-example weights
(B,) (0 for the padding of a partial last batch) and returns the weighted mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxdl import inits

LOSSES = ("cross_entropy", "mse")


def _weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return values.mean()
    total = weights.sum()
    return jnp.where(total > 0, (values * weights).sum() / jnp.where(total > 0, total, 1.0), 0.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None):
    """Softmax cross-entropy on integer labels (natural log)."""
    return _weighted_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), weights)


def mse(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None):
    """Mean squared error between softmax probabilities and one-hot targets.

    Averaged over classes, as Keras' ``mean_squared_error`` does.
    """
    probs = jax.nn.softmax(logits)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)
    return _weighted_mean(((probs - onehot) ** 2).mean(axis=-1), weights)


def accuracy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None):
    """Fraction of examples whose arg-max logit is the label."""
    return _weighted_mean((logits.argmax(-1) == labels).astype(jnp.float32), weights)


def data_loss(name: str, logits, labels, weights=None) -> jax.Array:
    """Dispatches on the loss name (static)."""
    return (cross_entropy if name == "cross_entropy" else mse)(logits, labels, weights)


def _kernels(params) -> list[jax.Array]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return [w for p, w in leaves if inits.is_kernel(p, w)]


def l1_penalty(params) -> jax.Array:
    """Σ|w| over the kernels (biases and batch-norm parameters are not penalised)."""
    return sum(jnp.abs(w).sum() for w in _kernels(params))


def l2_penalty(params) -> jax.Array:
    """Σw² over the kernels (Keras' convention: the coefficient multiplies Σw², no ½)."""
    return sum(jnp.square(w).sum() for w in _kernels(params))
