"""Named weight initialisers.

Each name maps to a *unit* initialiser and a default multiplier. The multiplier is the
traced ``init_scale`` hyperparameter (see ``jaxdl.train.HParams``): parameters are drawn
once with the unit initialiser and every kernel is then multiplied by ``init_scale``, so
sweeping the scale of, say, ``normal`` (σ = 0.01 "small" vs σ = 1.0 "large") never
recompiles. Biases always start at zero.

| name | kernel draw | default scale |
|---|---|---|
| ``zeros`` | 0 | 1 |
| ``normal`` | N(0, 1) · σ | σ = 0.01 |
| ``uniform`` | U(-1, 1) · a | a = 0.05 |
| ``xavier_uniform`` / ``glorot_uniform`` | U(±sqrt(6 / (fan_in + fan_out))) | 1 |
| ``xavier_normal`` / ``glorot_normal`` | N(0, 2 / (fan_in + fan_out)) | 1 |
| ``he_normal`` / ``kaiming_normal`` | N(0, 2 / fan_in) | 1 |
| ``he_uniform`` / ``kaiming_uniform`` | U(±sqrt(6 / fan_in)) | 1 |
| ``lecun_normal`` | N(0, 1 / fan_in) | 1 |

Normal variants are untruncated, as in the course (and unlike Flax's truncated default).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdl import validate

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]

_vs = nn.initializers.variance_scaling
_UNIT: dict[str, tuple[Initializer, float]] = {
    "zeros": (nn.initializers.zeros, 1.0),
    "normal": (nn.initializers.normal(stddev=1.0), 0.01),
    "uniform": (nn.initializers.uniform(scale=2.0), 0.05),
    "xavier_uniform": (_vs(1.0, "fan_avg", "uniform"), 1.0),
    "xavier_normal": (_vs(1.0, "fan_avg", "normal"), 1.0),
    "he_normal": (_vs(2.0, "fan_in", "normal"), 1.0),
    "he_uniform": (_vs(2.0, "fan_in", "uniform"), 1.0),
    "lecun_normal": (_vs(1.0, "fan_in", "normal"), 1.0),
}
_ALIASES = {
    "glorot_uniform": "xavier_uniform",
    "glorot_normal": "xavier_normal",
    "kaiming_normal": "he_normal",
    "kaiming_uniform": "he_uniform",
}
NAMES: tuple[str, ...] = tuple(_UNIT) + tuple(_ALIASES)


def canonical(name: str) -> str:
    """Resolves aliases (``glorot_*`` → ``xavier_*``, ``kaiming_*`` → ``he_*``); checks the name."""
    validate.choice("init", name, NAMES)
    return _ALIASES.get(name, name)


def unit_initializer(name: str) -> Initializer:
    """The kernel initialiser for ``name`` before multiplying by ``init_scale``."""
    init = _UNIT[canonical(name)][0]
    if canonical(name) == "uniform":
        # flax's uniform draws from [0, scale); shift to the symmetric U(-1, 1).
        def init(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -1.0, 1.0)

    return init


def default_scale(name: str) -> float:
    """The multiplier ``name`` uses when no ``init_scale`` is given (σ for ``normal``)."""
    return _UNIT[canonical(name)][1]


def is_kernel(path: tuple, leaf: jax.Array) -> bool:
    """Weights of dense/conv layers (not biases, not batch-norm scales)."""
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"


def scale_kernels(params, scale: jax.Array):
    """Multiplies every kernel in ``params`` by ``scale`` (a number or traced scalar)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, w: w * jnp.asarray(scale, w.dtype) if is_kernel(p, w) else w, params
    )
