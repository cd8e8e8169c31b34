"""How jaxdl's own compiled programs are lowered on this host: the seam between what a
program computes and how it runs.

A training program is decided by its static ``Setup`` and fed its traced ``HParams``. A
``Lowering`` chooses only *how* XLA runs it here, never *what* it computes:

- ``gemm``: dense layers through the CPU GEMM kernel (bias, ReLU and dropout fused into
  it), minibatch rows copied by the kernel's library (``jaxdl.cpu.gemm``);
- ``adam``: Adam/AdamW's update as one loop (``jaxdl.cpu.adam``);
- ``masks``: dropout masks drawn by the Bernoulli kernel, ``jax.random.bernoulli``'s bits
  (``jaxdl.cpu.bernoulli``);
- ``conv``: ``"patches"`` runs ``models.Conv`` as shifted copies and one matmul (XLA's
  CPU backend is slow at a convolution's weight gradient inside a loop), else ``"xla"``.

``resolve(kernels)`` decides it once, on the host, before anything is traced:
``"off"`` never uses the kernels; ``"on"`` uses them or raises ``InputError`` saying why
they cannot run; ``"auto"`` uses them where the backend is the CPU, the CPU has AVX-512
and they build. The environment variable ``JAXDL_KERNELS`` (``on``/``off``), read only
here, replaces ``"auto"``. The result is recorded with a run (``--json``'s ``kernels``,
``config.json``) but is never part of a checkpoint's identity: a run saved with the
kernels resumes without them, and the reverse.

Inside a traced function nothing reads the environment, ``/proc`` or the backend: the
programs take the resolved ``Lowering`` from their ``Setup``. A model's ``apply`` called
by a user is plain Flax; ``scope()`` (Flax method interception) applies the lowering to
the modules' ``Dense.forward`` and ``Conv.convolve`` only while jaxdl traces its programs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from collections.abc import Iterator

import jax
import optax
from flax import linen as nn

from jaxdl import models, validate
from jaxdl.optim import Optimizer

KERNELS = ("auto", "on", "off")
CONVS = ("xla", "patches")
ENV = "JAXDL_KERNELS"


@dataclasses.dataclass(frozen=True)
class Lowering:
    """How jaxdl's compiled programs run on this host (see the module docstring). The
    default, ``XLA``, is the path every backend runs: XLA's GEMMs and convolutions,
    Optax's update, ``jax.random.bernoulli``."""

    gemm: bool = False
    adam: bool = False
    masks: bool = False
    conv: str = "xla"

    def __post_init__(self) -> None:
        validate.choice("conv lowering", self.conv, CONVS)

    @property
    def kernels(self) -> str:
        """``"on"`` where any CPU kernel is used, else ``"off"`` (as ``--json`` reports)."""
        return "on" if self.gemm or self.adam or self.masks else "off"

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """While tracing inside this block, ``models.Dense`` and ``models.Conv`` run as
        this lowering says (nothing changes for the XLA lowering)."""
        with contextlib.ExitStack() as stack:
            if self.gemm:
                from jaxdl.cpu import layers

                stack.enter_context(nn.intercept_methods(layers.intercept))
            if self.conv == "patches":
                stack.enter_context(nn.intercept_methods(_patches))
            yield

    def take_rows(self, x: jax.Array, idx: jax.Array) -> jax.Array:
        """``x[idx]``: (N, *F)[(B,)] -> (B, *F), a minibatch."""
        if self.gemm:
            from jaxdl.cpu import gemm

            return gemm.take_rows(x, idx)
        return x[idx]

    def draw(self, key: jax.Array, p: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """``models.bernoulli(key, p, shape)``, bit for bit."""
        if self.masks:
            from jaxdl.cpu import bernoulli

            return bernoulli.draw(key, p, shape)
        return models.bernoulli(key, p, shape)

    def update(self, optimizer: Optimizer, grads, opt_state, params):
        """``(params, opt_state)`` after one step of ``optimizer`` (its hyperparameters
        already set in ``opt_state``): ``tx.update`` and ``optax.apply_updates``."""
        if self.adam:
            from jaxdl.cpu import adam

            if adam.applies(optimizer):
                return adam.step(optimizer, grads, opt_state, params)
        updates, opt_state = optimizer.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


XLA = Lowering()


def _patches(next_fun, args, kwargs, context):
    """A Flax interceptor: ``Conv.convolve`` of an ``"auto"`` conv as ``conv_patches``."""
    module = context.module
    conv = context.method_name == "convolve" and isinstance(module, models.Conv)
    if conv and module.impl == "auto":
        return models.conv_patches(*args, **kwargs)
    return next_fun(*args, **kwargs)


def resolve(kernels: str = "auto", *, backend: str | None = None) -> Lowering:
    """The ``Lowering`` for ``kernels`` (``"auto"``, ``"on"`` or ``"off"``) on this host,
    whose default backend is ``backend`` (None: JAX's). Raises ``InputError`` for another
    value, or for ``"on"`` where the kernels cannot run (the message says why)."""
    validate.choice("kernels", kernels, KERNELS)
    backend = backend or jax.default_backend()
    if kernels == "auto":
        env = os.environ.get(ENV, "").strip().lower()
        if env:
            validate.choice(f"${ENV}", env, KERNELS)
            kernels = env
    return _resolve(kernels, backend)


@functools.cache
def _resolve(kernels: str, backend: str) -> Lowering:
    conv = "patches" if backend == "cpu" else "xla"
    if kernels == "off":
        return Lowering(conv=conv)
    why = f"the backend is {backend}, not cpu" if backend != "cpu" else _cpu_unavailable()
    if why is None:
        return Lowering(gemm=True, adam=True, masks=True, conv=conv)
    if kernels == "on":
        validate.fail("kernels", f"'auto' or 'off' here: the CPU kernels cannot run ({why})", "on")
    if why.startswith("could not build"):  # worth saying; a CPU without AVX-512 is not
        warnings.warn(f"{why}; jaxdl's programs use XLA alone", RuntimeWarning, stacklevel=3)
    return Lowering(conv=conv)


def _cpu_unavailable() -> str | None:
    from jaxdl import cpu

    return cpu.unavailable()
