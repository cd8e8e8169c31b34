"""The Bernoulli kernel: jax.random.bernoulli's draws bit for bit, alone and vmapped, and
as jaxdl's programs' dropout masks (``Lowering.masks``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl
from jaxdl import compiled, cpu, lowering, models, train
from jaxdl.cpu import bernoulli

# Tests that call the kernels run only where they can; the others run anywhere.
needs_kernel = pytest.mark.skipif(
    cpu.unavailable() is not None, reason=f"the CPU kernels cannot run here: {cpu.unavailable()}"
)


def _jax(key, p, shape):
    return jax.random.bernoulli(key, p, shape).astype(jnp.float32)


def _uses_kernel(fn, *args) -> bool:
    return bernoulli.TARGET in jax.jit(fn).lower(*args).as_text()


@needs_kernel
@pytest.mark.parametrize(
    "shape", [(1,), (7,), (100, 500), (3, 5, 7), ((1 << 14) * 3 + 5,), (0, 4)]
)  # fmt: skip
@pytest.mark.parametrize("p", [0.0, 1e-6, 0.2, 0.5, 0.8, 1.0])
def test_draws_equal_jax_random_bernoulli(shape, p):
    """Past one unit of work (2**14 elements) the draw is split over threads."""
    key = jax.random.key(7)
    draw = jax.jit(bernoulli.draw, static_argnums=2)
    got = draw(key, jnp.float32(p), shape)
    assert got.dtype == jnp.float32 and got.shape == shape
    np.testing.assert_array_equal(got, _jax(key, jnp.float32(p), shape))
    assert _uses_kernel(lambda k, q: bernoulli.draw(k, q, shape), key, jnp.float32(p))


@needs_kernel
def test_vmapped_draws_equal_each_member_alone():
    keys = jax.random.split(jax.random.key(1), 6)
    ps = jnp.linspace(0.05, 0.95, 6)
    shape = (37, 70)
    for in_axes, args in [
        ((0, 0), (keys, ps)),
        ((None, 0), (keys[0], ps)),
        ((0, None), (keys, ps[2])),
    ]:
        got = jax.vmap(lambda k, q: bernoulli.draw(k, q, shape), in_axes)(*args)
        want = jax.vmap(lambda k, q: _jax(k, q, shape), in_axes)(*args)
        assert got.shape == (6, *shape)
        np.testing.assert_array_equal(got, want)
    nested = jax.vmap(jax.vmap(lambda k, q: bernoulli.draw(k, q, (5,))))
    grid_keys = jax.random.split(jax.random.key(2), 6).reshape(2, 3)
    np.testing.assert_array_equal(
        nested(grid_keys, ps.reshape(2, 3)),
        jax.vmap(jax.vmap(lambda k, q: _jax(k, q, (5,))))(grid_keys, ps.reshape(2, 3)),
    )


@needs_kernel
def test_raw_uint32_keys_and_the_keep_rate():
    raw = jax.random.PRNGKey(3)  # legacy uint32[2] key
    got = bernoulli.draw(raw, jnp.float32(0.3), (200, 500))
    np.testing.assert_array_equal(got, _jax(raw, jnp.float32(0.3), (200, 500)))
    assert abs(float(got.mean()) - 0.3) < 0.005  # 100k draws: σ ≈ 0.0015


def test_other_keys_and_rates_fall_back_to_jax():
    """Keys the kernel does not hash (another implementation, or threefry without
    ``jax_threefry_partitionable``) and a rate per element are drawn by
    ``jax.random.bernoulli`` itself: the same masks, no kernel call."""
    rbg = jax.random.key(0, impl="rbg")
    assert not _uses_kernel(lambda k: bernoulli.draw(k, 0.5, (10, 10)), rbg)
    np.testing.assert_array_equal(bernoulli.draw(rbg, 0.5, (10, 10)), _jax(rbg, 0.5, (10, 10)))
    key = jax.random.key(0)
    ps = jnp.linspace(0.1, 0.9, 10, dtype=jnp.float32)
    assert not _uses_kernel(lambda k, q: bernoulli.draw(k, q, (10, 10)), key, ps)
    np.testing.assert_array_equal(bernoulli.draw(key, ps, (10, 10)), _jax(key, ps, (10, 10)))
    before = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    try:
        assert not _uses_kernel(lambda k: bernoulli.draw(k, 0.5, (10, 10)), key)
        np.testing.assert_array_equal(bernoulli.draw(key, 0.5, (10, 10)), _jax(key, 0.5, (10, 10)))
    finally:
        jax.config.update("jax_threefry_partitionable", before)


def test_sample_masks_are_the_same_draws_and_carry_no_gradient():
    key, rates, widths = jax.random.key(4), jnp.array([0.2, 0.5]), (784, 300)
    masks = models.sample_masks(key, rates, widths, 50)
    keys = jax.random.split(key, 2)
    for m, k, r, w in zip(masks, keys, rates, widths, strict=True):
        np.testing.assert_array_equal(m, _jax(k, 1.0 - r, (50, w)))
    grad = jax.grad(lambda r: sum(m.sum() for m in models.sample_masks(key, r, widths, 50)))
    np.testing.assert_array_equal(grad(rates), jnp.zeros(2))


@needs_kernel
def test_sample_masks_with_the_kernel_are_the_same_draws():
    """``sample_masks(..., draw=)`` with the kernel or the lowering's ``draw``: the masks
    of the default ``draw``, bit for bit, per example or shared."""
    key, rates, widths = jax.random.key(5), jnp.array([0.2, 0.5, 0.3]), (784, 300, 64)
    on, off = lowering.resolve("on"), lowering.resolve("off")
    assert on.masks and not off.masks
    for batch in (50, None):
        want = models.sample_masks(key, rates, widths, batch)
        for draw in (bernoulli.draw, on.draw, off.draw):
            sample = jax.jit(
                lambda k, r, b=batch, d=draw: models.sample_masks(k, r, widths, b, draw=d)
            )
            for got, w in zip(sample(key, rates), want, strict=True):
                np.testing.assert_array_equal(got, w)
    assert _uses_kernel(lambda k: on.draw(k, 0.5, (10, 10)), key)
    assert not _uses_kernel(lambda k: off.draw(k, 0.5, (10, 10)), key)


@needs_kernel
def test_dropout_training_is_unchanged_by_the_kernel():
    """A dropout run's parameters are the same bits with the kernel drawing its masks
    (``Lowering.masks``) and without."""
    data = jaxdl.synthetic_splits(300, 50, 50, num_features=20, num_classes=3, seed=0)
    model, opt = jaxdl.MLP(hidden=(64, 32)), jaxdl.make_optimizer("sgd", learning_rate=0.1)
    setup, hp = train.prepare(jaxdl.RunConfig.of(model, opt, epochs=2, batch_size=50, dropout=[0.2, 0.5, 0.3], kernels="on"), data.train)  # fmt: skip
    assert setup.lowering.masks
    ends = {}
    for masks in (True, False):
        s = dataclasses.replace(setup, lowering=dataclasses.replace(setup.lowering, masks=masks))
        state = compiled.programs(s).init(train.as_key(0), hp)
        exe, _ = compiled.compile_epoch(s, state, train.to_device(data.train), None, hp)
        assert (bernoulli.TARGET in exe.as_text()) == masks  # the kernel drew them, or XLA
        state, _ = train.fit_state(s, state, hp, data.train)
        ends[masks] = jax.tree.leaves(state.params)
    for a, b in zip(ends[True], ends[False], strict=True):
        np.testing.assert_array_equal(a, b)
