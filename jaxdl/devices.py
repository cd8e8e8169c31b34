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

``compiler_options`` is what jaxdl passes XLA for its compiled programs: on an x86 CPU
with AVX-512, 512-bit vector loops for the elementwise work (XLA:CPU's default is 256).
"""

from __future__ import annotations

import functools
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


def user_set_count() -> bool:
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
    if n is None and user_set_count():  # JAX starts here, to report that count
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


# XLA:CPU vectorises its loops (the optimizer's update, activations and their
# derivatives) at 256 bits by default, even where the CPU has 512-bit registers, to avoid
# the clock drop of early AVX-512 Intel parts. On the benchmarks' AMD EPYC (Zen 4) 512 bits
# made the default MLP's whole epoch 8-10% faster, with bitwise equal results
# (benchmarks/README.md). A value the user sets in XLA_FLAGS wins.
_VECTOR_WIDTH = "xla_cpu_prefer_vector_width"


def cpu_info(field: str) -> str | None:
    """The value of ``field`` (e.g. ``"model name"``, ``"flags"``) for the host's first
    CPU in Linux's ``/proc/cpuinfo``; None where there is no such file or field."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_flags() -> set[str]:
    """The host CPU's feature flags (empty where they cannot be read)."""
    return set((cpu_info("flags") or "").split())


@functools.cache
def compiler_options() -> dict[str, int]:
    """XLA compiler options for jaxdl's jitted programs (``jax.jit(compiler_options=)``).

    ``{"xla_cpu_prefer_vector_width": 512}`` on a host with AVX-512, unless ``XLA_FLAGS``
    sets that option or this XLA no longer knows it (checked once, on a trivial program;
    JAX starts then); otherwise empty. The option shapes only the CPU's code, so it is
    harmless where the programs run on an accelerator.
    """
    if "avx512f" not in _cpu_flags() or _VECTOR_WIDTH in os.environ.get("XLA_FLAGS", ""):
        return {}
    options = {_VECTOR_WIDTH: 512}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(0.0).compile()
    except RuntimeError:  # "No such compile option": this XLA keeps its default
        return {}
    return options


def for_members(members: int, devices: Sequence[jax.Device] | None = None) -> list[jax.Device]:
    """The devices a sweep of ``members`` runs on: ``devices`` (default: all of
    ``jax.devices()``), but no more than there are members, since a device with only
    padding would do nothing but wait. Over several processes every device takes part
    (each process runs the program on its own devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        validate.fail("devices", "at least one device", devices)
    if jax.process_count() > 1:
        return devices
    return devices[: max(1, members)]
