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
the tests check this. How the members run as one program is ``jaxdl.member_programs``; the
search spaces (``grid``, ``parse_values``, ``random_configs``, also reachable from here)
are ``jaxdl.space``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdl import compiled, contract, models, optim, processes, report, step, train, validate
from jaxdl.config import MODULES, OptimizerConfig, RunConfig
from jaxdl.data import Dataset
from jaxdl.devices import for_members
from jaxdl.models import Model
from jaxdl.optim import Optimizer

if TYPE_CHECKING:
    from jaxdl.checkpoint import Checkpointer
from jaxdl.member_programs import (
    DATA_ORDERS,
    batch_form,
    by_members,
    check_masks,
    chunk_size,
    member_slice,
    pad,
    programs,
    restore_best,
    share,
)
from jaxdl.space import MEMBER_KEYS
from jaxdl.space import grid as grid  # the search spaces, as sweep.grid too
from jaxdl.space import parse_values as parse_values
from jaxdl.space import random_configs as random_configs
from jaxdl.sweep_results import SweepResult, result_rows

log = logging.getLogger("jaxdl")


def _member_hparams(setup: step.Setup, base: Mapping[str, Any], cfg: Mapping[str, Any]):
    merged = {**base, **cfg}
    kw = {k: merged[k] for k in MEMBER_KEYS if k in merged and merged[k] is not None}
    overrides = {k: v for k, v in merged.items() if k not in MEMBER_KEYS}
    return train.make_hparams(setup, setup.optimizer, setup.feature_shape, **kw, **overrides)


def _structure_for(opt: OptimizerConfig, configs: Sequence[Mapping[str, Any]]) -> OptimizerConfig:
    """The optimizer with clipping / decay / max-norm passes on if any member needs them."""

    def needs(key, test):
        return any(test(c[key]) for c in configs if key in c)

    decay = opt.decay or needs("weight_decay", lambda v: v > 0)
    clip = opt.clip or needs("clip_norm", math.isfinite)
    constrain = opt.constrain or needs("max_norm", math.isfinite)
    return dataclasses.replace(opt, decay=decay, clip=clip, constrain=constrain)


def _largest(value) -> float:
    """The largest number in a setting (a scalar or a per-layer list); 0 if unset."""
    return 0.0 if value is None else float(np.max(np.asarray(value, np.float64)))


def prepare_sweep(
    config: RunConfig,
    train_data: Dataset,
    configs: Sequence[Mapping[str, Any]],
    *,
    seeds: int | Sequence[int] = 1,
    validation: Dataset | None = None,
) -> tuple[step.Setup, step.HParams, jax.Array, list[tuple[dict, int]]]:
    """Validates a sweep on the host: the shared ``Setup``, the members' stacked
    ``HParams`` and PRNG keys (leading axis: members), and the (config, seed) pairs.
    A member's numbers are ``config``'s (its regularisation and optimizer numbers)
    with its configuration's on top."""
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        validate.fail("seeds", "at least one seed", seeds)
    if not configs:
        validate.fail("configs", "at least one configuration", configs)
    opt = config.optimizer
    own = []  # a module's own numbers (jaxdl.Hyperparameter)
    if config.model.module not in MODULES and np.ndim(train_data.x) >= 2:
        model = config.model.build(train.num_classes(train_data))
        own = [k for k, _ in contract.layout(model, np.shape(train_data.x)[1:]).numbers]
    for key in {k for c in configs for k in c}:
        validate.choice("sweep setting", key, [*MEMBER_KEYS, *optim.defaults(opt.name), *own])
    base = {**dataclasses.asdict(config.regularisation), **opt.hyperparams}
    members = [(dict(c), s) for c in configs for s in seeds]
    # Static switches (dropout, noise, penalties) are on if any member needs them.
    flags = {
        k: max(_largest({**base, **c}.get(k)) for c, _ in members)
        for k in ("dropout", "input_noise", "l1", "l2")
    }
    flags["dropout"] = max(
        flags["dropout"], *(_largest({**base, **c}.get("dropout_input")) for c, _ in members)
    )
    if all({**base, **c}.get(k) is None for c, _ in members for k in ("dropout", "dropout_input")):
        flags["dropout"] = None  # each jaxdl.Dropout layer's own rate (train.make_hparams)
    shared = dataclasses.replace(config.regularisation, dropout_input=None, **flags)
    config = dataclasses.replace(
        config, optimizer=_structure_for(opt, [*configs, base]), regularisation=shared
    )
    setup, _ = train.prepare(config, train_data, validation)
    hps = [_member_hparams(setup, base, c) for c, _ in members]
    hp = jax.tree_util.tree_map(lambda *v: jnp.stack(v), *hps)
    keys = jnp.stack([train.as_key(s) for _, s in members])
    if processes.several():  # every process must build the same members from the same data
        from jaxdl.checkpoint import data_digest

        sets = [train_data] if validation is None else [train_data, validation]
        digest = data_digest(*[np.asarray(a) for d in sets for a in (d.x, d.y)])
        lowering = f"{setup.lowering!r} ticks={setup.ticks}"  # not in the setup's repr
        processes.check_same(
            {
                "data": digest,
                "settings": repr(setup),
                "members": repr(members),
                "lowering": lowering,
            }
        )
    return setup, hp, keys, members


def sweep(
    model: Model,
    optimizer: Optimizer,
    train_data: Dataset,
    configs: Sequence[Mapping[str, Any]],
    *,
    epochs: int,
    search: str = "grid",
    eta: int = 3,
    min_epochs: int = 1,
    **settings: Any,
) -> SweepResult:
    """Trains ``len(configs) × seeds`` members of one structure as one program:
    ``run(RunConfig.of(model, optimizer, epochs=epochs, **settings), train_data,
    configs, ...)``, where the keywords of ``run`` (``seeds``, ``validation``, ``test``,
    ``on_epoch``, ``devices``, …) go to ``run`` and the rest (``batch_size``,
    ``early_stopping``, ``loss``, ``kernels``, ``l2``, ``learning_rate``, …: the
    keywords of ``RunConfig.of``) are the settings every member shares unless its
    configuration sets them. ``search="halving"`` runs successive halving instead
    (``jaxdl.search.halving``, with ``eta`` and ``min_epochs``)."""
    options = {k: settings.pop(k) for k in _RUN_OPTIONS if k in settings}
    config = RunConfig.of(model, optimizer, epochs=epochs, **settings)
    if validate.choice("search", search, ("grid", "halving")) == "halving":
        from jaxdl import search as searches  # it builds on this module

        halving_options = {k: v for k, v in options.items() if k in _HALVING_OPTIONS}
        if len(halving_options) < len(options):
            bad = sorted(set(options) - set(halving_options))
            validate.fail("search", f"grid for {', '.join(bad)}", search)
        return searches.halving(config, train_data, configs, eta=eta, min_epochs=min_epochs,
                                **halving_options)  # fmt: skip
    return run(config, train_data, configs, **options)


def run(
    config: RunConfig,
    train_data: Dataset,
    configs: Sequence[Mapping[str, Any]],
    *,
    seeds: int | Sequence[int] = 1,
    validation: Dataset | None = None,
    test: Dataset | None = None,
    on_epoch=None,
    devices: Sequence[jax.Device] | None = None,
    max_memory_bytes: int | None = None,
    masks: models.Masks | None = None,
    checkpointer: Checkpointer | None = None,
    data_order: str = "auto",
    verbose: bool | None = None,
) -> SweepResult:
    """Trains ``len(configs) × seeds`` members of ``config``'s structure as one program.

    Args:
      config: what every member shares (``jaxdl.RunConfig``): model, optimizer family
        and schedule, epochs, batch size, early stopping, lowering, and the numbers a
        configuration does not set.
      configs: one dict per configuration: optimizer numbers (``learning_rate``,
        ``momentum``, ``b1``, ``weight_decay``, …) and ``l1``, ``l2``, ``dropout``
        (one rate or one per masked layer), ``input_noise``, ``init_scale``. See
        ``grid`` and ``random_configs``.
      seeds: a count (seeds 0…n-1) or explicit seeds; every configuration runs with each.
      on_epoch: ``on_epoch(epoch, metrics)`` with (members,) arrays, after each epoch:
        the history's metrics (NaN for a member no longer training) and ``diverged``.
      devices: where to run (default: all of ``jax.devices()``, at most one per member;
        on a CPU host ``jaxdl.use_cpu_cores()`` makes each core a device). With more
        than one, the member axis is sharded over a ``members`` mesh axis
        (``NamedSharding``) and the data replicated; members are padded to a multiple
        of the device count. Results equal the single-device run. Over several processes
        (hosts), call ``jaxdl.processes.join(...)`` (``jax.distributed``) first in every
        process and then this with the same arguments: ``jax.devices()`` then lists every
        process's devices, each runs its share of the members, and each gets every row.
      max_memory_bytes: per-device budget (default: see ``memory_budget``). Members that
        do not fit together run in chunks, one after another, with a warning.
      masks: fixed subnetworks, one 0/1 array per masked layer with a leading member
        axis, (members, width_i): member m trains and is evaluated with its own mask at
        every step instead of sampled dropout masks ("dropout bagging").
      checkpointer: saves every member (frozen and diverged ones too) as the sweep goes,
        one checkpoint directory per chunk, and resumes each chunk from its latest one.
      verbose: a line per epoch on stderr saying how the members do (a live bar on a
        terminal); None (default): on a terminal or in Jupyter only.
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
        config, train_data, configs, seeds=seeds, validation=validation
    )
    epochs, early_stopping = setup.epochs, setup.early_stopping
    if masks is not None:
        hp = hp._replace(masks=check_masks(masks, len(members), setup.widths))
    n = len(members)
    devices = for_members(n, devices)
    mesh = Mesh(np.asarray(devices), ("members",)) if len(devices) > 1 else None
    data = share(train.to_device(train_data), mesh)
    valid = None if validation is None else share(train.to_device(validation), mesh)
    size = chunk_size(setup, hp, n, len(devices), max_memory_bytes, data_bytes=data.x.nbytes)
    size = processes.smallest(size)  # hosts with less memory decide, so all run one program
    one_seed = len({seed for _, seed in members}) == 1
    shared = data_order == "shared" or (data_order == "auto" and one_seed)
    progs = programs(
        setup, mesh, batch_form(setup, shared, one_seed, devices[0].platform, mesh is not None)
    )
    traced_before = progs.traces["epoch"]
    show = report.interactive() if verbose is None else bool(verbose)
    with report.Progress(setup.epochs, enabled=show) as prog:
        each = report.sweep_callback(prog, on_epoch)
        chunks = [
            _run_chunk(
                progs,
                mesh,
                keys[i : i + size],
                member_slice(hp, i, i + size),
                size,
                data,
                valid,
                epochs,
                each,
                None if checkpointer is None else checkpointer.sub(f"chunk-{i // size}", size=size),
            )
            for i in range(0, n, size)
        ]
        prog.finish()
    states = jax.tree_util.tree_map(lambda *v: jnp.concatenate(v), *[c.states for c in chunks])
    states = restore_best(states, early_stopping)
    ran = max(c.epochs for c in chunks)
    hist = {k: np.concatenate([c.history[k][:, :ran] for c in chunks]) for k in chunks[0].history}
    diverged = np.concatenate([c.diverged for c in chunks])
    epochs_run = np.concatenate([c.epochs_run for c in chunks])
    seconds = sum(c.seconds for c in chunks)
    rows = result_rows(members, hist, diverged, epochs_run, states, setup, test, hp, mesh)
    if processes.several():  # every member's final state, on each process's host
        states = processes.to_host(states)
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


_RUN_OPTIONS = tuple(inspect.signature(run).parameters)[3:]
# What a halving search takes of them (no memory chunks, masks or checkpoints).
_HALVING_OPTIONS = ("seeds", "validation", "test", "on_epoch", "devices", "data_order", "verbose")


class _Chunk(NamedTuple):
    states: step.TrainState
    history: dict[str, np.ndarray]  # (members, epochs), NaN after a member stopped
    diverged: np.ndarray
    epochs_run: np.ndarray
    epochs: int
    seconds: float
    compile_seconds: float


def _run_chunk(progs, mesh, keys, hp, size, data, valid, epochs, on_epoch, ckpt=None) -> _Chunk:
    """Trains one chunk of members (padded to ``size``) to the end; drops the padding.
    With a checkpointer ``ckpt``, continues from the chunk's latest checkpoint if any."""
    n = keys.shape[0]
    # Placed explicitly: over several processes each puts only its own devices' shards.
    keys, hp, active = by_members(pad(keys, hp, n, size), mesh)
    states = progs.init(keys, hp)
    exe, compile_seconds = compiled.executable(progs, states, active, data, valid, hp)
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
        log.info("resuming %d members after epoch %d (their latest checkpoint)", n, epoch)
    t0 = time.perf_counter()
    on = processes.to_host(active)
    while epoch < epochs and on.any():
        epoch += 1
        states, active, diverged_now, metrics = exe(states, active, data, valid, hp)
        metrics, diverged_now, now_on = processes.to_host((metrics, diverged_now, active))
        metrics.pop("nonfinite_step")  # divergence is isolated per member (``diverged``)
        metrics = {k: np.asarray(v, np.float64)[:n] for k, v in metrics.items()}
        diverged |= diverged_now
        epochs_run += on & ~diverged_now
        on = now_on
        for k, v in metrics.items():
            history.setdefault(k, np.full((n, epochs), np.nan))[:, epoch - 1] = v
        if on_epoch is not None:  # with which members have diverged (so far)
            on_epoch(epoch, {**metrics, "diverged": diverged[:n].copy()})
        if ckpt is not None:
            host = {
                "history": {k: v.tolist() for k, v in history.items()},
                "diverged": diverged.tolist(),
                "epochs_run": epochs_run.tolist(),
            }
            done = epoch == epochs or not on.any()
            ckpt.after_epoch(epoch, {"states": states, "active": active}, host, last=done)
    seconds = time.perf_counter() - t0
    states = jax.tree_util.tree_map(lambda v: v[:n], states)
    return _Chunk(states, history, diverged[:n], epochs_run[:n], epoch, seconds, compile_seconds)


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
