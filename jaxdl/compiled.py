"""jaxdl's compiled programs of one run: the jitted initialisation and epoch of a
``Setup``, cached per ``program_key`` (what decides the program, and nothing else), with
their trace counts (so tests can show that nothing retraces) and their executables per
argument signature."""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import jax

from jaxdl import devices, optim
from jaxdl.step import Setup, init_state, run_epoch

log = logging.getLogger("jaxdl")


class Programs(NamedTuple):
    """The compiled functions of one ``Setup`` and how often each was traced."""

    init: Callable
    epoch: Callable
    traces: collections.Counter
    executables: dict


def counted(traces: collections.Counter, name: str, fn: Callable) -> Callable:
    """``fn`` that adds 1 to ``traces[name]`` each time it is traced (jit runs the
    Python function only then), so a test can assert a program was traced once."""

    @functools.wraps(fn)
    def wrapper(*args):
        traces[name] += 1  # runs only while tracing
        return fn(*args)

    return wrapper


def program_key(setup: Setup) -> Setup:
    """``setup`` as a cache key: every field decides the program, except the numbers an
    ``Optimizer`` carries, which are only initial values that the programs replace from
    ``HParams`` (and which its equality ignores); here they are the family's defaults, so
    a cached program holds no number of the run that first compiled it."""
    opt = setup.optimizer
    neutral = dataclasses.replace(opt, hyperparams=optim.defaults(opt.name))
    return dataclasses.replace(setup, optimizer=neutral)


def programs(setup: Setup) -> Programs:
    """Jitted ``init_state`` and ``run_epoch`` for ``setup``, one pair per
    ``program_key(setup)``: setups that differ only in traced numbers share them."""
    return _programs(program_key(setup))


@functools.lru_cache(maxsize=32)
def _programs(setup: Setup) -> Programs:
    traces: collections.Counter = collections.Counter()
    return Programs(
        init=jax.jit(counted(traces, "init", functools.partial(init_state, setup))),
        epoch=jax.jit(
            counted(traces, "epoch", functools.partial(run_epoch, setup)),
            donate_argnums=0,
            compiler_options=devices.compiler_options(),
        ),
        traces=traces,
        executables={},
    )


def executable(progs: Programs, *args) -> tuple[Callable, float]:
    """``progs.epoch`` compiled for these arguments' shapes (and shardings), with the
    seconds compiling took (0.0 when it was compiled before)."""
    sig = (
        jax.tree_util.tree_structure(args),
        tuple(
            (a.shape, a.dtype, getattr(a, "sharding", None))
            for a in jax.tree_util.tree_leaves(args)
        ),
    )
    if sig in progs.executables:
        return progs.executables[sig], 0.0
    log.info("compiling the epoch program (once per model structure and array shapes)")
    # The arguments (a sweep's members, just initialised) are computed asynchronously:
    # compiling beside that computation shared the cores with it, and the seconds
    # counted it (benchmarks/README.md: a seed-MLP sweep's "compile" grew from 1.7 s at
    # 1 member to 3.3 s at 256; waiting first, 1.3-1.6 s at every K).
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    exe = progs.epoch.lower(*args).compile()
    progs.executables[sig] = exe
    return exe, time.perf_counter() - t0


def compile_epoch(setup: Setup, *args) -> tuple[Callable, float]:
    """The compiled single-run epoch of ``setup`` for these arguments (see ``executable``)."""
    return executable(programs(setup), *args)
