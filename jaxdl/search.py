"""Successive halving, vectorised: a sweep whose weaker members stop costing anything.

A grid pays for every member to its last epoch. Successive halving (Jamieson & Talwalkar
2016; the inner loop of Hyperband) trains every member for ``min_epochs``, ranks them on
their best validation accuracy so far, lets the best ``1/eta`` go on for ``eta`` times
as many epochs, and so on until the last rung reaches ``epochs``. Here each rung is one
vmapped program over the members still training: at a rung's end the survivors'
states (parameters, optimizer state, keys, trackers) are gathered into a smaller batch,
so a stopped member takes no compute afterwards. A member stopped earlier by early
stopping or divergence is dropped at the same boundary. There is one compile per rung
size (a bounded number: about ``log_eta(members)``); a survivor's trajectory is the
one it would have had in the full grid (the same state, key and data order).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdl import compiled, processes, report, train, validate
from jaxdl.config import RunConfig
from jaxdl.data import Dataset
from jaxdl.devices import for_members
from jaxdl.member_programs import (
    batch_form,
    by_members,
    pad,
    programs,
    restore_best,
    share,
)
from jaxdl.sweep import prepare_sweep
from jaxdl.sweep_results import SweepResult, result_rows

SEARCHES = ("grid", "halving", "pbt")


def rungs(
    members: int, eta: int, min_epochs: int, epochs: int, names=("eta", "min_epochs")
) -> list[tuple[int, int]]:
    """The plan: (members training, epoch reached) per rung. ``members`` to
    ``min_epochs``, then ``members // eta`` to ``min_epochs · eta``, …; the last rung
    (a single member, or the first to reach ``epochs``) trains to ``epochs``. Bad values
    are refused under ``names`` (the CLI's flags there)."""
    name_eta, name_min = names
    validate.positive_int(name_eta, eta)
    if eta < 2:
        validate.fail(name_eta, "an integer >= 2 (the fraction 1/eta goes on)", eta)
    validate.positive_int(name_min, min_epochs)
    if min_epochs > epochs:
        validate.fail(name_min, f"at most the {epochs} epochs", min_epochs)
    out, n, e = [], members, min_epochs
    while e < epochs and n > 1:
        out.append((n, e))
        n, e = max(1, n // eta), e * eta
    out.append((n, epochs))
    return out


class Track:
    """Per member (all of them, by id): the history (members, epochs), NaN where it did
    not train; whether it diverged; the epochs it trained; its last rung."""

    def __init__(self, n: int, epochs: int) -> None:
        self.n, self.epochs = n, epochs
        self.history: dict[str, np.ndarray] = {}
        self.diverged = np.zeros(n, bool)
        self.epochs_run = np.zeros(n, int)
        self.rung = np.zeros(n, int)

    def epoch(self, epoch: int, ids, was, diverged_now, metrics) -> dict[str, np.ndarray]:
        """Records an epoch of members ``ids`` (``was``: which trained); returns that
        epoch's metrics for every member (NaN for those not training) and ``diverged``."""
        metrics = processes.to_host(metrics)
        metrics.pop("nonfinite_step")  # divergence is per member (``diverged_now``)
        self.diverged[ids] |= diverged_now
        self.epochs_run[ids] += was & ~diverged_now
        full = {}
        for k, v in metrics.items():
            row = self.history.setdefault(k, np.full((self.n, self.epochs), np.nan))
            row[ids, epoch - 1] = np.where(was, np.asarray(v, np.float64)[: len(ids)], np.nan)
            full[k] = row[:, epoch - 1]
        return {**full, "diverged": self.diverged.copy()}

    def scores(self, ids: np.ndarray) -> np.ndarray:
        """Best validation accuracy so far of members ``ids`` (-inf: diverged)."""
        acc = self.history["val_accuracy"][ids]
        best = np.max(np.where(np.isnan(acc), -np.inf, acc), axis=1)
        return np.where(self.diverged[ids], -np.inf, best)


def halving(
    config: RunConfig,
    train_data: Dataset,
    configs: Sequence[Mapping[str, Any]],
    *,
    eta: int = 3,
    min_epochs: int = 1,
    seeds: int | Sequence[int] = 1,
    validation: Dataset | None = None,
    test: Dataset | None = None,
    on_epoch=None,
    devices: Sequence[jax.Device] | None = None,
    data_order: str = "auto",
    verbose: bool | None = None,
) -> SweepResult:
    """Successive halving over ``configs × seeds`` (see the module docstring); the
    arguments as ``sweep.run``'s, with ``eta`` and ``min_epochs`` (the first rung's
    epochs); ``config.training.epochs`` is the last rung's. Ranks on the validation
    accuracy (``validation`` is required).

    Returns a ``SweepResult`` whose rows add ``rung`` (the last rung a member trained
    in, 0-based; the finalists are in the last) and whose ``model_epochs`` is the
    member-epochs spent. ``history`` is NaN where a member did not train."""
    pop = populate(config, train_data, configs, seeds, validation, devices, data_order)
    hp, n, epochs, progs, n_devices = (
        pop.hp,
        len(pop.members),
        pop.setup.epochs,
        pop.progs,
        pop.n_devices,
    )
    plan = rungs(n, eta, min_epochs, epochs)
    traced_before = progs.traces["epoch"]
    states = progs.init(*by_members(pad(pop.keys, hp, n, padded_size(n, n_devices))[:2], pop.mesh))
    track = Track(n, epochs)
    ids = np.arange(n)  # the members in ``states`` (its first len(ids) rows)
    active = np.ones(n, bool)  # which of them still train
    done: list[tuple[np.ndarray, Any]] = []  # (ids, states) of members that stopped
    epoch, compile_seconds, seconds = 0, 0.0, 0.0
    show = report.interactive() if verbose is None else bool(verbose)
    with report.Progress(epochs, enabled=show) as prog:
        each = report.sweep_callback(prog, on_epoch)
        for r, (keep, until) in enumerate(plan):
            if r:  # the best ``keep`` of those still training go on, compacted
                alive = ids[active]
                if not len(alive):  # every member stopped early: nothing goes on
                    break
                ranked = alive[np.argsort(-track.scores(alive), kind="stable")]
                survivors = np.sort(ranked[:keep])
                at = np.searchsorted(ids, survivors)
                done.append(
                    (np.delete(ids, at), rows_of(states, np.delete(np.arange(len(ids)), at)))
                )
                states, ids = rows_of(states, padded_rows(at, n_devices)), survivors
            track.rung[ids] = r
            hp_now = rows_of(hp, padded_rows(ids, n_devices))
            on = (jnp.arange(states.step.shape[0]) < len(ids)) & ~_stopped(states)
            states, on, hp_now = by_members((states, on, hp_now), pop.mesh)
            exe, c = compiled.executable(progs, states, on, pop.data, pop.valid, hp_now)
            compile_seconds += c
            t0 = time.perf_counter()
            states, on, epoch = train_epochs(
                pop, exe, states, on, hp_now, ids, epoch, until, track, each
            )
            seconds += time.perf_counter() - t0
            active = processes.to_host(on)[: len(ids)]
            epoch = until  # a rung whose members all stopped early ends here too
        prog.finish()
    done.append((ids, rows_of(states, np.arange(len(ids)))))
    order = np.argsort(np.concatenate([i for i, _ in done]))
    states = jax.tree_util.tree_map(lambda *v: jnp.concatenate(v)[order], *[s for _, s in done])
    res = finish(pop, states, hp, track, epoch, test, seconds, compile_seconds, traced_before)
    for row, rung in zip(res.rows, track.rung, strict=True):
        row["rung"] = int(rung)
    return dataclasses.replace(res, search="halving")


class Population(NamedTuple):
    """A search's members, checked and placed: what ``sweep.prepare_sweep`` gives, the
    program that trains them and the data on their devices."""

    setup: Any
    hp: Any  # the members' HParams (members, ...)
    keys: jax.Array
    members: list
    progs: compiled.Programs
    data: Any
    valid: Any
    n_devices: int
    mesh: Mesh | None


def populate(config, train_data, configs, seeds, validation, devices, data_order) -> Population:
    """The members of a search (``sweep.run``'s arguments), ranked on ``validation``."""
    if validation is None:
        validate.fail("validation", "validation data to rank members on", None)
    setup, hp, keys, members = prepare_sweep(
        config, train_data, configs, seeds=seeds, validation=validation
    )
    devices = for_members(len(members), devices)
    mesh = Mesh(np.asarray(devices), ("members",)) if len(devices) > 1 else None
    one_seed = len({seed for _, seed in members}) == 1
    shared = data_order == "shared" or (data_order == "auto" and one_seed)
    form = batch_form(setup, shared, one_seed, devices[0].platform, mesh is not None)
    data = share(train.to_device(train_data), mesh)
    valid = share(train.to_device(validation), mesh)
    return Population(setup, hp, keys, members, programs(setup, mesh, form), data, valid,
                      len(devices), mesh)  # fmt: skip


def finish(pop, states, hp, track, epochs, test, seconds, compile_seconds, traced_before):
    """The ``SweepResult`` of a search: every member's final ``states`` (in member
    order), its ``hp``, what ``track`` recorded over ``epochs`` epochs."""
    states = restore_best(states, pop.setup.early_stopping)
    history = {k: v[:, :epochs] for k, v in track.history.items()}
    rows = result_rows(
        pop.members, history, track.diverged, track.epochs_run, states, pop.setup, test, hp
    )
    return SweepResult(
        rows=rows,
        history=history,
        states=states,
        compiles=pop.progs.traces["epoch"] - traced_before,
        seconds=seconds,
        compile_seconds=compile_seconds,
        samples_per_second=float(track.epochs_run.sum() * pop.setup.n_train / max(seconds, 1e-9)),
        devices=pop.n_devices,
        kernels=pop.setup.lowering.kernels,
        model_epochs=int(track.epochs_run.sum()),
    )


def train_epochs(pop, exe, states, on, hp, ids, epoch: int, until: int, track, each):
    """Runs the compiled epoch ``exe`` from ``epoch`` to ``until`` (or until no member
    of ``ids`` is ``on``), recording each epoch in ``track`` and telling ``each``;
    returns ``(states, on, epoch)``."""
    now = processes.to_host(on)
    while epoch < until and now.any():
        epoch += 1
        was = now[: len(ids)]
        states, on, div_now, metrics = exe(states, on, pop.data, pop.valid, hp)
        div_now, now = processes.to_host((div_now, on))
        each(epoch, track.epoch(epoch, ids, was, div_now[: len(ids)], metrics))
    return states, on, epoch


def padded_size(n: int, n_devices: int) -> int:
    return -(-n // n_devices) * n_devices


def padded_rows(rows: np.ndarray, n_devices: int) -> np.ndarray:
    """``rows`` padded to a multiple of the device count by repeating the last."""
    extra = padded_size(len(rows), n_devices) - len(rows)
    return np.concatenate([rows, np.repeat(rows[-1:], extra)]) if extra else rows


def rows_of(tree, rows: np.ndarray):
    """The members ``rows`` of a tree with a leading member axis. Over several processes
    the members pass through the host (programs take them back with ``by_members``)."""
    idx = jnp.asarray(rows, jnp.int32)
    if processes.several():
        tree = processes.to_host(tree)
        return jax.tree_util.tree_map(
            lambda v: v[rows] if isinstance(v, np.ndarray) else v[idx], tree
        )
    return jax.tree_util.tree_map(lambda v: v[idx], tree)


def _stopped(states) -> jax.Array:
    """(members,) whether early stopping has stopped each member."""
    if states.stopping is None:
        return jnp.zeros(states.step.shape[0], bool)
    return states.stopping.stopped


def check_search(
    search: str, epochs: int, eta: int, min_epochs: int, names=("eta", "min_epochs")
) -> str:
    """The ``search`` name, checked with its settings (``rungs`` checks the numbers)."""
    validate.choice("search", search, SEARCHES)
    if search == "halving":
        rungs(max(2, eta), eta, min_epochs, epochs, names)
    return search
