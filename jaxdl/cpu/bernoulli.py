"""Dropout's keep-masks on the CPU: ``jax.random.bernoulli``'s draws, bit for bit, by a
compiled XLA FFI kernel (``bernoulli.cc``).

XLA:CPU hashes threefry2x32 as a loop of five steps, each a pass over the whole array:
about 1 ms of the default MLP's 1.6 ms step for the masks of ``--dropout-input 0.2
--dropout-hidden 0.5`` (178k draws), which made a dropout epoch 1.7× as slow as one
without. The kernel runs the twenty rounds vectorised across elements
(``benchmarks/README.md``).

``draw(key, p, shape)`` equals ``jax.random.bernoulli(key, p, shape).astype(float32)``
for a threefry2x32 key with ``jax_threefry_partitionable`` on (JAX's defaults); with any
other key it is that expression. Either way the masks, and so a run, are the same.
``jaxdl.lowering``'s CPU lowering draws jaxdl's own programs' masks with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxdl.cpu import build

TARGET = "jaxdl_bernoulli"
_HANDLERS = (("JaxdlBernoulli", TARGET),)
SOURCE = "bernoulli.cc"


def unavailable() -> str | None:
    """Why the kernel cannot draw on this host (None: it can). Builds and registers it on
    first use (on the host, when a lowering is resolved)."""
    return build.why_not(SOURCE, _HANDLERS, what="the Bernoulli kernel")


def _threefry(key: jax.Array) -> bool:
    """Whether ``key`` (typed or raw uint32) is a threefry2x32 key hashed as the kernel does."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        name = str(jax.random.key_impl(key))
    else:
        name = jax.config.jax_default_prng_impl
    return name == "threefry2x32" and bool(jax.config.jax_threefry_partitionable)


def draw(key: jax.Array, p: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Float32 0/1 array of ``shape``, each 1 with probability ``p`` (a float32 scalar):
    ``jax.random.bernoulli(key, p, shape).astype(float32)``, bit for bit."""
    p = jnp.asarray(p, jnp.float32)
    if p.shape != () or not _threefry(key):
        return jax.random.bernoulli(key, p, shape).astype(jnp.float32)
    data = key if key.dtype == jnp.uint32 else jax.random.key_data(key)
    out = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")
    return call(lax.stop_gradient(data), lax.stop_gradient(p))
