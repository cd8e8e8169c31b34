"""The dense layers' matrix products on the CPU: a compiled XLA FFI kernel (``gemm.cc``).

At training's batch sizes (e.g. 100×784 · 784×500) XLA:CPU's GEMMs use about half of
the cores' FMA rate. A packed, register-tiled AVX-512 kernel runs the default MLP's
step GEMMs 1.1–1.2× faster (x·W and δ·Wᵀ 1.2–1.5×, xᵀ·δ about as fast), and a whole
epoch of ``fit`` 1.05–1.09× (``benchmarks/bench_gemm.py``, ``bench_train.py``;
``benchmarks/README.md``).

``dot_general`` is a drop-in for ``lax.dot_general`` for jaxdl's dense layers
(``models.Dense``) when the CPU lowering runs them: a float32 (B, I)·(I, O) product with O ≥ ``MIN_WIDTH`` uses the kernel,
with its own gradient rule (x·W forward, δ·Wᵀ and xᵀ·δ backward, all by the kernel)
and batching rule (members of a ``vmap`` share unbatched operands, never copied); a
narrower one (the output layer) keeps XLA's products but for its weight gradient
(``narrow``); anything else goes to ``lax.dot_general``. A hidden ReLU layer without
batch norm runs as ``dense_relu``: bias and ReLU inside the forward
call, the ReLU's mask and the bias gradient inside the backward calls, and a training
step's dropout on the layer's output too (mask and scale, forward and backward).
``take_rows`` takes a minibatch from the data set by rows.

Why fuse: between two kernel calls, XLA's elementwise passes over (B, O) wait on a pool
thread that has gone idle, and waking one takes 30-50 µs on some virtual machines; the
kernels' helpers instead wait for the next call spinning, for a while (``team.h``).
Together: one epoch of the default MLP 1.06–1.15× faster than with the plain kernel
(``benchmarks/README.md``).

Used only by ``jaxdl.lowering``'s CPU lowering, for jaxdl's own compiled programs; it is
on where the kernel can be used: the CPU backend, a CPU with AVX-512, a C++ compiler.

Values equal XLA's up to float32 rounding. Each output is one sum over k in increasing
order, whatever the tiling, the threads or the batch, so a vmapped member equals the
same product alone bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxdl.cpu import build

TARGET = "jaxdl_matmul"
TARGET_BIAS = "jaxdl_matmul_bias"  # relu(x·W + b), the fused layer's forward
TARGET_GATE_A = "jaxdl_matmul_gate_a"  # (δ where y > 0)·Wᵀ, its input gradient
TARGET_GATE_B = "jaxdl_matmul_gate_b"  # xᵀ·(δ where y > 0) and Σδ, its parameters' gradients
TARGET_TAKE_ROWS = "jaxdl_take_rows"  # x[idx], a minibatch
_HANDLERS = (
    ("JaxdlMatmul", TARGET), ("JaxdlMatmulBias", TARGET_BIAS),
    ("JaxdlMatmulGateA", TARGET_GATE_A), ("JaxdlMatmulGateB", TARGET_GATE_B),
    ("JaxdlTakeRows", TARGET_TAKE_ROWS),
)  # fmt: skip
SOURCE = "gemm.cc"
MIN_WIDTH = 32  # dense layers narrower than this use XLA's GEMMs


def unavailable() -> str | None:
    """Why the kernel cannot be used on this host (None: it can). Builds and registers it
    on first use (on the host, when a lowering is resolved)."""
    return build.why_not(SOURCE, _HANDLERS, what="the GEMM kernel", cpu_flag="avx512f")


def _contract(a: jax.Array, b: jax.Array, ta: bool, tb: bool) -> tuple[int, int]:
    """(M, N) of ``op(a) @ op(b)``; raises ``ValueError`` for anything but float32
    matrices that contract over equal lengths."""
    if a.ndim != 2 or b.ndim != 2 or a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise ValueError(f"matmul: expected float32 matrices, got {a.dtype}{a.shape} and "
                         f"{b.dtype}{b.shape}")  # fmt: skip
    k_a, k_b = a.shape[0 if ta else 1], b.shape[1 if tb else 0]
    if k_a != k_b:
        raise ValueError(f"matmul: op(a) {a.shape} and op(b) {b.shape} contract over "
                         f"{k_a} and {k_b} elements; expected equal")  # fmt: skip
    return a.shape[1 if ta else 0], b.shape[0 if tb else 1]


def _call(target: str, shapes, *args, **attrs):
    """One kernel call; ``shapes``: the float32 outputs' shapes. Under ``vmap``,
    unbatched operands are shared by every member (not copied)."""
    outs = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
    call = jax.ffi.ffi_call(target, outs if len(outs) > 1 else outs[0], vmap_method="expand_dims")
    return call(*args, **{k: int(v) for k, v in attrs.items()})


def matmul(a: jax.Array, b: jax.Array, *, ta: bool = False, tb: bool = False) -> jax.Array:
    """``op(a) @ op(b)`` for float32 matrices, ``op`` a transpose where ``ta``/``tb``:
    (M, K)·(K, N) -> (M, N) with ``a`` stored (K, M) if ``ta`` and ``b`` (N, K) if ``tb``.
    Under ``vmap``, unbatched operands are shared by every member (not copied)."""
    return _call(TARGET, [_contract(a, b, ta, tb)], a, b, ta=ta, tb=tb)


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


@jax.custom_vjp
def narrow(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for a layer narrower than ``MIN_WIDTH`` (B, I)·(I, O): XLA's GEMMs, but
    for the weight gradient: xᵀ·δ (I, O) is computed as (δᵀ·x)ᵀ by the kernel, whose
    rows then fill its tiles (XLA's CPU GEMM takes 2-4× longer at (500, 100)·(100, 10))."""
    return lax.dot(x, w)


def _narrow_fwd(x, w):
    return lax.dot(x, w), (x, w)


def _narrow_bwd(res, g):
    x, w = res
    return lax.dot(g, w.T), matmul(g, x, ta=True).T


narrow.defvjp(_narrow_fwd, _narrow_bwd)


def dense_relu(
    x: jax.Array, w: jax.Array, b: jax.Array, mask: jax.Array | None = None, div=None
) -> jax.Array:
    """``relu(x @ w + b)``: (B, I)·(I, O) + (O,) -> (B, O), float32, in one kernel call;
    its gradient takes two more (δ·Wᵀ; xᵀ·δ with Σδ), each applying the ReLU's mask
    (δ where the output is > 0) as it packs δ, so no elementwise pass over (B, O) runs
    outside the kernel. With dropout's ``mask`` (B, O) (0/1, or any other values) and
    divisor ``div`` (a float32 scalar: the keep probability, or 1),
    ``(relu(x @ w + b) * mask) / div``, the gradient's δ divided by ``div`` and masked as
    it is packed; ``div`` gets its gradient (−Σ g·y / div, which XLA drops when nothing
    uses it), ``mask`` none: a sample, as in ``models.apply_dropout``. Values equal the unfused expression's with ``dense``,
    except the bias gradient's rounding (one sum over the batch in order)."""
    if (mask is None) != (div is None):
        raise ValueError("dense_relu: give dropout's mask and divisor together")
    if b.shape != (w.shape[-1],) or b.dtype != jnp.float32:
        raise ValueError(f"dense_relu: bias {b.dtype}{b.shape}; expected float32"
                         f"{(w.shape[-1],)}")  # fmt: skip
    drop = ()
    if mask is not None:
        shape = _contract(x, w, False, False)
        if mask.shape != shape or mask.dtype != jnp.float32:
            raise ValueError(f"dense_relu: mask {mask.dtype}{mask.shape}; expected float32{shape}")
        drop = (lax.stop_gradient(mask), jnp.asarray(div, jnp.float32).reshape(1, 1))
    return _dense_relu(x, w, b, drop)


@jax.custom_vjp
def _dense_relu(x, w, b, drop):
    return _dense_relu_fwd(x, w, b, drop)[0]


def _dense_relu_fwd(x, w, b, drop):
    shape = _contract(x, w, False, False)
    y = _call(TARGET_BIAS, [shape], x, w, b[None], *drop, ta=0, tb=0, relu=1)
    return y, (x, w, y, drop)


def _dense_relu_bwd(res, g):
    # With dropout the kernels take δ·(1/div)·mask where y·mask·(1/div) > 0, i.e. where
    # z > 0 (y = relu(z)·mask/div) for any mask, not only 0/1.
    x, w, y, drop = res
    dx = _call(TARGET_GATE_A, [x.shape], g, w, y, *drop, tb=1)
    dw, db = _call(TARGET_GATE_B, [w.shape, (1, w.shape[1])], x, g, y, *drop, ta=1)
    # ∂y/∂div = −y/div
    ddrop = (None, -jnp.sum(g * y).reshape(1, 1) / drop[1]) if drop else ()
    return dx, dw, db[0], ddrop


_dense_relu.defvjp(_dense_relu_fwd, _dense_relu_bwd)


def fusable(activation: str, x: jax.Array, width: int) -> bool:
    """Whether a dense layer of ``width`` units on ``x`` followed by ``activation`` runs
    as one ``dense_relu`` (a float32 (B, I) input, a ReLU, at least ``MIN_WIDTH`` units)."""
    return activation == "relu" and x.ndim == 2 and x.dtype == jnp.float32 and width >= MIN_WIDTH


def take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[idx]``: (N, *F)[(B,)] -> (B, *F), by rows copied in the kernel's library where
    ``x`` is float32 (XLA:CPU's gather copies element by element), else by XLA. Indices are read as ``x[idx]`` reads them (negative from the end, then clamped)."""
    if not (x.dtype == jnp.float32 and x.ndim >= 2 and idx.ndim == 1
            and x.shape[0] > 0 and idx.dtype == jnp.int32):  # fmt: skip
        return x[idx]
    rows = x.reshape(x.shape[0], -1)
    out = jax.ShapeDtypeStruct((idx.shape[0], rows.shape[1]), jnp.float32)
    taken = jax.ffi.ffi_call(TARGET_TAKE_ROWS, out, vmap_method="sequential")(rows, idx)
    return taken.reshape(idx.shape[0], *x.shape[1:])


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general``, with float32 (B, I)·(I, O) products by the kernel (the
    signature flax's ``nn.Dense(dot_general=...)`` calls)."""
    (lc, rc), (lb, rb) = dimension_numbers
    plain = (
        lhs.ndim == rhs.ndim == 2
        and (tuple(lc), tuple(rc), tuple(lb), tuple(rb)) == ((1,), (0,), (), ())
        and lhs.dtype == rhs.dtype == jnp.float32
        and preferred_element_type in (None, jnp.float32)
    )
    # Narrow layers (the output layer's 10 classes) fill too little of the kernel's 32
    # columns; XLA's GEMMs are faster for them, but for the weight gradient (``narrow``).
    if plain:
        return dense(lhs, rhs) if rhs.shape[1] >= MIN_WIDTH else narrow(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
