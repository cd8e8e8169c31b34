"""The kernels' build: C++ sources in this package compiled on first use into XLA FFI
handlers (``adam``'s update, ``gemm``'s matrix products, ``bernoulli``'s masks).

A source is compiled with ``$CXX`` (default ``g++``), ``-march=native`` and the jaxlib
headers into ``$JAXDL_KERNEL_DIR`` (default ``~/.cache/jaxdl/kernels``), keyed by the
source, jaxlib, compiler and CPU, so each machine builds each version once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import jax

from jaxdl import devices

Handlers = tuple[tuple[str, str], ...]  # (symbol in the library, FFI target name)
HEADERS = ("team.h",)  # included by the sources: part of every library's key

# The process's mailbox through which the kernels' helpers pass work (team.h): zeroed
# memory every library is given as it loads, aligned to a cache line.
_MAILBOX = ctypes.create_string_buffer(128)
_MAILBOX_ADDRESS = -ctypes.addressof(_MAILBOX) % 64 + ctypes.addressof(_MAILBOX)

FLAGS = (
    "-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp-simd",
    "-std=c++17", "-shared", "-fPIC", "-w",
)  # fmt: skip

log = logging.getLogger("jaxdl")


def kernel_dir() -> Path:
    """Where compiled handlers are kept: ``$JAXDL_KERNEL_DIR``, else ``~/.cache/jaxdl/kernels``."""
    return Path(os.environ.get("JAXDL_KERNEL_DIR") or "~/.cache/jaxdl/kernels").expanduser()


def compiler() -> str:
    return os.environ.get("CXX") or "g++"


def library_path(source: str) -> Path:
    """The shared library for ``source`` (a file in this package, with the package's
    ``HEADERS``), this jaxlib, compiler and CPU (it need not exist)."""
    key = hashlib.sha256()
    for name in (source, *HEADERS):
        key.update(resources.files("jaxdl.cpu").joinpath(name).read_bytes())
    for part in (jax.__version__, compiler(), *FLAGS, devices.cpu_info("model name"),
                 devices.cpu_info("flags"), sys.platform):  # fmt: skip
        key.update(str(part).encode() + b"\0")
    return kernel_dir() / f"{Path(source).stem}-{key.hexdigest()[:16]}.so"


def build(source: str, path: Path) -> None:
    """Compiles ``source`` into ``path`` (atomically: a concurrent build never leaves a
    half-written library). Raises ``OSError`` or ``CalledProcessError`` on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the CPU kernel %s (once: cached in %s)", source, path.parent)
    with resources.as_file(resources.files("jaxdl.cpu")) as package:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{Path(source).stem}-", suffix=".so")
        os.close(fd)
        try:
            src = Path(package) / source
            cmd = [compiler(), *FLAGS, f"-I{package}", f"-I{jax.ffi.include_dir()}", str(src),
                   "-o", tmp]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@functools.cache
def register(source: str, handlers: Handlers, what: str) -> str | None:
    """Builds ``source`` (once per machine) and registers each of its handlers (symbol,
    target) as a CPU FFI target; None when registered, else why it could not be
    (``what`` names the kernel in that message)."""
    path = library_path(source)
    try:
        if not path.exists():
            build(source, path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        lib.jaxdl_team_attach(ctypes.c_void_p(_MAILBOX_ADDRESS))
        for symbol, target in handlers:
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except (OSError, subprocess.CalledProcessError, AttributeError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
        return f"could not build {what} ({detail[-1] if detail else e})"
    return None


def why_not(source: str, handlers: Handlers, *, what: str, cpu_flag: str | None = None
            ) -> str | None:  # fmt: skip
    """Why the ``handlers`` of ``source`` cannot be used on this host (None: they can):
    a CPU without ``cpu_flag`` or a failed build. Builds and registers them on first use.
    Called on the host, when a lowering is resolved (``jaxdl.lowering``), never while
    tracing."""
    if cpu_flag is not None and cpu_flag not in (devices.cpu_info("flags") or "").split():
        return f"the CPU has no {cpu_flag}"
    return register(source, handlers, what)
