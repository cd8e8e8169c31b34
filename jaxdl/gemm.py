"""The dense layers' matrix products on the CPU: a compiled XLA FFI kernel (``gemm.cc``).

At training's batch sizes (e.g. 100×784 · 784×500) XLA:CPU's GEMMs use about half of
the cores' FMA rate. A packed, register-tiled AVX-512 kernel runs the default MLP's
step GEMMs 1.1–1.2× faster (x·W and δ·Wᵀ 1.2–1.5×, xᵀ·δ about as fast), and a whole
epoch of ``fit`` 1.05–1.09× (``benchmarks/bench_gemm.py``, ``bench_train.py``;
``benchmarks/README.md``).

``dot_general`` is a drop-in for ``lax.dot_general`` that ``jaxdl.models`` gives its
dense layers: a float32 (B, I)·(I, O) product with O ≥ ``MIN_WIDTH`` uses the kernel,
with its own gradient rule (x·W forward, δ·Wᵀ and xᵀ·δ backward, all by the kernel)
and batching rule (members of a ``vmap`` share unbatched operands, never copied);
anything else goes to ``lax.dot_general``. It is on where the kernel can be used: the
CPU backend, a CPU with AVX-512, a C++ compiler (``jaxdl.kernels``). ``JAXDL_GEMM=0``
turns it off, and ``use(False)`` does for what is traced inside it (``Setup.gemm``).

Values equal XLA's up to float32 rounding. Each output is one sum over k in increasing
order, whatever the tiling, the threads or the batch, so a vmapped member equals the
same product alone bit for bit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax

from jaxdl import kernels

TARGET = "jaxdl_matmul"
SOURCE = "gemm.cc"
_ENV_OFF = "JAXDL_GEMM"
MIN_WIDTH = 32  # dense layers narrower than this use XLA's GEMMs
_local = threading.local()


def unavailable() -> str | None:
    """Why the kernel cannot be used here (None: it can). Builds it on first use; a failed
    build warns once and the dense layers use XLA's GEMMs."""
    return kernels.why_not(
        SOURCE, "JaxdlMatmul", TARGET, env_off=_ENV_OFF, what="the GEMM kernel",
        instead="dense layers use XLA's GEMMs", cpu_flag="avx512f",
    )  # fmt: skip


@contextlib.contextmanager
def use(on: bool) -> Iterator[None]:
    """Within this block (while tracing), dense layers use the kernel only if ``on`` (and
    it is available)."""
    before = getattr(_local, "on", None)
    _local.on = bool(on)
    try:
        yield
    finally:
        _local.on = before


def active() -> bool:
    """Whether a dense layer traced now uses the kernel."""
    on = getattr(_local, "on", None)  # None: outside any use() block
    return on is not False and unavailable() is None


def matmul(a: jax.Array, b: jax.Array, *, ta: bool = False, tb: bool = False) -> jax.Array:
    """``op(a) @ op(b)`` for float32 matrices, ``op`` a transpose where ``ta``/``tb``:
    (M, K)·(K, N) -> (M, N) with ``a`` stored (K, M) if ``ta`` and ``b`` (N, K) if ``tb``.
    Under ``vmap``, unbatched operands are shared by every member (not copied)."""
    if a.ndim != 2 or b.ndim != 2 or a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise ValueError(f"matmul: expected float32 matrices, got {a.dtype}{a.shape} and "
                         f"{b.dtype}{b.shape}")  # fmt: skip
    k_a, k_b = a.shape[0 if ta else 1], b.shape[1 if tb else 0]
    if k_a != k_b:
        raise ValueError(f"matmul: op(a) {a.shape} and op(b) {b.shape} contract over "
                         f"{k_a} and {k_b} elements; expected equal")  # fmt: skip
    why = unavailable()  # at trace time: the handler exists before XLA compiles a call
    if why is not None:
        raise RuntimeError(why)
    m, n = a.shape[1 if ta else 0], b.shape[0 if tb else 1]
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="expand_dims")
    return call(a, b, ta=int(ta), tb=int(tb))


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w``: (B, I)·(I, O) -> (B, O), float32, by the kernel, forward and backward."""
    return matmul(x, w)


def _dense_fwd(x, w):
    return matmul(x, w), (x, w)


def _dense_bwd(res, g):
    x, w = res
    return matmul(g, w, tb=True), matmul(x, g, ta=True)


dense.defvjp(_dense_fwd, _dense_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general``, with float32 (B, I)·(I, O) products by the kernel when
    ``active()`` (the signature flax's ``nn.Dense(dot_general=...)`` calls)."""
    (lc, rc), (lb, rb) = dimension_numbers
    plain = (
        lhs.ndim == rhs.ndim == 2
        and (tuple(lc), tuple(rc), tuple(lb), tuple(rb)) == ((1,), (0,), (), ())
        and lhs.dtype == rhs.dtype == jnp.float32
        and preferred_element_type in (None, jnp.float32)
    )
    # Narrow layers (the output layer's 10 classes) fill too little of the kernel's 32
    # columns; XLA's GEMMs are faster for them.
    if plain and rhs.shape[1] >= MIN_WIDTH and active():
        return dense(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
