"""Population-based training in the sweep's program (Jaderberg et al. 2017).

Every ``ready_every`` epochs the members are ranked on their validation accuracy; each
member in the bottom ``fraction`` copies the state (parameters, optimizer state, batch
statistics, trackers; not its PRNG key: its dropout masks and data order stay its own)
and the hyperparameters of a member drawn from the top ``fraction`` (exploit), then
multiplies each ``explore`` number by one of ``factors``, drawn per member (explore).
Both are array operations (``exploit``, compiled once); the numbers are traced, so the
epoch program is compiled once for the whole run, whatever the values become.

The result keeps each member's lineage: the explored numbers at every epoch and, at
each ready epoch, whom it copied.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl import compiled, processes, report, validate
from jaxdl.config import RunConfig
from jaxdl.data import Dataset
from jaxdl.member_programs import by_members, pad, share
from jaxdl.search import (
    Track,
    finish,
    padded_rows,
    padded_size,
    populate,
    rows_of,
    train_epochs,
)
from jaxdl.step import HParams
from jaxdl.sweep_results import SweepResult

SCALARS = ("l1", "l2", "input_noise")
METRICS = (
    "val_accuracy",
    "val_loss",
)  # what ranks the members  # explorable numbers of ``HParams`` beside opt/numbers


def explorable(hp: HParams) -> list[str]:
    """The names ``pbt`` may perturb: the optimizer's numbers, l1, l2, input noise and
    the model's own numbers."""
    return [*hp.opt, *SCALARS, *hp.numbers]


@functools.partial(jax.jit, static_argnames=("n", "k", "names"))
def exploit(states, hp: HParams, scores, key, factors, *, n: int, k: int, names: tuple):
    """The bottom ``k`` of the first ``n`` members (by ``scores``, (members,)) take the
    state and numbers of a random one of the top ``k``; their ``names`` numbers are then
    multiplied by ``factors[0]`` or ``factors[1]``. Returns (states, hp, source):
    ``source`` (members,) is whom each member copied (itself if none)."""
    k_pick, k_factor = jax.random.split(key)
    order = jnp.argsort(-scores[:n])
    top, bottom = order[:k], order[n - k :]
    source = jnp.arange(scores.shape[0]).at[bottom].set(top[jax.random.randint(k_pick, (k,), 0, k)])
    copied = source != jnp.arange(scores.shape[0])
    take = functools.partial(jax.tree_util.tree_map, lambda v: v[source])
    new = take(states).replace(key=states.key)  # its own randomness from here on
    hp = take(hp)
    f = jnp.where(jax.random.bernoulli(k_factor, 0.5, copied.shape), factors[1], factors[0])

    def explore(v):
        return jnp.where(copied, v * f.astype(v.dtype), v)

    opt = {k2: explore(v) if k2 in names else v for k2, v in hp.opt.items()}
    numbers = {k2: explore(v) if k2 in names else v for k2, v in hp.numbers.items()}
    scalars = {k2: explore(getattr(hp, k2)) for k2 in SCALARS if k2 in names}
    return new, hp._replace(opt=opt, numbers=numbers, **scalars), source


def pbt(
    config: RunConfig,
    train_data: Dataset,
    configs: Sequence[Mapping[str, Any]],
    *,
    ready_every: int,
    explore: Sequence[str] = ("learning_rate",),
    fraction: float = 0.25,
    factors: tuple[float, float] = (0.8, 1.25),
    key: int = 0,
    metric: str = "val_accuracy",
    seeds: int | Sequence[int] = 1,
    validation: Dataset | None = None,
    test: Dataset | None = None,
    on_epoch=None,
    devices: Sequence[jax.Device] | None = None,
    data_order: str = "auto",
    verbose: bool | None = None,
) -> SweepResult:
    """Population-based training of ``configs × seeds`` (see the module docstring); the
    other arguments as ``sweep.run``'s. ``key`` seeds whom a member copies and how it
    perturbs; ``metric`` ranks the members at each ready epoch (``val_accuracy``, higher
    is better, or ``val_loss``, lower is better). Early stopping may keep each member's
    best epoch but not stop it (no ``patience``): members are replaced, not stopped.

    Returns a ``SweepResult`` with ``search="pbt"``; its rows hold each member's final
    numbers, and ``lineage`` holds ``epochs`` (the ready epochs), ``source`` (members,
    ready epochs): whom each member copied there (itself: none), and per explored name
    (members, epochs): its value during each epoch."""
    validate.positive_int("ready_every", ready_every)
    sign = {"val_accuracy": 1.0, "val_loss": -1.0}[validate.choice("metric", metric, METRICS)]
    validate.in_range("fraction", fraction, 0.0, 0.5, hi_open=False)
    for f in factors:
        validate.positive("factors", f)
    es = config.training.early_stopping
    if es is not None and es.patience is not None:
        validate.fail("early_stopping", "no patience with pbt (members are replaced, not "
                      "stopped)", es)  # fmt: skip
    pop = populate(config, train_data, configs, seeds, validation, devices, data_order)
    hp0, n, epochs, progs = pop.hp, len(pop.members), pop.setup.epochs, pop.progs
    names = tuple(explore)
    for name in names:
        validate.choice("explore", name, explorable(hp0))
    k = max(1, int(n * fraction))
    if n < 2:
        validate.fail("configs × seeds", "at least 2 members for pbt", n)
    traced_before = progs.traces["epoch"]
    size = padded_size(n, pop.n_devices)
    ids = np.arange(n)
    states = progs.init(*by_members(pad(pop.keys, hp0, n, size)[:2], pop.mesh))
    hp = rows_of(hp0, padded_rows(ids, pop.n_devices))
    states, on, hp = by_members((states, jnp.arange(size) < n, hp), pop.mesh)
    exe, compile_seconds = compiled.executable(progs, states, on, pop.data, pop.valid, hp)
    track = Track(n, epochs)
    values = {name: np.full((n, epochs), np.nan) for name in names}
    ready, sources, epoch, seconds = [], [], 0, 0.0
    factors_arr = jnp.asarray(factors, jnp.float32)
    show = report.interactive() if verbose is None else bool(verbose)
    with report.Progress(epochs, enabled=show) as prog:
        each = report.sweep_callback(prog, on_epoch)
        while epoch < epochs:
            start = epoch
            t0 = time.perf_counter()
            states, on, epoch = train_epochs(pop, exe, states, on, hp, ids, epoch,
                                             min(epochs, epoch + ready_every), track, each)  # fmt: skip
            seconds += time.perf_counter() - t0
            for name in names:
                values[name][:, start:epoch] = processes.to_host(_value(hp, name))[:n, None]
            if epoch >= epochs or epoch == start:
                break
            scores = np.full(size, -np.inf)
            latest = sign * track.history[metric][:, epoch - 1]
            scores[:n] = np.where(track.diverged | np.isnan(latest), -np.inf, latest)
            given = share((jnp.asarray(scores), jax.random.fold_in(jax.random.key(key), epoch),
                           factors_arr), pop.mesh)  # fmt: skip
            states, hp, source = exploit(states, hp, *given, n=n, k=k, names=names)
            source = processes.to_host(source)[:n]
            track.diverged[source != ids] = False  # a copy of a healthy member trains again
            on = jnp.asarray(np.r_[~track.diverged, np.zeros(size - n, bool)])
            states, on, hp = by_members((states, on, hp), pop.mesh)
            ready.append(epoch)
            sources.append(source)
        prog.finish()
    final = rows_of(hp, ids)
    res = finish(pop, rows_of(states, ids), final, track, epoch, test, seconds, compile_seconds,
                 traced_before)  # fmt: skip
    for i, row in enumerate(res.rows):
        row.update({name: float(np.asarray(_value(final, name))[i]) for name in names})
    lineage = {
        "epochs": ready,
        "source": np.stack(sources, axis=1) if sources else np.zeros((n, 0), int),
        **values,
    }
    return dataclasses.replace(res, search="pbt", lineage=lineage)


def _value(hp: HParams, name: str) -> jax.Array:
    """The (members,) values of one explorable number."""
    if name in hp.opt:
        return hp.opt[name]
    if name in hp.numbers:
        return hp.numbers[name]
    return getattr(hp, name)
