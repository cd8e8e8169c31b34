"""Where programs run: a CPU host's cores as JAX devices, and the devices a sweep uses.

On a CPU, JAX starts with one device that splits every operation across the cores. A
sweep's members are independent, so running them on separate cores is faster: each
core then runs whole GEMMs and whole update loops for its share of the members, with
no hand-off between cores inside a step (``benchmarks/README.md``: 1.15–1.21× for 8
members of 784-500-500-10 on a 2-core CPU). ``use_cpu_cores`` exposes the cores as
devices, and ``sweep`` shards its member axis over them as over any other devices.

JAX fixes its device count when it starts (its first computation), so this is a
set-up step, made right after ``import jaxdl``; the ``jaxdl sweep`` CLI does it itself.
A single run (``fit``) runs on the first device and keeps every core.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

from jaxdl import validate

# What the user may already have asked for; ``use_cpu_cores(None)`` leaves it alone.
_XLA_COUNT_FLAG = "xla_force_host_platform_device_count"
_ENV_COUNT = "JAX_NUM_CPU_DEVICES"


def cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _user_set_count() -> bool:
    """Whether the environment already sets the CPU device count (``XLA_FLAGS`` or
    ``JAX_NUM_CPU_DEVICES``)."""
    return _XLA_COUNT_FLAG in os.environ.get("XLA_FLAGS", "") or _ENV_COUNT in os.environ


def use_cpu_cores(n: int | None = None) -> int:
    """Exposes ``n`` CPU devices (default: one per core; a count already set in the
    environment is kept). Call it before JAX's first computation. Returns the count.

    Other backends (GPU, TPU) are unaffected and stay the default where present.

    Raises:
      InputError: ``n`` is not a positive integer, or JAX has already started with
        another number of CPU devices.
    """
    if n is None and _user_set_count():  # JAX starts here, to report that count
        return len(jax.devices("cpu"))
    n = cores() if n is None else validate.positive_int("CPU devices", n)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX has started: its count is fixed
        have = len(jax.devices("cpu"))
        if have != n:
            raise validate.InputError(
                f"cannot use {n} CPU devices: JAX has already started with {have}; "
                "set the count before JAX's first computation (right after import jaxdl)"
            ) from None
    return n


def for_members(members: int, devices: Sequence[jax.Device] | None = None) -> list[jax.Device]:
    """The devices a sweep of ``members`` runs on: ``devices`` (default: all of
    ``jax.devices()``), but no more than there are members, since a device with only
    padding would do nothing but wait."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        validate.fail("devices", "at least one device", devices)
    return devices[: max(1, members)]
