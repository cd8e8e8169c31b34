"""Several processes as one JAX program (``jax.distributed``): joining them, and moving a
sweep's values between the host and arrays spread over every process's devices.

A sweep over processes is the one-process sweep with a bigger mesh: every process
computes the same member list, data and keys on its host (they are functions of the
settings), places its own shards of them (``place``), runs the same compiled programs
(JAX's collectives, over Gloo on CPUs), and reads every member's metrics back
(``to_host``). Process 0 writes the results; the others only compute.

A process that dies mid-collective leaves the others blocked in it; JAX's coordination
service notices the missing heartbeats and ends them (``HEARTBEAT_SECONDS``).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

from jaxdl import validate
from jaxdl.validate import InputError

log = logging.getLogger("jaxdl")

# Seconds without a heartbeat after which JAX's coordination service declares a process
# dead and stops the others (JAX's default is 100): well within a minute.
HEARTBEAT_SECONDS = 30
# How long process 0 waits for all the others to connect.
CONNECT_SECONDS = 120

_ADDRESS = re.compile(r"^\[?[A-Za-z0-9._:-]+\]?:\d{1,5}$")


class ProcessLost(Exception):  # noqa: N818 (a stop, said in one line)
    """A collective failed in a run over several processes: another process died."""


def lost(error: BaseException) -> str:
    """What a runtime error in one of several processes says, in one line: most often
    another process died mid-collective; the error's first line says if not."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (f"stopped by an error in a run over {count()} processes (did another process "
            f"stop?): {first[:160]}")  # fmt: skip


# What a failed collective raises (jax 0.4.36+; XLA's error, a RuntimeError, before).
RUNTIME_ERROR = getattr(jax.errors, "JaxRuntimeError", RuntimeError)


def join(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> int:
    """Joins this process to the others (``jax.distributed.initialize``), before JAX's
    first computation; returns the number of processes.

    ``coordinator`` is process 0's ``HOST:PORT`` (every process names the same one), with
    ``num_processes`` and this process's ``process_id``; ``"auto"`` (or all three None)
    lets JAX detect them on a cluster (SLURM, Open MPI, Kubernetes, TPU pods). On CPUs the
    processes' collectives run over Gloo. If not all of them join within
    ``CONNECT_SECONDS`` (JAX would then abort from C++), this process ends with one line on
    stderr and status 2.

    Raises:
      InputError: a malformed address or count, or JAX has already started.
    """
    auto = coordinator in (None, "auto")
    if auto and (num_processes is not None or process_id is not None):
        raise InputError("--num-processes/--process-id need --coordinator HOST:PORT")
    if not auto:
        port = coordinator.rpartition(":")[2]
        if not _ADDRESS.match(coordinator) or not 1 <= int(port or 0) <= 65535:
            validate.fail("--coordinator", "HOST:PORT (process 0's address, a port from 1 to "
                          "65535) or auto", coordinator)  # fmt: skip
        if num_processes is None or process_id is None:
            raise InputError(
                f"--coordinator {coordinator}: give --num-processes N and --process-id I too"
            )
        validate.positive_int("--num-processes", num_processes)
        if not 0 <= process_id < num_processes:
            validate.fail("--process-id", f"0 to {num_processes - 1}", process_id)
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    known = inspect.signature(jax.distributed.initialize).parameters
    if "heartbeat_timeout_seconds" in known:  # and when one fails, the others end as soon
        kwargs["heartbeat_timeout_seconds"] = HEARTBEAT_SECONDS
        kwargs["shutdown_timeout_seconds"] = HEARTBEAT_SECONDS
    args = (None, None, None) if auto else (coordinator, num_processes, process_id)
    # JAX waits for every process and then aborts from C++ with a stack trace; this says
    # what went wrong, in one line, just before.
    kwargs["initialization_timeout"] = CONNECT_SECONDS + 30
    where = f"--coordinator {coordinator or 'auto'}"
    timer = threading.Timer(CONNECT_SECONDS, _not_joined, (where, num_processes))
    timer.daemon = True
    log.info("joining %s processes through %s (waiting up to %d s)",
             num_processes or "the", "the cluster's coordinator" if auto else coordinator,
             CONNECT_SECONDS)  # fmt: skip
    timer.start()
    try:
        jax.distributed.initialize(*args, **kwargs)
    except (RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if auto and isinstance(e, ValueError):  # nothing to detect the processes from
            first = ("no cluster found to detect the processes from (SLURM, Open MPI, "
                     "Kubernetes, a TPU pod); give --coordinator HOST:PORT --num-processes N "
                     "--process-id I")  # fmt: skip
        raise InputError(f"{where}: cannot join: {first}") from None
    finally:
        timer.cancel()
    return jax.process_count()


def _not_joined(where: str, n: int | None) -> None:
    """Ends this process with one line (status 2) when the others did not all join."""
    count = f"the {n} processes" if n else "the processes"
    print(f"jaxdl: error: {where}: not all of {count} joined within {CONNECT_SECONDS} s; start "
          "each with the same --coordinator and --num-processes and its own --process-id "
          "(0 on the coordinator's host)", file=sys.stderr, flush=True)  # fmt: skip
    os._exit(2)


def count() -> int:
    """How many processes run this program."""
    return jax.process_count()


def several() -> bool:
    """Whether this program runs over more than one process."""
    return count() > 1


def leader() -> bool:
    """Whether this is process 0, the one that writes results."""
    return jax.process_index() == 0


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def place(tree, sharding: Sharding):
    """``tree`` (host values, equal in every process) as arrays laid out by ``sharding``.
    Within one process this is ``jax.device_put``; over several, each process puts only
    its own devices' shards, from its host copy."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(v):
        if isinstance(v, jax.Array) and not v.is_fully_addressable:  # placed already
            return v if v.sharding == sharding else jax.device_put(v, sharding)
        if _is_key(v):  # keys travel as their raw data
            return jax.random.wrap_key_data(
                put(jax.random.key_data(v)), impl=jax.random.key_impl(v)
            )
        return jax.device_put(np.asarray(v), sharding)

    return jax.tree_util.tree_map(put, tree)


def to_host(tree):
    """Every member's values of ``tree`` on this host: numpy arrays (keys: local key
    arrays), gathered from every process when the arrays span several."""

    def get(v):
        if not isinstance(v, jax.Array) or v.is_fully_addressable:
            return jax.device_get(v) if not _is_key(v) else v
        if _is_key(v):
            return jax.random.wrap_key_data(
                get(jax.random.key_data(v)), impl=jax.random.key_impl(v)
            )
        return np.asarray(multihost_utils.process_allgather(v, tiled=True))

    return jax.tree_util.tree_map(get, tree)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds in any process (every process must ask together)."""
    if not several():
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray([bool(flag)]))
    return bool(np.any(flags))


def from_leader(text: str) -> str:
    """Process 0's ``text`` in every process (e.g. the run directory it created)."""
    if not several():
        return text
    data = np.zeros(4096, np.uint8)
    raw = text.encode()[: data.size - 1]
    data[: len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(out[: int(np.argmin(out))]).decode() if out.any() else ""


def check_same(parts: Mapping[str, str]) -> None:
    """Raises ``InputError`` unless every process has the same text for each part (e.g.
    ``{"data": digest, "settings": repr}``), naming the parts and processes that differ:
    processes that disagree would train different sweeps."""
    if not several():
        return
    names = list(parts)
    mine = np.stack([
        np.frombuffer(hashlib.sha256(parts[k].encode()).digest(), np.uint8) for k in names
    ])  # fmt: skip
    every = np.asarray(multihost_utils.process_allgather(mine))  # (processes, parts, 32)
    differ = {
        k: [i for i in range(len(every)) if not np.array_equal(every[i, n], every[0, n])]
        for n, k in enumerate(names)
    }
    if any(differ.values()):
        said = "; ".join(
            f"{k}: process{'es' if len(d) > 1 else ''} {', '.join(map(str, d))}"
            for k, d in differ.items()
            if d
        )
        raise InputError(
            f"processes differ from process 0 ({said}); every process must be given the "
            "same data and settings, and run the same jaxdl and kernels"
        )


def barrier(name: str) -> None:
    """Waits until every process has come here (every process must, with one ``name``)."""
    if several():
        multihost_utils.sync_global_devices(name)


def smallest(value: int) -> int:
    """The smallest of every process's ``value`` (every process must ask together), e.g.
    how many members fit in memory, where the hosts differ."""
    if not several():
        return value
    return int(np.min(multihost_utils.process_allgather(np.asarray([value], np.int64))))
