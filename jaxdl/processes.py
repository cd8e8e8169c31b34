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
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

from jaxdl import validate
from jaxdl.validate import InputError

# Seconds without a heartbeat after which JAX's coordination service declares a process
# dead and stops the others (JAX's default is 100): well within a minute.
HEARTBEAT_SECONDS = 30
# How long process 0 waits for all the others to connect.
CONNECT_SECONDS = 120

_ADDRESS = re.compile(r"^\[?[A-Za-z0-9._:-]+\]?:\d{1,5}$")


class ProcessLost(Exception):  # noqa: N818 (a stop, said in one line)
    """A collective failed in a run over several processes: another process died."""


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
    processes' collectives run over Gloo.

    Raises:
      InputError: a malformed address or count, or JAX has already started.
    """
    auto = coordinator in (None, "auto")
    if auto and (num_processes is not None or process_id is not None):
        raise InputError("--num-processes/--process-id need --coordinator HOST:PORT")
    if not auto:
        if not _ADDRESS.match(coordinator):
            validate.fail("--coordinator", "HOST:PORT (process 0's address) or auto", coordinator)
        if num_processes is None or process_id is None:
            raise InputError(
                f"--coordinator {coordinator}: give --num-processes N and --process-id I too"
            )
        validate.positive_int("--num-processes", num_processes)
        if not 0 <= process_id < num_processes:
            validate.fail("--process-id", f"0 to {num_processes - 1}", process_id)
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"initialization_timeout": CONNECT_SECONDS}
    known = inspect.signature(jax.distributed.initialize).parameters
    if "heartbeat_timeout_seconds" in known:  # and when one fails, the others end as soon
        kwargs["heartbeat_timeout_seconds"] = HEARTBEAT_SECONDS
        kwargs["shutdown_timeout_seconds"] = HEARTBEAT_SECONDS
    args = (None, None, None) if auto else (coordinator, num_processes, process_id)
    try:
        jax.distributed.initialize(*args, **kwargs)
    except (RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if auto and isinstance(e, ValueError):  # nothing to detect the processes from
            first = ("no cluster found to detect the processes from (SLURM, Open MPI, "
                     "Kubernetes, a TPU pod); give --coordinator HOST:PORT --num-processes N "
                     "--process-id I")  # fmt: skip
        raise InputError(f"--coordinator {coordinator or 'auto'}: cannot join: {first}") from None
    return jax.process_count()


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


def check_same(what: str, text: str) -> None:
    """Raises ``InputError`` unless every process has the same ``text`` (e.g. a digest
    of its data and settings): processes that disagree would train different sweeps."""
    if not several():
        return
    mine = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise InputError(
            f"processes {', '.join(map(str, differ))} have other {what} than process 0; "
            "every process must be given the same data and settings"
        )
