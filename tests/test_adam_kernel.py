"""The fused Adam update: Optax's values and state, under vmap, and its fallbacks."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdl
from jaxdl import fused, kernels, optim, train

pytestmark = pytest.mark.skipif(
    fused.unavailable(jaxdl.make_optimizer("adam")) is not None,
    reason=f"fused update unavailable: {fused.unavailable(jaxdl.make_optimizer('adam'))}",
)

PARAMS = {
    "layer_0": {"kernel": (20, 16), "bias": (16,)},
    "output": {"kernel": (16, 3), "bias": (3,)},
}


def _tree(key, scale):
    shapes, treedef = jax.tree.flatten(PARAMS, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(shapes))
    return treedef.unflatten(
        [scale * jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True)]
    )


def _run(opt, use_fused: bool, steps: int = 6, hyper=None):
    """``steps`` updates from the same start with a new gradient each step."""
    params = _tree(jax.random.key(0), 0.3)
    state = optim.set_hyperparams(opt.init(params), hyper or {})

    def body(carry, key):
        p, s = carry
        g = _tree(key, 0.1)
        if use_fused:
            return fused.step(opt, g, s, p), None
        u, s = opt.tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    keys = jax.random.split(jax.random.key(1), steps)
    return jax.jit(lambda p, s: jax.lax.scan(body, (p, s), keys)[0])(params, state)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("adam", dict(learning_rate=0.05, b1=0.8, b2=0.95, eps=1e-3)),
        ("adamw", dict(learning_rate=0.05, weight_decay=0.2, clip_norm=0.3)),
    ],
)
def test_step_equals_optax_update_and_keeps_its_state(name, kw):
    opt = jaxdl.make_optimizer(name, **kw)
    (p1, s1), (p2, s2) = _run(opt, True), _run(opt, False)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2)), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-8)
    start = _tree(jax.random.key(0), 0.3)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), p1, start)
    assert min(jax.tree.leaves(moved)) > 1e-3  # the steps did move every array
    if name == "adamw":  # the decay reaches kernels only: without it, kernels end elsewhere
        (p3, _) = _run(jaxdl.make_optimizer(name, **{**kw, "weight_decay": 1e-9}), True)
        assert float(jnp.abs(p3["output"]["kernel"] - p1["output"]["kernel"]).max()) > 1e-4
        np.testing.assert_allclose(p3["output"]["bias"], p1["output"]["bias"], rtol=1e-4)


def test_vmapped_step_equals_each_member_alone():
    """Under vmap the handler sees all members at once, each with its own numbers."""
    opt = jaxdl.make_optimizer("adamw", weight_decay=0.1)
    lrs, b1s = jnp.array([1e-3, 3e-2, 0.1]), jnp.array([0.9, 0.5, 0.0])
    params = jax.vmap(lambda k: _tree(k, 0.3))(jax.random.split(jax.random.key(0), 3))
    grads = jax.vmap(lambda k: _tree(k, 0.1))(jax.random.split(jax.random.key(1), 3))

    def one(p, g, lr, b1):
        s = optim.set_hyperparams(opt.init(p), {"learning_rate": lr, "b1": b1})
        for _ in range(3):  # moments away from zero
            p, s = fused.step(opt, g, s, p)
        return p, s

    batched = jax.jit(jax.vmap(one))(params, grads, lrs, b1s)
    for i in range(3):
        member = jax.tree.map(lambda x, i=i: x[i], (params, grads))
        alone = jax.jit(one)(*member, lrs[i], b1s[i])
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(alone), strict=True):
            np.testing.assert_array_equal(a[i], b)


def test_prepare_uses_it_for_adam_families_only(blobs, monkeypatch):
    def setup_for(opt):
        return train.prepare(jaxdl.MLP((8,), num_classes=3), opt, blobs.train, epochs=1,
                             batch_size=64)[0]  # fmt: skip

    assert setup_for(jaxdl.make_optimizer("adam")).fused_adam
    assert setup_for(jaxdl.make_optimizer("adamw", clip_norm=1.0)).fused_adam
    for opt in (
        jaxdl.make_optimizer("rmsprop"),
        jaxdl.make_optimizer("adam", freeze=("layer_0",)),
        jaxdl.make_optimizer("adam", layer_lr={"output": 0.5}),
        jaxdl.make_optimizer("adam", max_norm=3.0),
    ):
        assert not setup_for(opt).fused_adam, opt
    monkeypatch.setenv("JAXDL_FUSED_ADAM", "0")
    assert not setup_for(jaxdl.make_optimizer("adam")).fused_adam


def test_fit_with_it_matches_optax_and_does_not_retrace(fit_on_and_off):
    fit_on_and_off(jaxdl.MLP((16,), num_classes=3), "fused_adam", rtol=1e-5, atol=1e-7)


def test_a_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXDL_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert fused.library_path().parent == tmp_path and not fused.library_path().exists()
    kernels.register.cache_clear()
    kernels._warn_once.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build the fused Adam update"):
            why = fused.unavailable(jaxdl.make_optimizer("adam"))
        assert why is not None and "no-such-compiler" in why
        assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    finally:
        monkeypatch.undo()
        kernels.register.cache_clear()
        assert fused.unavailable(jaxdl.make_optimizer("adam")) is None


def test_library_is_built_once_per_source_compiler_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXDL_KERNEL_DIR", str(tmp_path))
    path = fused.library_path()
    fused.build(path)
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.setenv("CXX", "c++")
    assert fused.library_path() != path  # another compiler: another library


def test_the_epoch_never_copies_a_kernel(blobs):
    """The updates are ordered after the backward pass, so XLA updates every kernel in
    place: the compiled epoch holds no copy of any weight matrix (without the ordering,
    it copied each kernel that a backward GEMM reads, every step)."""
    model = jaxdl.MLP((16, 16), num_classes=3)
    setup, hp = train.prepare(model, jaxdl.make_optimizer("adam"), blobs.train, epochs=1,
                              batch_size=64)  # fmt: skip
    assert setup.fused_adam
    state = train.programs(setup).init(train.as_key(0), hp)
    exe, _ = train.compile_epoch(setup, state, train.to_device(blobs.train), None, hp)
    kernels = {f"f32[{','.join(map(str, k.shape))}]" for k in jax.tree.leaves(state.params)
               if k.ndim == 2}  # fmt: skip
    # A narrow layer's weight gradient is a transposed product: its copy is not a kernel's.
    copies = re.findall(r"= (f32\[[0-9,]+\])\{[0-9,]+\} copy\(%([\w.-]+)", exe.as_text())
    copied = {shape for shape, source in copies if not source.startswith("transpose")}
    assert kernels == {"f32[20,16]", "f32[16,16]", "f32[16,3]"}
    assert not kernels & copied, copied
