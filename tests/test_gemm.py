"""The GEMM kernel: values, independence of tiling and batch, gradients, and its use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl
from jaxdl import devices, gemm, sweep, train

needs_kernel = pytest.mark.skipif(
    gemm.unavailable() is not None, reason=f"GEMM kernel unavailable: {gemm.unavailable()}"
)


def _mats(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k), np.float32)
    b = rng.standard_normal((k, n), np.float32)
    return a, b


@needs_kernel
@pytest.mark.parametrize(
    "m,k,n",
    [
        (1, 1, 1),
        (7, 3, 45),  # one short sliver and a short panel
        (100, 784, 500),  # forward of the first layer: threaded, by panels, k blocks
        (500, 100, 500),  # weight-gradient shape: threaded, by rows
        (130, 33, 17),
        (37, 600, 64),  # k not a multiple of the block or of 16
    ],
)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_equals_the_product_for_every_transpose(m, k, n, ta, tb):
    a, b = _mats(m, k, n)
    want = a.astype(np.float64) @ b.astype(np.float64)
    got = gemm.matmul(jnp.asarray(a.T if ta else a), jnp.asarray(b.T if tb else b), ta=ta, tb=tb)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    # float32 sums of k products: error grows like sqrt(k) times the products' size
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6 * np.sqrt(k) * 4 + 1e-6)


@needs_kernel
def test_results_do_not_depend_on_tiling_threads_or_batch():
    """Each element is one sum in k order: rows computed alone, in another tile position,
    single-threaded (a small product) or as a vmapped member are bit for bit the same."""
    a, b = _mats(100, 784, 500)
    full = np.asarray(gemm.matmul(jnp.asarray(a), jnp.asarray(b)))
    for lo, hi in [(0, 1), (5, 17), (88, 100)]:
        part = np.asarray(gemm.matmul(jnp.asarray(a[lo:hi]), jnp.asarray(b[:, 64:100])))
        np.testing.assert_array_equal(part, full[lo:hi, 64:100])
    bs = np.stack([b, b[:, ::-1].copy(), 2 * b])
    batched = jax.vmap(gemm.matmul, in_axes=(None, 0))(jnp.asarray(a), jnp.asarray(bs))
    for i in range(3):
        np.testing.assert_array_equal(batched[i], gemm.matmul(jnp.asarray(a), jnp.asarray(bs[i])))
    both = jax.vmap(lambda x, w: gemm.matmul(x, w, tb=True))(
        jnp.asarray(np.stack([a, a + 1])), jnp.asarray(np.stack([b.T, b.T]))
    )
    np.testing.assert_array_equal(
        both[1], gemm.matmul(jnp.asarray(a + 1), jnp.asarray(b.T), tb=True)
    )


@needs_kernel
def test_dense_gradients_equal_xla_autodiff():
    x, w = _mats(50, 70, 40, seed=1)
    x, w = jnp.asarray(x), jnp.asarray(w)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.tanh(f(x, w)) ** 2)

    got = jax.grad(loss(gemm.dense), argnums=(0, 1))(x, w)
    want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    # and under vmap over members that share the input
    ws = jnp.stack([w, -w, 0.5 * w])
    got = jax.vmap(jax.grad(loss(gemm.dense), argnums=1), in_axes=(None, 0))(x, ws)
    want = jax.vmap(jax.grad(loss(jnp.matmul), argnums=1), in_axes=(None, 0))(x, ws)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _uses_kernel(fn, *args) -> bool:
    return gemm.TARGET in str(jax.jit(fn).lower(*args).as_text())


@needs_kernel
def test_dense_layers_use_it_only_where_it_applies():
    model = jaxdl.MLP(hidden=(64,), num_classes=10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 20)))
    x = jnp.ones((8, 20))
    assert _uses_kernel(lambda p, x: model.apply(p, x), params, x)
    with gemm.use(False):
        assert not _uses_kernel(lambda p, x: model.apply(p, x), params, x)
        with gemm.use(True):
            assert _uses_kernel(lambda p, x: model.apply(p, x), params, x)
        assert not _uses_kernel(lambda p, x: model.apply(p, x), params, x)
    assert _uses_kernel(lambda p, x: model.apply(p, x), params, x)  # restored after use()
    narrow = jaxdl.MLP(hidden=(16,), num_classes=3)  # every layer narrower than MIN_WIDTH
    p2 = narrow.init(jax.random.key(0), jnp.zeros((1, 20)))
    assert not _uses_kernel(lambda p, x: narrow.apply(p, x), p2, x)
    dims = (((1,), (0,)), ((), ()))
    x16, w16 = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 64), jnp.bfloat16)
    assert not _uses_kernel(lambda a, b: gemm.dot_general(a, b, dims), x16, w16)
    x3, w3 = jnp.ones((2, 4, 8)), jnp.ones((8, 64))
    assert not _uses_kernel(lambda a, b: gemm.dot_general(a, b, (((2,), (0,)), ((), ()))), x3, w3)


@needs_kernel
def test_fit_with_it_matches_xla_and_does_not_retrace(fit_on_and_off):
    fit_on_and_off(jaxdl.MLP((48, 40), num_classes=3), "gemm", rtol=1e-4, atol=1e-5)


def test_it_is_off_where_it_cannot_run(blobs, monkeypatch):
    def setup_gemm() -> bool:
        opt = jaxdl.make_optimizer("sgd")
        return train.prepare(jaxdl.MLP((48,), num_classes=3), opt, blobs.train, epochs=1,
                             batch_size=64)[0].gemm  # fmt: skip

    monkeypatch.setenv("JAXDL_GEMM", "0")
    assert gemm.unavailable() == "JAXDL_GEMM=0"
    assert not setup_gemm()
    monkeypatch.delenv("JAXDL_GEMM")
    monkeypatch.setattr(devices, "cpu_info", lambda field: "fpu sse2 avx2 fma")
    assert gemm.unavailable() == "the CPU has no avx512f"
    assert not setup_gemm()
    model = jaxdl.MLP(hidden=(64,), num_classes=10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 20)))
    assert not _uses_kernel(lambda p, x: model.apply(p, x), params, jnp.ones((8, 20)))


@pytest.mark.parametrize(
    "a,b,kw,match",
    [
        ((4, 5), (6, 3), {}, "contract over 5 and 6"),
        ((5, 4), (5, 3), {"ta": False}, "contract over 4 and 5"),
        ((4, 5), (3, 6), {"tb": True}, "contract over 5 and 6"),
        ((2, 4, 5), (5, 3), {}, "expected float32 matrices"),
    ],
)
def test_bad_shapes_are_named_on_the_host(a, b, kw, match):
    with pytest.raises(ValueError, match=match):
        gemm.matmul(jnp.ones(a), jnp.ones(b), **kw)
    with pytest.raises(ValueError, match="expected float32"):
        gemm.matmul(jnp.ones((4, 5), jnp.int32), jnp.ones((5, 3)))


@needs_kernel
@pytest.mark.parametrize("form", ["serial", "shared_batched", "own"])
def test_sweep_members_with_it_equal_standalone_fits(blobs, monkeypatch, form):
    """In each way a sweep runs its members (in turn, vmapped over a shared minibatch,
    vmapped with their own), a member equals its standalone fit."""
    monkeypatch.setattr(sweep, "CONCAT_MAX_WIDTH", 8)  # the concatenated form runs XLA's
    if form != "serial":
        monkeypatch.setattr(sweep, "SERIAL_PLATFORMS", ())
    model, opt = jaxdl.MLP(hidden=(40,), num_classes=3), jaxdl.make_optimizer("adam")
    seeds = [5, 6] if form == "own" else [5]
    configs = sweep.grid(learning_rate=[3e-3, 3e-2])
    kw = dict(epochs=2, batch_size=48, validation=blobs.valid)
    setup, *_ = sweep.prepare_sweep(model, opt, blobs.train, configs, seeds=seeds, **kw)
    assert setup.gemm and sweep.batch_form(setup, shared=len(seeds) == 1) == form
    res = sweep.sweep(model, opt, blobs.train, configs, seeds=seeds, **kw)
    for i, row in enumerate(res.rows):
        o = jaxdl.make_optimizer("adam", learning_rate=row["learning_rate"])
        state, _ = jaxdl.fit(model, o, blobs.train, key=row["seed"], **kw)
        member = jax.tree_util.tree_map(lambda v, i=i: v[i], res.states.params)
        for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(state.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
