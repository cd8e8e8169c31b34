"""A sweep's members as one compiled program: how their steps run (``batch_form``: vmapped,
one shared minibatch, or one after another on each device), the members' epoch with
per-member freezing, the sharding of the member axis over devices, and how many
members fit in memory at once (``chunk_size``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdl import compiled, contract, models, processes, step, validate
from jaxdl.devices import compiler_options


def freeze(keep, new, old):
    """Per member: ``new`` where ``keep`` (members,), else ``old``."""

    def pick(n, o):
        k = keep.reshape(keep.shape + (1,) * (n.ndim - 1))
        return jnp.where(k, n, o)

    return jax.tree_util.tree_map(pick, new, old)


def restore_best(states, early_stopping):
    """The members' states with, where ``early_stopping`` restores the best epoch and a
    member has one, that epoch's parameters and batch statistics."""
    if early_stopping is None or not early_stopping.restore_best:
        return states
    has_best = states.stopping.tracker.best_epoch > 0
    return states.replace(
        params=freeze(has_best, states.stopping.best_params, states.params),
        batch_stats=freeze(has_best, states.stopping.best_batch_stats, states.batch_stats),
    )


# ``sweep(data_order=...)``: each member's own order, one shared order, or shared when
# every member has the same seed.
DATA_ORDERS = ("auto", "own", "shared")


# Widest first hidden layer for which a shared minibatch is fed to the members as one
# concatenated GEMM x·[W_1 … W_k]; wider layers run as batched per-member GEMMs over the
# broadcast minibatch. Measured on a 2-core CPU, concatenated vs batched, one epoch:
# width 64 (8 and 32 members) 1.13× and 1.32×; 96: 1.03×; 128: 0.92×; 256: 0.84×; 500:
# 0.86× (XLA transposes the stacked kernel every step to form the wide GEMM).
CONCAT_MAX_WIDTH = 96


# Platforms on which wider MLPs train their members one after another on each device
# (``serial``) instead of vmapped: a CPU core then runs plain GEMMs, and one member's
# state (10 MiB for 784-500-500-10 with Adam) stays in cache through its update. Measured
# on a 2-core CPU with the members over the cores, one epoch, serial vs batched: 8
# members of 784-500-500-10 1.17×; 8 of 784-256-256-10 1.09×; 16 of 784-128-128-10
# 1.13×; but 32 of 784-64-10 0.83× (the concatenated GEMM wins there). Accelerators
# want the batch.
SERIAL_PLATFORMS = ("cpu",)

# On those platforms, members sharing the concatenated first layer train in blocks
# (``shared_blocks``): each device runs a block's whole epoch, then the next block's, so
# a block's states (parameters, gradients, optimizer state) stay in cache through every
# step instead of all members' states streaming from memory at each step. Measured on a
# 2-core CPU, 784-64-10, Adam, one epoch of 5k MNIST images, the members over the 2
# cores, model-samples/s: 8 members 464k (one vmapped group) -> 521k-555k (blocks);
# 128: 392k -> 536k-542k; 256: 391k -> 546k-556k (blocks of 4 or 8 members, 2.4 or 4.9
# MiB of states; blocks of 16: 498k-535k).
BLOCK_BYTES = 4 << 20


def batch_form(
    setup: step.Setup,
    shared: bool,
    one_seed: bool = True,
    platform: str | None = None,
    sharded: bool = False,
) -> str:
    """How the members' steps run on ``platform`` (default: JAX's default backend).

    ``own``: vmapped, every member gathering its own minibatch (its own data order).
    With one ``shared`` order the minibatch is gathered once per step for all members,
    and the first layer is one concatenated GEMM (``shared_concat``, narrow MLPs; on a
    CPU ``shared_blocks``, the same in blocks of members, see ``BLOCK_BYTES``) or a
    batched GEMM over the broadcast minibatch (``shared_batched``). ``serial``: each
    device trains its members one after another, whole epochs, each with its own order
    (wider MLPs on a CPU; not when a shared order must differ from the members' own,
    i.e. across seeds). Over several devices (``sharded``) ``serial`` and
    ``shared_blocks`` are a ``shard_map``, which only the Shardy partitioner lowers
    correctly (``shardy_partitions``)."""
    model = setup.model
    mlp = isinstance(model, models.MLP) and bool(model.hidden)
    on = platform or jax.default_backend()
    lowers = not sharded or shardy_partitions()
    if shared and mlp and model.hidden[0] <= CONCAT_MAX_WIDTH:
        return "shared_blocks" if on in SERIAL_PLATFORMS and lowers else "shared_concat"
    if mlp and on in SERIAL_PLATFORMS and (one_seed or not shared) and lowers:
        return "serial"
    return "shared_batched" if shared else "own"


def shardy_partitions() -> bool:
    """Whether jit partitions with Shardy (jax's default from 0.7; on 0.6, the setting
    ``jax_use_shardy_partitioner``). Read on the host, when a sweep picks its program.

    Under the older GSPMD partitioner, a ``shard_map`` of the members' epochs computed
    wrong values on every other device (jax 0.6.2, 4 CPU devices, 3 members each, an
    8-step ``lax.scan``), while the vmapped forms under ``jit`` shardings are right."""
    return bool(jax.config.jax_use_shardy_partitioner)


def _shared_order_epoch(setup: step.Setup, form: str, states, data: step.Batch, hps):
    """The epoch's steps for members that share one data order: a ``lax.scan`` over
    minibatches gathered once, each step vmapped over members. Returns (states, metrics
    (members,))."""
    # Active members have all run the same number of epochs (frozen ones fewer), and
    # share the key: the order is the one each would draw alone.
    idx, weights = step.epoch_order(setup, states.key[0], jnp.max(states.epoch))
    k = states.epoch.shape[0]
    concat = form in ("shared_concat", "shared_blocks")
    if concat:
        # XLA lays the stacked kernels out for the wide GEMM, not row-major as the fused
        # update takes them: its transposes made this form 2-3x slower (32 of 784-64-10).
        # The same holds for jaxdl's GEMM kernel, which would run the members' first
        # layers one after another instead of as one wide GEMM.
        lowered = dataclasses.replace(setup.lowering, gemm=False, adam=False)
        setup = dataclasses.replace(setup, lowering=lowered)
    # Unbatched x makes the first layer bi,kio->kbo, which XLA emits as one wide GEMM.
    members_step = jax.vmap(
        functools.partial(step.train_step, setup), in_axes=(0, None if concat else 0, 0)
    )

    def steps(st, hp):
        """The epoch's steps for a group of members: (states, metrics (steps, group))."""
        n = st.epoch.shape[0]

        def body(st, xs):
            i, w = xs
            batch = step.Batch(setup.lowering.take_rows(data.x, i), data.y[i], w)
            if not concat:
                batch = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (n, *v.shape)), batch)
            return members_step(st, batch, hp)

        return jax.lax.scan(body, st, (idx, weights))

    b = block_size(states) if form == "shared_blocks" else k
    states, m = _in_blocks(steps, states, hps, b) if b < k else steps(states, hps)
    m = jax.tree_util.tree_map(lambda v: jnp.moveaxis(v, 0, -1), m)  # (members, steps)
    return states, jax.vmap(functools.partial(step.epoch_metrics, setup))(states, m)


def block_size(states) -> int:
    """Members per block of ``shared_blocks``, from the states' shapes alone: at most as
    many as keep their states within ``BLOCK_BYTES`` (at least one), and down to half
    that where it divides the members into equal blocks (one traced epoch, not a second
    for a last, shorter block)."""
    leaves = jax.tree_util.tree_leaves(states)
    k = leaves[0].shape[0]
    per_member = sum(v.size * v.dtype.itemsize for v in leaves) // k
    most = max(1, BLOCK_BYTES // max(per_member, 1))
    even = [b for b in range(most, (most + 1) // 2 - 1, -1) if k % b == 0]
    return even[0] if even else most


def _in_blocks(steps, states, hps, b: int):
    """``steps`` over the members in blocks of ``b``, one block after another (a
    ``lax.map``; the last block takes what is left); the same (states, metrics) as
    ``steps`` over all of them at once."""
    tm = jax.tree_util.tree_map
    k = states.epoch.shape[0]
    nb, full = k // b, k // b * b
    head = tm(lambda v: v[:full].reshape(nb, b, *v.shape[1:]), (states, hps))
    out, m = jax.lax.map(lambda a: steps(*a), head)  # (nb, b, ...), metrics (nb, steps, b)
    out = tm(lambda v: v.reshape(full, *v.shape[2:]), out)
    m = tm(lambda v: jnp.moveaxis(v, 0, 1).reshape(v.shape[1], full), m)
    if full < k:
        rest, m_rest = steps(*tm(lambda v: v[full:], (states, hps)))
        out = tm(lambda u, r: jnp.concatenate([u, r]), out, rest)
        m = tm(lambda u, r: jnp.concatenate([u, r], axis=1), m, m_rest)
    return out, m


def sweep_epoch(setup: step.Setup, form: str, states, active, data: step.Batch, valid, hps):
    """One epoch for every member (vmapped, or in turn: ``form``), then freezing of
    finished or diverged ones.

    Returns ``(states, active, diverged_now, metrics)``; ``metrics[k]`` is (members,).
    """
    if form == "own":
        new, metrics = jax.vmap(lambda s, h: step.run_epoch(setup, s, data, valid, h))(states, hps)
    elif form == "serial":  # one member after another (see ``SERIAL_PLATFORMS``)

        def one(member):
            return step.run_epoch(setup, member[0], data, valid, member[1])

        new, metrics = jax.lax.map(one, (states, hps))
    else:
        new, metrics = _shared_order_epoch(setup, form, states, data, hps)
        new, metrics = jax.vmap(lambda s, m, h: step.end_epoch(setup, s, m, data, valid, h))(
            new, metrics, hps
        )
    finite = jnp.isfinite(metrics["train_loss"])
    if "val_loss" in metrics:
        finite &= jnp.isfinite(metrics["val_loss"])
    keep = active & finite
    states = freeze(keep, new, states)
    diverged_now = active & ~finite
    stopped = new.stopping.stopped if new.stopping is not None else jnp.zeros_like(active)
    active = keep & ~stopped
    metrics = {k: jnp.where(keep, v, jnp.nan) for k, v in metrics.items()}
    return states, active, diverged_now, metrics


def by_members(tree, mesh: Mesh | None):
    """``tree`` (leading axis: members) split over ``mesh``'s ``members`` axis, as the
    programs take it (after a gather, e.g. a search keeping some members)."""
    return tree if mesh is None else processes.place(tree, NamedSharding(mesh, P("members")))


def share(tree, mesh: Mesh | None):
    """``tree`` (the data every member reads) placed once on every device of ``mesh``,
    one copy per device, not per member (on one device: as it is)."""
    return tree if mesh is None else processes.place(tree, NamedSharding(mesh, P()))


def programs(setup: step.Setup, mesh: Mesh | None = None, form: str = "own") -> compiled.Programs:
    """Jitted vmapped init and sweep epoch for ``setup`` (cached per
    ``compiled.program_key(setup)``, mesh and ``form``, see ``batch_form``).

    With a ``mesh``, everything with a member axis is sharded over its ``members`` axis
    and the data replicated, on the way in and on the way out, so each epoch's output
    feeds the next without resharding.
    """
    return _programs(compiled.program_key(setup), mesh, form)


@functools.lru_cache(maxsize=16)
def _programs(setup: step.Setup, mesh: Mesh | None, form: str) -> compiled.Programs:
    traces: collections.Counter = collections.Counter()
    init = jax.vmap(functools.partial(step.init_state, setup))
    epoch = functools.partial(sweep_epoch, setup, form)
    shard: dict[str, dict] = {"init": {}, "epoch": {}}
    if mesh is not None and form in ("serial", "shared_blocks"):
        # Each device loops over its own members: a loop over a sharded axis under plain
        # jit would gather the members first. (Each device draws the shared order from
        # its own members' key and epoch: the same wherever a member is active.)
        members = P("members")
        epoch = jax.shard_map(
            epoch, mesh=mesh, in_specs=(members, members, P(), P(), members),
            out_specs=members, check_vma=False,
        )  # fmt: skip
    if mesh is not None:
        by_member, replicated = NamedSharding(mesh, P("members")), NamedSharding(mesh, P())
        shard["init"] = {"in_shardings": by_member, "out_shardings": by_member}
        shard["epoch"] = {
            "in_shardings": (by_member, by_member, replicated, replicated, by_member),
            "out_shardings": by_member,
        }
    return compiled.Programs(
        init=jax.jit(compiled.counted(traces, "init", init), **shard["init"]),
        epoch=jax.jit(
            compiled.counted(traces, "epoch", epoch),
            donate_argnums=(0,),
            compiler_options=compiler_options(),
            **shard["epoch"],
        ),
        traces=traces,
        executables={},
    )


def member_bytes(setup: step.Setup, hp: step.HParams) -> int:
    """Estimated device bytes one member needs: its ``TrainState`` (parameters, optimizer
    state, best parameters for early stopping), its gradients, and the activations of a
    training step and of the per-epoch probe pass."""
    one = jax.tree_util.tree_map(lambda v: v[0], hp)
    state = jax.eval_shape(lambda: step.init_state(setup, jax.random.key(0), one))
    nbytes = sum(v.size * v.dtype.itemsize for v in jax.tree_util.tree_leaves(state))
    params = sum(v.size * v.dtype.itemsize for v in jax.tree_util.tree_leaves(state.params))
    m = setup.model
    units = (
        math.prod(setup.feature_shape)
        + sum(setup.widths)
        + contract.classes(m, setup.feature_shape)
    )
    pieces = m.maxout_pieces if getattr(m, "activation", None) == "maxout" else 1
    acts = 4 * units * pieces * 3 * (setup.batch_size + setup.probe_size)  # pre, post, grad
    return int(nbytes + params + acts)


def memory_budget(data_bytes: int = 0, n_devices: int = 1) -> int:
    """Bytes a sweep may use on one of ``n_devices`` devices: its memory limit where the
    backend reports one (GPU, TPU), else its share of half the host's RAM (CPU devices
    share it), less the data set (each device holds a copy)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        limit = int(stats["bytes_limit"] * 0.9)
    else:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2 // n_devices
    return max(limit - data_bytes, 0)


def chunk_size(
    setup, hp, n: int, n_devices: int, max_bytes: int | None, data_bytes: int = 0
) -> int:
    """How many members to train at once: all of them if they fit, else as many as fit
    (a multiple of the device count), with a warning saying so."""
    local = max(1, n_devices // processes.count())  # the devices sharing this host's memory
    budget = memory_budget(data_bytes, local) if max_bytes is None else max_bytes
    per = member_bytes(setup, hp)
    fit = max(1, budget // per) * n_devices
    total = -(-n // n_devices) * n_devices
    if fit >= total:
        return total
    size = max(n_devices, fit // n_devices * n_devices)
    warnings.warn(
        f"sweep: {n} members need about {n * per / 2**20:.0f} MiB, more than the "
        f"{budget / 2**20:.0f} MiB available per device; running {-(-n // size)} chunks of "
        f"{size} members one after another (one compiled program)",
        stacklevel=3,
    )
    return size


def pad(keys, hp, n: int, size: int):
    """Pads the member axis from ``n`` to ``size`` with inactive copies of the last
    member (to fill the last chunk or device); returns (keys, hparams, active)."""
    extra = size - n

    def padded(v):
        return jnp.concatenate([v, jnp.repeat(v[-1:], extra, axis=0)]) if extra else v

    return padded(keys), jax.tree_util.tree_map(padded, hp), jnp.arange(n + extra) < n


def member_slice(tree, start: int, stop: int):
    """Members ``start:stop`` of a tree with a leading member axis."""
    return jax.tree_util.tree_map(lambda v: v[start:stop], tree)


def check_masks(masks, members: int, widths: Sequence[int]) -> models.Masks:
    """Fixed subnetworks, one 0/1 (members, width) array per masked layer, checked."""
    if not isinstance(masks, tuple | list) or len(masks) != len(widths):
        validate.fail("masks", f"a tuple of {len(widths)} arrays, one per masked layer", masks)
    out = []
    for i, (m, w) in enumerate(zip(masks, widths, strict=True)):
        m = np.asarray(m, np.float32)
        if m.shape != (members, w) or not np.isin(m, (0.0, 1.0)).all():
            validate.fail(f"masks[{i}]", f"0/1 values of shape ({members}, {w})", m.shape)
        out.append(jnp.asarray(m))
    return tuple(out)
