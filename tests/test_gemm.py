"""The GEMM kernel: values, independence of tiling and batch, gradients, and its use by
jaxdl's programs (``Lowering.gemm``)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxdl
from jaxdl import cpu, devices, inits, lowering, member_programs, models, step, sweep, train
from jaxdl.cpu import gemm

# Tests that call the kernels run only where they can; the others run anywhere.
needs_kernel = pytest.mark.skipif(
    cpu.unavailable() is not None, reason=f"the CPU kernels cannot run here: {cpu.unavailable()}"
)
# Any of the kernels' FFI calls in a lowered program's text.
ANY_KERNEL = re.compile(r"custom_call @jaxdl_")


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


def _text(fn, *args) -> str:
    return str(jax.jit(fn).lower(*args).as_text())


def _uses_kernel(fn, *args) -> bool:
    return gemm.TARGET in _text(fn, *args)


def _scoped(lowered: lowering.Lowering, fn):
    """``fn`` traced inside ``lowered.scope()``, as jaxdl traces its programs."""

    def wrapped(*args, **kwargs):
        with lowered.scope():
            return fn(*args, **kwargs)

    return wrapped


@needs_kernel
def test_dense_layers_use_it_only_where_it_applies():
    model = jaxdl.MLP(hidden=(64,), num_classes=10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 20)))
    x = jnp.ones((8, 20))
    on, off = lowering.resolve("on"), lowering.resolve("off")
    assert on.gemm and not off.gemm
    plain = lambda p, x: model.apply(p, x)  # noqa: E731
    assert not _uses_kernel(plain, params, x)  # a direct apply: plain XLA
    assert _uses_kernel(_scoped(on, plain), params, x)
    assert not _uses_kernel(_scoped(off, plain), params, x)
    with on.scope():  # the scope holds only while tracing inside it
        assert _uses_kernel(lambda p, x: model.apply(p, x), params, x)
    assert not _uses_kernel(lambda p, x: model.apply(p, x), params, x)  # nothing left over
    assert not ANY_KERNEL.search(_text(plain, params, x))
    narrow = jaxdl.MLP(hidden=(16,), num_classes=3)  # every layer narrower than MIN_WIDTH
    p2 = narrow.init(jax.random.key(0), jnp.zeros((1, 20)))
    assert not _uses_kernel(_scoped(on, lambda p, x: narrow.apply(p, x)), p2, x)
    dims = (((1,), (0,)), ((), ()))
    x16, w16 = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 64), jnp.bfloat16)
    assert not _uses_kernel(lambda a, b: gemm.dot_general(a, b, dims), x16, w16)
    x3, w3 = jnp.ones((2, 4, 8)), jnp.ones((8, 64))
    assert not _uses_kernel(lambda a, b: gemm.dot_general(a, b, (((2,), (0,)), ((), ()))), x3, w3)


@needs_kernel
def test_fit_with_it_matches_xla_and_does_not_retrace(fit_on_and_off):
    fit_on_and_off(jaxdl.MLP((48, 40), num_classes=3), "gemm", rtol=1e-4, atol=1e-5)


def test_it_is_off_where_it_cannot_run(blobs, monkeypatch):
    """A CPU without AVX-512: ``"auto"`` resolves to XLA alone, ``"on"`` is refused with
    the reason; a GPU backend never gets the kernels."""

    def prepare(kernels: str) -> step.Setup:
        opt = jaxdl.make_optimizer("sgd")
        return train.prepare(jaxdl.RunConfig.of(jaxdl.MLP((48,), num_classes=3), opt, epochs=1, batch_size=64, kernels=kernels), blobs.train)[0]  # fmt: skip

    off = lowering.Lowering(conv="patches")
    for backend in ("gpu", "tpu"):
        for kernels in ("auto", "off"):
            got = lowering.resolve(kernels, backend=backend)
            assert got == lowering.XLA and got.conv == "xla" and got.kernels == "off"
    monkeypatch.delenv(lowering.ENV, raising=False)
    # The build's results (functools.cache) stay: the CPU flag is checked before them,
    # and a build under the fake flags would make a library for a CPU that is not here.
    monkeypatch.setattr(devices, "cpu_info", lambda field: "fpu sse2 avx2 fma")
    lowering._resolve.cache_clear()
    try:
        assert gemm.unavailable() == "the CPU has no avx512f"
        assert cpu.unavailable() == "the CPU has no avx512f"
        assert lowering.resolve("auto", backend="cpu") == off
        assert lowering.resolve("off", backend="cpu") == off
        with pytest.raises(jaxdl.InputError, match="kernels cannot run .the CPU has no avx512f"):
            lowering.resolve("on", backend="cpu")
        monkeypatch.setenv(lowering.ENV, "on")  # the environment's "on" replaces "auto"
        with pytest.raises(jaxdl.InputError, match="the CPU has no avx512f"):
            lowering.resolve("auto", backend="cpu")
        monkeypatch.delenv(lowering.ENV)
        if jax.default_backend() == "cpu":
            assert prepare("auto").lowering == off and prepare("off").lowering == off
            with pytest.raises(jaxdl.InputError, match="the CPU has no avx512f"):
                prepare("on")
    finally:
        monkeypatch.undo()
        lowering._resolve.cache_clear()
    model = jaxdl.MLP(hidden=(64,), num_classes=10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 20)))
    text = _text(lambda p, x: model.apply(p, x), params, jnp.ones((8, 20)))
    assert not ANY_KERNEL.search(text)


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
    monkeypatch.setattr(member_programs, "CONCAT_MAX_WIDTH", 8)  # the concatenated form runs XLA's
    if form != "serial":
        monkeypatch.setattr(member_programs, "SERIAL_PLATFORMS", ())
    model, opt = jaxdl.MLP(hidden=(40,), num_classes=3), jaxdl.make_optimizer("adam")
    seeds = [5, 6] if form == "own" else [5]
    configs = sweep.grid(learning_rate=[3e-3, 3e-2])
    kw = dict(epochs=2, batch_size=48, validation=blobs.valid, kernels="on")
    config = jaxdl.RunConfig.of(model, opt, epochs=2, batch_size=48, kernels="on")
    setup, *_ = sweep.prepare_sweep(config, blobs.train, configs, seeds=seeds)
    assert setup.lowering.gemm and member_programs.batch_form(setup, shared=len(seeds) == 1) == form
    res = sweep.sweep(model, opt, blobs.train, configs, seeds=seeds, **kw)
    assert res.kernels == "on"
    for i, row in enumerate(res.rows):
        o = jaxdl.make_optimizer("adam", learning_rate=row["learning_rate"])
        state, _ = jaxdl.fit(model, o, blobs.train, key=row["seed"], **kw)
        member = jax.tree_util.tree_map(lambda v, i=i: v[i], res.states.params)
        for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(state.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def _relu_layer(b, i, o, seed=0):
    x, w = _mats(b, i, o, seed)
    rng = np.random.default_rng(seed + 1)
    bias = rng.standard_normal(o).astype(np.float32)
    x[:2] = 0.0  # rows whose pre-activations are the bias alone,
    bias[: o // 3] = 0.0  # some exactly 0: the ReLU's gradient is 0 there, as jax's
    g = rng.standard_normal((b, o)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w / np.sqrt(i)), jnp.asarray(bias), jnp.asarray(g)


@needs_kernel
@pytest.mark.parametrize(
    "b,i,o",
    [
        (100, 784, 500),  # the default MLP's first layer: threaded, by panels
        (100, 500, 500),
        (37, 50, 70),  # weight gradient with fewer rows than columns: by panels
        (130, 500, 40),  # weight gradient by rows
        (13, 40, 600),
        (5, 3, 33),  # one short sliver, a 1-column last panel
    ],
)
def test_dense_relu_equals_the_unfused_layer_bit_for_bit(b, i, o):
    """relu(x·W + b) in one call and its gradient with the mask applied while packing: the
    same values as the kernel's plain products with XLA's bias, ReLU and mask around
    them, bit for bit; the bias gradient (one sum over the batch in order) to rounding."""
    x, w, bias, g = _relu_layer(b, i, o)
    y, vjp = jax.vjp(jax.jit(gemm.dense_relu), x, w, bias)
    dx, dw, db = vjp(g)
    np.testing.assert_array_equal(y, jax.nn.relu(gemm.matmul(x, w) + bias))
    gz = jnp.where(y > 0, g, 0.0)
    np.testing.assert_array_equal(dx, gemm.matmul(gz, w, tb=True))
    np.testing.assert_array_equal(dw, gemm.matmul(x, gz, ta=True))
    want_db = np.asarray(gz, np.float64).sum(0)
    np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-5 * np.sqrt(b))
    assert float(jnp.abs(gz).sum()) > 0 and float((y == 0).mean()) > 0.2  # both sides of 0

    def xla(x, w, bias):
        return jax.nn.relu(jnp.dot(x, w, precision="highest") + bias)

    want = jax.vjp(xla, x, w, bias)
    np.testing.assert_allclose(y, want[0], rtol=1e-5, atol=1e-5)
    for got, ref in zip((dx, dw, db), want[1](g), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_dense_relu_members_equal_the_layer_alone():
    """vmapped over members with a shared input (not copied) or their own."""
    x, w, bias, g = _relu_layer(60, 90, 70, seed=3)
    ws, bs = jnp.stack([w, -w, 0.5 * w]), jnp.stack([bias, bias + 0.1, -bias])
    xs = jnp.stack([x, x[::-1], 2 * x])

    def grads(x, w, b):
        return jax.grad(lambda x, w, b: jnp.sum(gemm.dense_relu(x, w, b) * g), (0, 1, 2))(x, w, b)

    shared = jax.jit(jax.vmap(grads, in_axes=(None, 0, 0)))(x, ws, bs)
    own = jax.jit(jax.vmap(grads))(xs, ws, bs)
    for k in range(3):
        for got, alone in zip(shared, grads(x, ws[k], bs[k]), strict=True):
            np.testing.assert_array_equal(got[k], alone)
        for got, alone in zip(own, grads(xs[k], ws[k], bs[k]), strict=True):
            np.testing.assert_array_equal(got[k], alone)


@needs_kernel
def test_dense_relu_keeps_nan_and_empty_shapes():
    x, w, bias, g = _relu_layer(20, 40, 50, seed=4)
    y = gemm.dense_relu(x.at[3, 5].set(jnp.nan), w, bias)
    assert bool(jnp.isnan(y[3]).all()) and bool(jnp.isfinite(jnp.delete(y, 3, 0)).all())
    # no inputs: relu(bias) per row; its gradients are empty or the gated sum
    y0, vjp = jax.vjp(gemm.dense_relu, jnp.zeros((4, 0)), jnp.zeros((0, 50)), bias)
    np.testing.assert_array_equal(y0, jnp.broadcast_to(jax.nn.relu(bias), (4, 50)))
    dx, dw, db = vjp(g[:4])
    assert dx.shape == (4, 0) and dw.shape == (0, 50)
    np.testing.assert_allclose(db, jnp.where(bias > 0, g[:4], 0.0).sum(0), rtol=1e-6, atol=1e-6)
    # an empty batch: no rows out, zero gradients
    y1, vjp = jax.vjp(gemm.dense_relu, jnp.zeros((0, 40)), w, bias)
    dx, dw, db = vjp(jnp.zeros((0, 50)))
    assert y1.shape == (0, 50) and dx.shape == (0, 40)
    assert not bool(dw.any()) and not bool(db.any())
    with pytest.raises(ValueError, match=r"bias float32\(3,\); expected float32\(50,\)"):
        gemm.dense_relu(x, w, jnp.zeros(3))


@needs_kernel
@pytest.mark.parametrize("b,i,o", [(100, 784, 500), (130, 500, 40), (5, 3, 33)])
@pytest.mark.parametrize("keep", [0.5, 0.8, 1.0])
def test_dense_relu_with_dropout_equals_the_unfused_layer_bit_for_bit(b, i, o, keep):
    """Dropout on the output inside the same calls: relu(x·W + b)·mask·(1/keep) forward, δ
    times 1/keep where the output is > 0 as it is packed; the same values as the
    kernel's plain products with XLA's bias, ReLU, mask and scaling around them (and
    autodiff of that expression), bit for bit; the bias gradient to rounding."""
    x, w, bias, g = _relu_layer(b, i, o, seed=6)
    mask = jax.random.bernoulli(jax.random.key(b + o), 0.6, (b, o)).astype(jnp.float32)
    div = jnp.float32(keep)
    fused = jax.jit(lambda x, w, bias, div: gemm.dense_relu(x, w, bias, mask, div))
    y, vjp = jax.vjp(fused, x, w, bias, div)
    dx, dw, db, ddiv = vjp(g)

    def unfused(x, w, bias, div):  # as models.apply_dropout writes it
        return (jax.nn.relu(gemm.dense(x, w) + bias) * mask) * (1.0 / div)

    want, want_vjp = jax.vjp(jax.jit(unfused), x, w, bias, div)
    np.testing.assert_array_equal(y, want)
    want_dx, want_dw, want_db, want_ddiv = want_vjp(g)
    np.testing.assert_array_equal(dx, want_dx)
    np.testing.assert_array_equal(dw, want_dw)
    np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-5 * np.sqrt(b))
    np.testing.assert_allclose(ddiv, want_ddiv, rtol=1e-4)  # the keep probability's
    assert float(jnp.abs(ddiv)) > 0
    assert float((mask == 0).mean()) > 0.2 and float((y > 0).mean()) > 0.1


@needs_kernel
@pytest.mark.parametrize("b,i,o", [(100, 784, 500), (7, 0, 40)])
def test_dense_relu_with_any_mask_has_the_unfused_gradients(b, i, o):
    """Masks that are not 0/1 (scaled, negative, as in Gaussian dropout): the gradients
    still equal autodiff of the unfused expression (δ·mask where z > 0, not where y > 0)."""
    x, w, bias, g = _relu_layer(b, max(i, 1), o, seed=9)
    x, w = x[:, :i], w[:i]
    values = jnp.array([0.0, 0.5, 1.0, -1.0, 2.0, 1.3])
    mask = values[jax.random.randint(jax.random.key(3), (b, o), 0, len(values))]

    def fused(x, w, bias, div):
        return gemm.dense_relu(x, w, bias, mask, div)

    def unfused(x, w, bias, div):
        return (jax.nn.relu(x @ w + bias) * mask) * (1.0 / div)

    args = (x, w, bias, jnp.float32(0.8))
    y, vjp = jax.vjp(jax.jit(fused), *args)
    want, want_vjp = jax.vjp(unfused, *args)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    for got, exp in zip(vjp(g), want_vjp(g), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_dense_relu_with_dropout_members_equal_the_layer_alone():
    x, w, bias, g = _relu_layer(60, 90, 70, seed=7)
    ws = jnp.stack([w, -w, 0.5 * w])
    masks = jax.random.bernoulli(jax.random.key(0), 0.5, (3, 60, 70)).astype(jnp.float32)
    divs = jnp.array([0.5, 0.8, 1.0], jnp.float32)

    def grads(w, mask, div):
        f = lambda x, w, b: jnp.sum(gemm.dense_relu(x, w, b, mask, div) * g)  # noqa: E731
        return jax.value_and_grad(f, (0, 1, 2))(x, w, bias)

    batched = jax.jit(jax.vmap(grads))(ws, masks, divs)
    for k in range(3):
        alone = grads(ws[k], masks[k], divs[k])
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(alone), strict=True):
            np.testing.assert_array_equal(got[k], want)


@needs_kernel
def test_dense_relu_dropout_errors_and_empty_inputs():
    x, w, bias, g = _relu_layer(20, 40, 50, seed=8)
    mask = jnp.ones((20, 50))
    with pytest.raises(ValueError, match="mask and divisor together"):
        gemm.dense_relu(x, w, bias, mask)
    with pytest.raises(ValueError, match=r"mask float32\(20, 49\); expected float32\(20, 50\)"):
        gemm.dense_relu(x, w, bias, mask[:, 1:], 0.5)
    # no inputs: (relu(bias)·mask)/div per row, and the gated, divided sum
    half = mask.at[:, ::2].set(0.0)[:4]
    y0, vjp = jax.vjp(lambda x, w, b: gemm.dense_relu(x, w, b, half, 0.5),
                      jnp.zeros((4, 0)), jnp.zeros((0, 50)), bias)  # fmt: skip
    np.testing.assert_array_equal(y0, (jax.nn.relu(bias) * half) * 2.0)
    _, _, db = vjp(g[:4])
    want = jnp.where(y0 > 0, g[:4] / 0.5, 0.0).sum(0)
    np.testing.assert_allclose(db, want, rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize(
    "convention,hidden", [("inverted", (64, 40)), ("classic", (64, 40)), ("inverted", (64, 16, 40))]
)
def test_mlp_dropout_runs_inside_the_fused_layers_with_the_same_values(convention, hidden):
    """A training forward with masks applies the hidden layers' dropout inside the fused
    calls (no elementwise multiply by a (B, O) mask left to XLA) and gives the loss and
    gradients (the parameters' and the rates') of the layer-by-layer expression with the
    same kernel, to rounding; a layer too narrow for the kernel between them (16 units)
    still gets its dropout."""
    model = jaxdl.MLP(hidden=hidden, num_classes=3, dropout_convention=convention)
    x = jax.random.normal(jax.random.key(1), (16, 20))
    params = model.init(jax.random.key(0), x)
    rates = jnp.linspace(0.2, 0.5, len(hidden) + 1)
    masks = jaxdl.sample_masks(jax.random.key(2), rates, (20, *hidden), 16)

    def plain(p, m, rates):
        return jnp.sum(model.apply(p, x, rates=rates, masks=m, train=True) ** 2)

    loss = _scoped(lowering.resolve("on"), plain)  # as jaxdl's programs trace it

    def unfused(p, m, rates):  # the same layers, each step as XLA would run it around the kernel
        h = models.apply_dropout(x, m[0], rates[0], convention)
        for i, width in enumerate(hidden):
            layer = p["params"][f"layer_{i}"]
            product = gemm.dense if width >= gemm.MIN_WIDTH else gemm.narrow
            h = jax.nn.relu(product(h, layer["kernel"]) + layer["bias"])
            h = models.apply_dropout(h, m[i + 1], rates[i + 1], convention)
        out = p["params"]["output"]
        return jnp.sum((gemm.narrow(h, out["kernel"]) + out["bias"]) ** 2)

    text = jax.jit(jax.grad(loss)).lower(params, masks, rates).as_text()
    calls = re.findall(rf"@{gemm.TARGET_BIAS}\(([^)]*)\)", text)
    assert [c.count(",") + 1 for c in calls] == [5, 5]  # x, W, b, mask, divisor
    assert ANY_KERNEL.search(text)
    # a direct apply, outside the scope, is plain XLA: no kernel at all
    assert not ANY_KERNEL.search(_text(jax.grad(plain), params, masks, rates))
    got, want = (
        jax.jit(jax.value_and_grad(loss, (0, 2)))(params, masks, rates),
        jax.value_and_grad(unfused, (0, 2))(params, masks, rates),
    )
    if convention == "inverted":  # every rate has its gradient (classic's train step has none)
        assert float(jnp.abs(got[1][1]).min()) > 0
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_relu_layers_run_fused_with_nn_dense_parameters():
    """Hidden ReLU layers at least MIN_WIDTH wide run as dense_relu, with the parameters
    nn.Dense would have (same names, shapes and initial values); batch norm and other
    activations use the plain product; the "off" lowering and a direct apply no kernel."""
    x = jnp.ones((8, 20))

    def targets(model, lowered: lowering.Lowering | None):
        def run(fn):
            return fn if lowered is None else _scoped(lowered, fn)

        params = jax.jit(run(lambda k: model.init(k, x)))(jax.random.key(0))
        text = _text(run(lambda p: model.apply(p, x)), params)
        return params, gemm.TARGET_BIAS in text, gemm.TARGET in text

    on, off = lowering.resolve("on"), lowering.resolve("off")
    fused, has_fused, _ = targets(jaxdl.MLP(hidden=(64, 40), num_classes=3), on)
    assert has_fused
    for lowered in (off, None):
        plain, has_fused, has_any = targets(jaxdl.MLP(hidden=(64, 40), num_classes=3), lowered)
        assert not has_fused and not has_any
        assert jax.tree.structure(fused) == jax.tree.structure(plain)
        for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(plain), strict=True):
            np.testing.assert_array_equal(a, b)

    class WithNNDense(nn.Module):  # the same layers as flax's nn.Dense
        @nn.compact
        def __call__(self, x):
            init = inits.unit_initializer("xavier_uniform")
            for i, width in enumerate((64, 40)):
                x = nn.relu(nn.Dense(width, kernel_init=init, name=f"layer_{i}")(x))
            return nn.Dense(3, kernel_init=init, name="output")(x)

    want = WithNNDense().init(jax.random.key(0), x)
    assert jax.tree.structure(fused) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    for model in (jaxdl.MLP(hidden=(64,), activation="tanh"),
                  jaxdl.MLP(hidden=(64,), batch_norm=True)):  # fmt: skip
        _, has_fused, has_any = targets(model, on)
        assert not has_fused and has_any


@needs_kernel
def test_a_narrow_layers_weight_gradient_equals_xla_autodiff():
    """Layers narrower than MIN_WIDTH keep XLA's products but for xᵀ·δ, taken by the
    kernel as (δᵀ·x)ᵀ."""
    x, w = (jnp.asarray(v) for v in _mats(100, 500, 10, seed=5))
    f = lambda x, w: jnp.sum(jnp.tanh(gemm.dot_general(x, w, (((1,), (0,)), ((), ())))) ** 2)  # noqa: E731
    got = jax.grad(f, (0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w) ** 2), (0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert _uses_kernel(jax.grad(f, 1), x, w) and not _uses_kernel(f, x, w)


@needs_kernel
def test_take_rows_equals_indexing():
    x = jax.random.normal(jax.random.key(0), (300, 784))
    idx = jnp.array([0, 299, 5, -1, -300, -301, 300, 10_000, 7] * 12, jnp.int32)
    np.testing.assert_array_equal(jax.jit(gemm.take_rows)(x, idx), x[idx])
    images = jax.random.normal(jax.random.key(1), (40, 28, 28, 1))
    np.testing.assert_array_equal(gemm.take_rows(images, idx % 40), images[idx % 40])
    assert "jaxdl_take_rows" in jax.jit(gemm.take_rows).lower(x, idx).as_text()
    labels = jnp.arange(300)
    np.testing.assert_array_equal(gemm.take_rows(labels, idx), labels[idx])  # XLA's
    on, off = lowering.resolve("on"), lowering.resolve("off")
    assert "jaxdl_take_rows" in jax.jit(on.take_rows).lower(x, idx).as_text()
    assert "jaxdl_take_rows" not in jax.jit(off.take_rows).lower(x, idx).as_text()
    np.testing.assert_array_equal(jax.jit(on.take_rows)(x, idx), jax.jit(off.take_rows)(x, idx))
    per_member = jax.vmap(gemm.take_rows, in_axes=(None, 0))(x, idx.reshape(4, 27))
    np.testing.assert_array_equal(per_member, x[idx].reshape(4, 27, 784))


@needs_kernel
def test_kernels_sharing_helpers_give_the_same_bits_every_time():
    """Row copies, fused layers and fused Adam updates one after another pass their work
    to a helper that waits between calls: repeated runs are bit for bit equal."""
    from jaxdl import optim
    from jaxdl.cpu import adam

    x, w, bias, g = _relu_layer(100, 784, 500, seed=6)
    data = jax.random.normal(jax.random.key(2), (5000, 784))
    opt = jaxdl.make_optimizer("adam", learning_rate=1e-3)
    params = {"layer": {"kernel": w, "bias": bias}}
    opt_state = optim.set_hyperparams(opt.init(params), {"learning_rate": 1e-3})

    @jax.jit
    def run(params, opt_state, idx):
        def body(c, i):
            params, opt_state = c
            rows = gemm.take_rows(data, i)
            layer = params["layer"]
            loss = lambda p: jnp.sum(gemm.dense_relu(rows, p["kernel"], p["bias"]) * g)  # noqa: E731
            grads = {"layer": jax.grad(loss)(layer)}
            return adam.step(opt, grads, opt_state, params), None

        return jax.lax.scan(body, (params, opt_state), idx)[0]

    idx = jax.random.randint(jax.random.key(3), (20, 100), 0, 5000).astype(jnp.int32)
    first = jax.tree.leaves(run(params, opt_state, idx))
    assert not np.array_equal(first[1], w)  # trained
    for _ in range(3):
        for a, b in zip(first, jax.tree.leaves(run(params, opt_state, idx)), strict=True):
            np.testing.assert_array_equal(a, b)
