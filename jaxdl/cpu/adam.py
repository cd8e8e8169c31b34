"""Adam's update in one loop on the CPU: a compiled XLA FFI handler (``adam.cc``).

XLA:CPU runs Optax's Adam as three fusions per parameter array (first moment, second
moment, then the parameter, which reads both): ten passes over memory per array, where
one loop makes seven. The update is 18–24% of the default MLP's step on a 2-core CPU, and
the loop does it in half the time (``benchmarks/bench_adam_update.py``).

``step`` is a drop-in for ``tx.update`` + ``optax.apply_updates`` for the ``adam`` and
``adamw`` families: the optimizer state keeps Optax's structure (Optax's own update is
still traced for its counts and hyperparameter states; XLA drops its unused moments), so
checkpoints and ``get_hyperparams`` work unchanged. Clipping runs before, as Optax's
``clip_by_global_norm``. Results equal Optax's to the last bits or so (the loop rounds
as XLA does for a one-array program; with several arrays XLA itself rounds Optax's
expression differently, benchmarks/README.md).

The handler is compiled on first use (``build``). ``jaxdl.lowering``'s CPU lowering uses
it for jaxdl's own compiled programs where it builds; elsewhere training runs Optax's update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxdl import inits
from jaxdl.cpu import build
from jaxdl.optim import Optimizer

TARGET = "jaxdl_adam"
_HANDLERS = (("JaxdlAdam", TARGET),)
SOURCE = "adam.cc"


def unavailable() -> str | None:
    """Why the handler cannot be used on this host (None: it can). Builds and registers it
    on first use (on the host, when a lowering is resolved)."""
    return build.why_not(SOURCE, _HANDLERS, what="the fused Adam update")


def applies(optimizer: Optimizer) -> bool:
    """Whether ``optimizer``'s update is one the handler does: Adam or AdamW without frozen
    layers, per-layer learning rates or max-norm (those use Optax's chain)."""
    return optimizer.name in ("adam", "adamw") and not (
        optimizer.freeze or optimizer.layer_lr or optimizer.constrain
    )


def _leaf(p, g, m, v, scalars, after=()):
    """One array's update; under ``vmap`` the call sees every member at once (``s``:
    (K, 10)). ``after``: arrays the handler ignores, passed only to order the call after
    the operations that produce them."""
    out = jax.ShapeDtypeStruct(p.shape, p.dtype)
    call = jax.ffi.ffi_call(
        TARGET, (out, out, out), vmap_method="broadcast_all",
        input_output_aliases={0: 0, 2: 1, 3: 2},
    )  # fmt: skip
    return call(p, g, m, v, scalars, *after)


def step(optimizer: Optimizer, grads, opt_state, params):
    """``(params, opt_state)`` after one Adam/AdamW step: the same as
    ``tx.update(grads, opt_state, params)`` followed by ``optax.apply_updates``.

    ``opt_state`` already holds this step's hyperparameters (``optim.set_hyperparams``).
    Every leaf of ``params`` must be float32.
    """
    if any(p.dtype != jnp.float32 for p in jax.tree.leaves(params)):
        updates, opt_state = optimizer.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    # Optax's update gives the new counts and states; its moments and update are unused
    # below, so XLA removes them.
    _, new_state = optimizer.tx.update(grads, opt_state, params)
    h = opt_state.hyperparams
    if optimizer.clip:
        grads, _ = optax.clip_by_global_norm(h["clip_norm"]).update(grads, optax.EmptyState())
    (adam,) = _adam_states(new_state)
    t = adam.count.astype(jnp.float32)  # Optax: decay ** count, as float32
    b1, b2 = h["b1"], h["b2"]
    common = [1 - b1, b1, 1 - b2, b2, 1 / (1 - b1**t), 1 / (1 - b2**t), 0.0, h["eps"]]
    common.append(-h["learning_rate"])
    wd = h["weight_decay"] if optimizer.decay else 0.0
    with_decay = jnp.stack([*common, wd]).astype(jnp.float32)
    without = jnp.stack([*common, 0.0]).astype(jnp.float32)
    old = _adam_states(opt_state)[0]
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = zip(flat, *(jax.tree.leaves(x) for x in (grads, old.mu, old.nu)), strict=True)
    # Every update runs after the whole backward pass (all gradients as unread operands).
    # Otherwise nothing orders a kernel's in-place update after the input-gradient GEMM
    # δ·Wᵀ that reads the old kernel, and XLA copies the kernel every step to be safe
    # (two copies of the 500×500 kernel per step in the default MLP).
    after = tuple(jax.tree.leaves(grads))
    out = [
        _leaf(p, g, m, v, with_decay if inits.is_kernel(path, p) else without, after)
        for (path, p), g, m, v in leaves
    ]
    new_p, mu, nu = (treedef.unflatten(list(x)) for x in zip(*out, strict=True))
    new_state = jax.tree.map(
        lambda n: n._replace(mu=mu, nu=nu) if isinstance(n, optax.ScaleByAdamState) else n,
        new_state,
        is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState),
    )
    return new_p, new_state


def _adam_states(opt_state) -> list[optax.ScaleByAdamState]:
    is_adam = lambda n: isinstance(n, optax.ScaleByAdamState)  # noqa: E731
    return [n for n in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(n)]
