"""Vectorised sweeps: many models trained as one compiled program.

A sweep is ``vmap`` of the pure training functions over ``(key, HParams)``: every member
shares the model structure, the optimizer family and the data (passed once, never copied
per member); each member has its own hyperparameters, seed, initialisation, data order
and dropout masks. One program is compiled per structure, whatever the number of values.
Members with one seed share their (equal) data order: each minibatch is gathered once,
and a narrow first layer runs as one GEMM over all members; on a CPU, wider MLPs train
each device's members one after another instead (``batch_form``).

Per member, and without Python branching on traced values:

- early stopping: a member whose patience ran out is frozen (``jnp.where``) while the
  others go on; the sweep ends when every member is done or at ``epochs``;
- divergence isolation: a member whose training loss becomes NaN/Inf is frozen at its
  last finite state and marked ``diverged``; the others are unaffected.

Member k equals a standalone ``fit`` with the same settings and seed (same RNG streams);
the tests check this.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdl import models, optim, train, validate
from jaxdl.data import Dataset
from jaxdl.devices import compiler_options, for_members
from jaxdl.models import Model
from jaxdl.optim import Optimizer
from jaxdl.stopping import EarlyStopping

if TYPE_CHECKING:
    from jaxdl.checkpoint import Checkpointer

# Settings a member may set besides the optimizer's own numbers (optim.defaults).
MEMBER_KEYS = ("l1", "l2", "dropout", "input_noise", "init_scale")


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """The cartesian product of the given value lists, as one dict per configuration.

    >>> grid(learning_rate=[1e-3, 1e-2], l2=[0.0, 1e-4])[1]
    {'learning_rate': 0.001, 'l2': 0.0001}
    """
    for name, values in axes.items():
        if isinstance(values, str) or not isinstance(values, Sequence) or not values:
            validate.fail(f"sweep values of {name}", "a non-empty list of values", values)
    names = list(axes)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes.values())]


def parse_values(text: str, *, what: str = "values") -> list[float]:
    """Parses ``"1e-4,3e-4,1e-3"``, ``"logspace:1e-4:1e-1:16"`` or ``"linspace:0:0.5:6"``."""
    text = text.strip()
    try:
        if text.startswith(("logspace:", "linspace:")):
            kind, lo, hi, n = text.split(":")
            lo, hi, n = float(lo), float(hi), int(n)
            if n < 1:
                raise ValueError
            if kind == "logspace":
                if lo <= 0 or hi <= 0:
                    validate.fail(what, "logspace bounds > 0", text)
                return [float(v) for v in np.geomspace(lo, hi, n)]
            return [float(v) for v in np.linspace(lo, hi, n)]
        values = [float(t) for t in text.split(",") if t.strip()]
        if not values:
            raise ValueError
        return values
    except validate.InputError:
        raise
    except ValueError:
        validate.fail(what, "comma-separated numbers, logspace:LO:HI:N or linspace:LO:HI:N", text)
        raise  # unreachable: fail raises


def random_configs(seed: int, n: int, **ranges: tuple[float, float, str]) -> list[dict[str, float]]:
    """``n`` random configurations; each range is ``(lo, hi, "log" | "linear")``.

    Log-uniform is the natural prior for learning rates and regularisation strengths.
    """
    validate.positive_int("random configurations", n)
    rng = np.random.default_rng(seed)
    out: list[dict[str, float]] = [{} for _ in range(n)]
    for name, (lo, hi, scale) in ranges.items():
        validate.choice(f"scale of {name}", scale, ("log", "linear"))
        if scale == "log":
            validate.positive(f"{name} lower bound", lo)
            draws = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
        else:
            draws = rng.uniform(lo, hi, n)
        for cfg, v in zip(out, draws, strict=True):
            cfg[name] = float(v)
    return out


@dataclasses.dataclass
class SweepResult:
    """What a sweep returns (host side).

    ``rows``: one dict per member (its settings, seed, best validation accuracy and
    epoch, test accuracy, epochs run, diverged, stopped). ``history[metric]``: float64
    (members, epochs_run) arrays, NaN where a member was frozen. ``states``: the final
    ``TrainState`` of every member stacked on a leading axis (best parameters restored
    where early stopping asks for it). ``compiles``: programs traced by this call (0 when
    an earlier sweep of the same structure and shapes compiled it).
    """

    rows: list[dict[str, Any]]
    history: dict[str, np.ndarray]
    states: train.TrainState
    compiles: int
    seconds: float
    compile_seconds: float
    samples_per_second: float  # training examples per second summed over members
    chunks: int = 1  # how many groups of members ran one after another (memory)
    devices: int = 1  # how many devices the member axis was sharded over
    kernels: str = "off"  # whether the CPU kernels lowered the program ("on"/"off")

    def best(self, metric: str = "best_val_accuracy") -> dict[str, Any]:
        """The row of the member with the highest ``metric`` among those not diverged."""
        ok = [r for r in self.rows if not r["diverged"] and math.isfinite(r.get(metric, math.nan))]
        return max(ok or self.rows, key=lambda r: r.get(metric, -math.inf))


def _member_hparams(
    setup: train.Setup, optimizer: Optimizer, cfg: Mapping[str, Any], base: Mapping[str, Any]
) -> train.HParams:
    merged = {**base, **cfg}
    kw = {k: merged[k] for k in MEMBER_KEYS if k in merged and merged[k] is not None}
    overrides = {k: v for k, v in merged.items() if k not in MEMBER_KEYS}
    return train.make_hparams(setup, optimizer, setup.feature_shape, **kw, **overrides)


def _structure_for(optimizer: Optimizer, configs: Sequence[Mapping[str, Any]]) -> Optimizer:
    """The optimizer with clipping / decay / max-norm passes on if any member needs them."""

    def needs(key, test):
        return any(test(c[key]) for c in configs if key in c)

    decay = optimizer.decay or needs("weight_decay", lambda v: v > 0)
    clip = optimizer.clip or needs("clip_norm", math.isfinite)
    constrain = optimizer.constrain or needs("max_norm", math.isfinite)
    return dataclasses.replace(optimizer, decay=decay, clip=clip, constrain=constrain)


def _largest(value) -> float:
    """The largest number in a setting (a scalar or a per-layer list); 0 if unset."""
    return 0.0 if value is None else float(np.max(np.asarray(value, np.float64)))


def _freeze(keep, new, old):
    """Per member: ``new`` where ``keep`` (members,), else ``old``."""

    def pick(n, o):
        k = keep.reshape(keep.shape + (1,) * (n.ndim - 1))
        return jnp.where(k, n, o)

    return jax.tree_util.tree_map(pick, new, old)


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


def batch_form(
    setup: train.Setup,
    shared: bool,
    one_seed: bool = True,
    platform: str | None = None,
    sharded: bool = False,
) -> str:
    """How the members' steps run on ``platform`` (default: JAX's default backend).

    ``own``: vmapped, every member gathering its own minibatch (its own data order).
    With one ``shared`` order the minibatch is gathered once per step for all members,
    and the first layer is one concatenated GEMM (``shared_concat``, narrow MLPs) or a
    batched GEMM over the broadcast minibatch (``shared_batched``). ``serial``: each
    device trains its members one after another, whole epochs, each with its own order
    (wider MLPs on a CPU; not when a shared order must differ from the members' own,
    i.e. across seeds). Over several devices (``sharded``) ``serial`` is a ``shard_map``,
    which only the Shardy partitioner lowers correctly (``shardy_partitions``)."""
    model = setup.model
    mlp = isinstance(model, models.MLP) and bool(model.hidden)
    if shared and mlp and model.hidden[0] <= CONCAT_MAX_WIDTH:
        return "shared_concat"
    on = platform or jax.default_backend()
    lowers = not sharded or shardy_partitions()
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


def _shared_order_epoch(setup: train.Setup, form: str, states, data: train.Batch, hps):
    """The epoch's steps for members that share one data order: a ``lax.scan`` over
    minibatches gathered once, each step vmapped over members. Returns (states, metrics
    (members,))."""
    # Active members have all run the same number of epochs (frozen ones fewer), and
    # share the key: the order is the one each would draw alone.
    idx, weights = train.epoch_order(setup, states.key[0], jnp.max(states.epoch))
    k = states.epoch.shape[0]
    concat = form == "shared_concat"
    if concat:
        # XLA lays the stacked kernels out for the wide GEMM, not row-major as the fused
        # update takes them: its transposes made this form 2-3x slower (32 of 784-64-10).
        # The same holds for jaxdl's GEMM kernel, which would run the members' first
        # layers one after another instead of as one wide GEMM.
        lowered = dataclasses.replace(setup.lowering, gemm=False, adam=False)
        setup = dataclasses.replace(setup, lowering=lowered)
    # Unbatched x makes the first layer bi,kio->kbo, which XLA emits as one wide GEMM.
    step = jax.vmap(
        functools.partial(train.train_step, setup), in_axes=(0, None if concat else 0, 0)
    )

    def body(st, xs):
        i, w = xs
        batch = train.Batch(setup.lowering.take_rows(data.x, i), data.y[i], w)
        if not concat:
            batch = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (k, *v.shape)), batch)
        return step(st, batch, hps)

    states, m = jax.lax.scan(body, states, (idx, weights))
    m = jax.tree_util.tree_map(lambda v: jnp.moveaxis(v, 0, -1), m)  # (members, steps)
    return states, jax.vmap(functools.partial(train.epoch_metrics, setup))(states, m)


def sweep_epoch(setup: train.Setup, form: str, states, active, data: train.Batch, valid, hps):
    """One epoch for every member (vmapped, or in turn: ``form``), then freezing of
    finished or diverged ones.

    Returns ``(states, active, diverged_now, metrics)``; ``metrics[k]`` is (members,).
    """
    if form == "own":
        new, metrics = jax.vmap(lambda s, h: train.run_epoch(setup, s, data, valid, h))(states, hps)
    elif form == "serial":  # one member after another (see ``SERIAL_PLATFORMS``)

        def one(member):
            return train.run_epoch(setup, member[0], data, valid, member[1])

        new, metrics = jax.lax.map(one, (states, hps))
    else:
        new, metrics = _shared_order_epoch(setup, form, states, data, hps)
        new, metrics = jax.vmap(lambda s, m, h: train.end_epoch(setup, s, m, data, valid, h))(
            new, metrics, hps
        )
    finite = jnp.isfinite(metrics["train_loss"])
    if "val_loss" in metrics:
        finite &= jnp.isfinite(metrics["val_loss"])
    keep = active & finite
    states = _freeze(keep, new, states)
    diverged_now = active & ~finite
    stopped = new.stopping.stopped if new.stopping is not None else jnp.zeros_like(active)
    active = keep & ~stopped
    metrics = {k: jnp.where(keep, v, jnp.nan) for k, v in metrics.items()}
    return states, active, diverged_now, metrics


def share(tree, mesh: Mesh | None):
    """``tree`` (the data every member reads) placed once on every device of ``mesh``,
    one copy per device, not per member (on one device: as it is)."""
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=16)
def programs(setup: train.Setup, mesh: Mesh | None = None, form: str = "own") -> train.Programs:
    """Jitted vmapped init and sweep epoch for ``setup`` (cached per setup, mesh and
    ``form``, see ``batch_form``).

    With a ``mesh``, everything with a member axis is sharded over its ``members`` axis
    and the data replicated, on the way in and on the way out, so each epoch's output
    feeds the next without resharding.
    """
    traces: collections.Counter = collections.Counter()
    init = jax.vmap(functools.partial(train.init_state, setup))
    epoch = functools.partial(sweep_epoch, setup, form)
    shard: dict[str, dict] = {"init": {}, "epoch": {}}
    if mesh is not None and form == "serial":
        # Each device loops over its own members: a loop over a sharded axis under plain
        # jit would gather the members first.
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
    return train.Programs(
        init=jax.jit(train._counted(traces, "init", init), **shard["init"]),
        epoch=jax.jit(
            train._counted(traces, "epoch", epoch),
            donate_argnums=(0,),
            compiler_options=compiler_options(),
            **shard["epoch"],
        ),
        traces=traces,
        executables={},
    )


def prepare_sweep(
    model: Model,
    optimizer: Optimizer,
    train_data: Dataset,
    configs: Sequence[Mapping[str, Any]],
    *,
    seeds: int | Sequence[int] = 1,
    epochs: int,
    batch_size: int = 100,
    validation: Dataset | None = None,
    early_stopping: EarlyStopping | None = None,
    loss: str = "cross_entropy",
    kernels: str = "auto",
    **base: Any,
) -> tuple[train.Setup, train.HParams, jax.Array, list[tuple[dict, int]]]:
    """Validates a sweep on the host: the shared ``Setup``, the members' stacked
    ``HParams`` and PRNG keys (leading axis: members), and the (config, seed) pairs."""
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        validate.fail("seeds", "at least one seed", seeds)
    if not configs:
        validate.fail("configs", "at least one configuration", configs)
    for key in {k for c in configs for k in c} | set(base):
        validate.choice("sweep setting", key, [*MEMBER_KEYS, *optim.defaults(optimizer.name)])
    optimizer = _structure_for(optimizer, [*configs, base])
    members = [(dict(c), s) for c in configs for s in seeds]
    # Static switches (dropout, noise, penalties) are on if any member needs them.
    flags = {
        k: max(_largest({**base, **c}.get(k)) for c, _ in members)
        for k in ("dropout", "input_noise", "l1", "l2")
    }
    setup, _ = train.prepare(
        model, optimizer, train_data, epochs=epochs, batch_size=batch_size, validation=validation,
        early_stopping=early_stopping, loss=loss, l1=flags["l1"], l2=flags["l2"],
        dropout=flags["dropout"], input_noise=flags["input_noise"], kernels=kernels,
    )  # fmt: skip
    hps = [_member_hparams(setup, optimizer, c, base) for c, _ in members]
    hp = jax.tree_util.tree_map(lambda *v: jnp.stack(v), *hps)
    keys = jnp.stack([train.as_key(s) for _, s in members])
    return setup, hp, keys, members


def sweep(
    model: Model,
    optimizer: Optimizer,
    train_data: Dataset,
    configs: Sequence[Mapping[str, Any]],
    *,
    seeds: int | Sequence[int] = 1,
    epochs: int,
    batch_size: int = 100,
    validation: Dataset | None = None,
    test: Dataset | None = None,
    early_stopping: EarlyStopping | None = None,
    loss: str = "cross_entropy",
    on_epoch=None,
    devices: Sequence[jax.Device] | None = None,
    max_memory_bytes: int | None = None,
    masks: models.Masks | None = None,
    checkpointer: Checkpointer | None = None,
    data_order: str = "auto",
    kernels: str = "auto",
    **base: Any,
) -> SweepResult:
    """Trains ``len(configs) × seeds`` members of one structure as one program.

    Args:
      configs: one dict per configuration: optimizer numbers (``learning_rate``,
        ``momentum``, ``b1``, ``weight_decay``, …) and ``l1``, ``l2``, ``dropout``
        (one rate or one per masked layer), ``input_noise``, ``init_scale``. See
        ``grid`` and ``random_configs``.
      seeds: a count (seeds 0…n-1) or explicit seeds; every configuration runs with each.
      **base: settings shared by all members unless a configuration sets them.
      on_epoch: ``on_epoch(epoch, metrics)`` with (members,) arrays, after each epoch.
      devices: where to run (default: all of ``jax.devices()``, at most one per member;
        on a CPU host ``jaxdl.use_cpu_cores()`` makes each core a device). With more
        than one, the member axis is sharded over a ``members`` mesh axis
        (``NamedSharding``) and the data replicated; members are padded to a multiple
        of the device count. Results equal the single-device run. For several hosts, call
        ``jax.distributed.initialize()`` first in every process: ``jax.devices()`` then
        lists every host's devices and each host runs its share of the members.
      max_memory_bytes: per-device budget (default: see ``memory_budget``). Members that
        do not fit together run in chunks, one after another, with a warning.
      masks: fixed subnetworks, one 0/1 array per masked layer with a leading member
        axis, (members, width_i): member m trains and is evaluated with its own mask at
        every step instead of sampled dropout masks ("dropout bagging").
      checkpointer: saves every member (frozen and diverged ones too) as the sweep goes,
        one checkpoint directory per chunk, and resumes each chunk from its latest one.
      kernels: ``"auto"``, ``"on"`` or ``"off"``: whether the CPU kernels lower the
        sweep's program (``jaxdl.lowering``); resolved once, here.
      data_order: ``"own"``: each member draws its own data order from its seed and
        gathers its own minibatches. ``"shared"``: every member trains on the first
        member's order, so each step's minibatch is gathered once and a narrow first
        layer runs as one GEMM over all members (faster; members with other seeds then
        differ from their standalone fits in data order, not in initialisation or dropout
        masks). ``"auto"`` (default): shared when every member has the same seed (the
        orders are then equal, so nothing changes but speed), else own.
    """
    validate.choice("data_order", data_order, DATA_ORDERS)
    setup, hp, keys, members = prepare_sweep(
        model, optimizer, train_data, configs, seeds=seeds, epochs=epochs,
        batch_size=batch_size, validation=validation, early_stopping=early_stopping,
        loss=loss, kernels=kernels, **base,
    )  # fmt: skip
    if masks is not None:
        hp = hp._replace(masks=_check_masks(masks, len(members), setup.widths))
    n = len(members)
    devices = for_members(n, devices)
    mesh = Mesh(np.asarray(devices), ("members",)) if len(devices) > 1 else None
    data = share(train.to_device(train_data), mesh)
    valid = None if validation is None else share(train.to_device(validation), mesh)
    size = chunk_size(setup, hp, n, len(devices), max_memory_bytes, data_bytes=data.x.nbytes)
    one_seed = len({seed for _, seed in members}) == 1
    shared = data_order == "shared" or (data_order == "auto" and one_seed)
    progs = programs(
        setup, mesh, batch_form(setup, shared, one_seed, devices[0].platform, mesh is not None)
    )
    traced_before = progs.traces["epoch"]
    chunks = [
        _run_chunk(
            progs,
            keys[i : i + size],
            _slice(hp, i, i + size),
            size,
            data,
            valid,
            epochs,
            on_epoch,
            None if checkpointer is None else checkpointer.sub(f"chunk-{i // size}", size=size),
        )
        for i in range(0, n, size)
    ]
    states = jax.tree_util.tree_map(lambda *v: jnp.concatenate(v), *[c.states for c in chunks])
    if early_stopping is not None and early_stopping.restore_best:
        has_best = states.stopping.tracker.best_epoch > 0
        states = states.replace(
            params=_freeze(has_best, states.stopping.best_params, states.params),
            batch_stats=_freeze(has_best, states.stopping.best_batch_stats, states.batch_stats),
        )
    ran = max(c.epochs for c in chunks)
    hist = {k: np.concatenate([c.history[k][:, :ran] for c in chunks]) for k in chunks[0].history}
    diverged = np.concatenate([c.diverged for c in chunks])
    epochs_run = np.concatenate([c.epochs_run for c in chunks])
    seconds = sum(c.seconds for c in chunks)
    rows = _rows(members, hist, diverged, epochs_run, states, setup, test, hp)
    return SweepResult(
        rows=rows,
        history=hist,
        states=states,
        compiles=progs.traces["epoch"] - traced_before,
        seconds=seconds,
        compile_seconds=sum(c.compile_seconds for c in chunks),
        samples_per_second=float(epochs_run.sum() * setup.n_train / max(seconds, 1e-9)),
        chunks=len(chunks),
        devices=len(devices),
        kernels=setup.lowering.kernels,
    )


class _Chunk(NamedTuple):
    states: train.TrainState
    history: dict[str, np.ndarray]  # (members, epochs), NaN after a member stopped
    diverged: np.ndarray
    epochs_run: np.ndarray
    epochs: int
    seconds: float
    compile_seconds: float


def _run_chunk(progs, keys, hp, size, data, valid, epochs, on_epoch, ckpt=None) -> _Chunk:
    """Trains one chunk of members (padded to ``size``) to the end; drops the padding.
    With a checkpointer ``ckpt``, continues from the chunk's latest checkpoint if any."""
    n = keys.shape[0]
    keys, hp, active = _pad(keys, hp, n, size)
    states = progs.init(keys, hp)
    exe, compile_seconds = train.compiled(progs, states, active, data, valid, hp)
    diverged = np.zeros(size, bool)
    epochs_run = np.zeros(size, int)
    history: dict[str, np.ndarray] = {}
    epoch = 0
    saved = None if ckpt is None else ckpt.restore({"states": states, "active": active})
    if saved is not None:
        states, active, epoch = saved.state["states"], saved.state["active"], saved.epoch
        diverged = np.asarray(saved.host["diverged"], bool)
        epochs_run = np.asarray(saved.host["epochs_run"], int)
        history = {k: np.asarray(v, np.float64) for k, v in saved.host["history"].items()}
    t0 = time.perf_counter()
    while epoch < epochs and bool(jnp.any(active)):
        epoch += 1
        was_active = np.asarray(active)
        states, active, diverged_now, metrics = exe(states, active, data, valid, hp)
        metrics = jax.device_get(metrics)
        metrics.pop("nonfinite_step")  # divergence is isolated per member (``diverged``)
        metrics = {k: np.asarray(v, np.float64)[:n] for k, v in metrics.items()}
        diverged |= np.asarray(diverged_now)
        epochs_run += was_active & ~np.asarray(diverged_now)
        for k, v in metrics.items():
            history.setdefault(k, np.full((n, epochs), np.nan))[:, epoch - 1] = v
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if ckpt is not None:
            host = {
                "history": {k: v.tolist() for k, v in history.items()},
                "diverged": diverged.tolist(),
                "epochs_run": epochs_run.tolist(),
            }
            done = epoch == epochs or not bool(jnp.any(active))
            ckpt.after_epoch(epoch, {"states": states, "active": active}, host, last=done)
    seconds = time.perf_counter() - t0
    states = jax.tree_util.tree_map(lambda v: v[:n], states)
    return _Chunk(states, history, diverged[:n], epochs_run[:n], epoch, seconds, compile_seconds)


def _slice(tree, start: int, stop: int):
    return jax.tree_util.tree_map(lambda v: v[start:stop], tree)


def member_bytes(setup: train.Setup, hp: train.HParams) -> int:
    """Estimated device bytes one member needs: its ``TrainState`` (parameters, optimizer
    state, best parameters for early stopping), its gradients, and the activations of a
    training step and of the per-epoch probe pass."""
    one = jax.tree_util.tree_map(lambda v: v[0], hp)
    state = jax.eval_shape(lambda: train.init_state(setup, jax.random.key(0), one))
    nbytes = sum(v.size * v.dtype.itemsize for v in jax.tree_util.tree_leaves(state))
    params = sum(v.size * v.dtype.itemsize for v in jax.tree_util.tree_leaves(state.params))
    units = math.prod(setup.feature_shape) + sum(setup.widths) + setup.model.num_classes
    pieces = setup.model.maxout_pieces if setup.model.activation == "maxout" else 1
    acts = 4 * units * pieces * 3 * (setup.batch_size + setup.probe_size)  # pre, post, grad
    return int(nbytes + params + acts)


def memory_budget(data_bytes: int = 0, n_devices: int = 1) -> int:
    """Bytes a sweep may use on one of ``n_devices`` devices: its memory limit where the
    backend reports one (GPU, TPU), else its share of half the host's RAM (CPU devices
    share it), less the data set (each device holds a copy)."""
    stats = jax.devices()[0].memory_stats() or {}
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
    budget = memory_budget(data_bytes, n_devices) if max_bytes is None else max_bytes
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


def _pad(keys, hp, n: int, size: int):
    """Pads the member axis from ``n`` to ``size`` with inactive copies of the last
    member (to fill the last chunk or device); returns (keys, hparams, active)."""
    pad = size - n

    def padded(v):
        return jnp.concatenate([v, jnp.repeat(v[-1:], pad, axis=0)]) if pad else v

    return padded(keys), jax.tree_util.tree_map(padded, hp), jnp.arange(n + pad) < n


def _check_masks(masks, members: int, widths: Sequence[int]) -> models.Masks:
    if not isinstance(masks, tuple | list) or len(masks) != len(widths):
        validate.fail("masks", f"a tuple of {len(widths)} arrays, one per masked layer", masks)
    out = []
    for i, (m, w) in enumerate(zip(masks, widths, strict=True)):
        m = np.asarray(m, np.float32)
        if m.shape != (members, w) or not np.isin(m, (0.0, 1.0)).all():
            validate.fail(f"masks[{i}]", f"0/1 values of shape ({members}, {w})", m.shape)
        out.append(jnp.asarray(m))
    return tuple(out)


def _rows(members, hist, diverged, epochs_run, states, setup, test, hp) -> list[dict[str, Any]]:
    acc = hist.get("val_accuracy", hist["train_accuracy"])
    if test is not None:
        test = train.to_device(train.check_data(test, "test", setup.model.num_classes))
        ev = jax.jit(
            jax.vmap(lambda p, b, r, m: train.evaluate_arrays(setup, p, b, r, test.x, test.y, m))
        )
        rates = states.rates if hp.masks is None else hp.dropout
        test_metrics = jax.device_get(ev(states.params, states.batch_stats, rates, hp.masks))
    rows = []
    tracked = None if states.stopping is None else np.asarray(states.stopping.tracker.best_epoch)
    for i, (cfg, seed) in enumerate(members):
        a = np.where(np.isnan(acc[i]), -np.inf, acc[i])
        best = int(np.argmax(a)) if np.isfinite(a).any() else -1
        if tracked is not None:  # the epoch early stopping kept (and restored)
            best = int(tracked[i]) - 1
        row = {**cfg, "seed": seed}
        row["best_val_accuracy" if "val_accuracy" in hist else "best_train_accuracy"] = (
            float(acc[i, best]) if best >= 0 else math.nan
        )
        row["best_epoch"] = best + 1 if best >= 0 else 0
        if test is not None:
            row["test_accuracy"] = float(test_metrics["accuracy"][i])
            row["test_loss"] = float(test_metrics["loss"][i])
        row["epochs_run"] = int(epochs_run[i])
        row["diverged"] = bool(diverged[i])
        row["stopped"] = bool(states.stopping.stopped[i]) if states.stopping is not None else False
        rows.append(row)
    return rows


def sweep_structures(
    structures: Mapping[str, tuple[Model, Optimizer]],
    train_data: Dataset,
    configs: Sequence[Mapping[str, Any]],
    **kwargs: Any,
) -> dict[str, SweepResult]:
    """Sweeps over structural choices too (width, depth, activation, batch norm,
    optimizer family), which cannot be vmapped: one program per named structure, run
    one after another, each over every configuration × seed. Settings a structure's
    optimizer does not take (``momentum`` for Adam, say) are dropped for that structure,
    and configurations that become identical run once.
    Each result's rows carry a ``structure`` column.

    Example::

      sweep_structures({"relu": (MLP(activation="relu"), make_optimizer("adam")),
                        "sigmoid": (MLP(activation="sigmoid"), make_optimizer("adam"))},
                       data.train, grid(learning_rate=[1e-4, 1e-3]), epochs=5)
    """
    if not structures:
        validate.fail("structures", "at least one (model, optimizer) pair", structures)
    results = {}
    for name, (model, optimizer) in structures.items():
        known = {*MEMBER_KEYS, *optim.defaults(optimizer.name)}
        own = []
        for c in configs:  # dropping settings may leave duplicates: keep the first
            mine = {k: v for k, v in c.items() if k in known}
            if mine not in own:
                own.append(mine)
        res = sweep(model, optimizer, train_data, own, **kwargs)
        res.rows = [{"structure": name, **r} for r in res.rows]
        results[name] = res
    return results
