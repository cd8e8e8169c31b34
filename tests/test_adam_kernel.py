"""The fused Adam update (``jaxdl.cpu.adam``): Optax's values and state, under vmap, its
use by jaxdl's programs (``Lowering.adam``) and its build."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdl
from jaxdl import compiled, cpu, lowering, optim, train
from jaxdl.cpu import adam, build, gemm

pytestmark = pytest.mark.skipif(
    cpu.unavailable() is not None, reason=f"the CPU kernels cannot run here: {cpu.unavailable()}"
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
            return adam.step(opt, g, s, p), None
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
            p, s = adam.step(opt, g, s, p)
        return p, s

    batched = jax.jit(jax.vmap(one))(params, grads, lrs, b1s)
    for i in range(3):
        member = jax.tree.map(lambda x, i=i: x[i], (params, grads))
        alone = jax.jit(one)(*member, lrs[i], b1s[i])
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(alone), strict=True):
            np.testing.assert_array_equal(a[i], b)


def test_the_lowering_uses_it_for_adam_families_only(blobs):
    """``prepare(kernels="on")`` turns the lowering's ``adam`` on (``"off"`` does not); its
    update runs the handler for Adam and AdamW (clipped too) and Optax's chain for the
    rest (another family, frozen layers, per-layer rates, max-norm)."""

    def setup_for(opt, kernels="on"):
        return train.prepare(jaxdl.RunConfig.of(jaxdl.MLP((8,), num_classes=3), opt, epochs=1, batch_size=64, kernels=kernels), blobs.train)[0]  # fmt: skip

    params = {"layer_0": {"kernel": jnp.ones((20, 8)), "bias": jnp.zeros(8)},
              "output": {"kernel": jnp.ones((8, 3)), "bias": jnp.zeros(3)}}  # fmt: skip
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)

    def update_text(lowered, opt):
        state = optim.set_hyperparams(opt.init(params), {})
        return (
            jax.jit(lambda g, s, p: lowered.update(opt, g, s, p))
            .lower(grads, state, params)
            .as_text()
        )

    on, off = lowering.resolve("on"), lowering.resolve("off")
    fused = (jaxdl.make_optimizer("adam"), jaxdl.make_optimizer("adamw", clip_norm=1.0))
    for opt in fused:
        assert adam.applies(opt), opt
        assert setup_for(opt).lowering.adam
        assert adam.TARGET in update_text(on, opt) and adam.TARGET not in update_text(off, opt)
    for opt in (
        jaxdl.make_optimizer("rmsprop"),
        jaxdl.make_optimizer("adam", freeze=("layer_0",)),
        jaxdl.make_optimizer("adam", layer_lr={"output": 0.5}),
        jaxdl.make_optimizer("adam", max_norm=3.0),
    ):
        assert not adam.applies(opt), opt
        assert adam.TARGET not in update_text(on, opt), opt
    assert not setup_for(fused[0], kernels="off").lowering.adam


def test_fit_with_it_matches_optax_and_does_not_retrace(fit_on_and_off):
    fit_on_and_off(jaxdl.MLP((16,), num_classes=3), "adam", rtol=1e-5, atol=1e-7)


def test_a_failed_build_falls_back_and_auto_warns_once(tmp_path, monkeypatch):
    """A failed build is a reason, not a warning; ``"auto"`` then warns once that the
    programs use XLA alone and ``"on"`` is refused with the reason."""
    monkeypatch.setenv("JAXDL_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv(lowering.ENV, raising=False)
    path = build.library_path(adam.SOURCE)
    assert path.parent == tmp_path and not path.exists()
    build.register.cache_clear()
    lowering._resolve.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            why = adam.unavailable()
        assert why is not None and why.startswith("could not build the fused Adam update")
        assert "no-such-compiler" in why
        why = cpu.unavailable()
        assert why is not None and why.startswith("could not build the GEMM kernel")
        with pytest.warns(RuntimeWarning, match="could not build the GEMM kernel"):
            got = lowering.resolve("auto", backend="cpu")
        assert got == lowering.Lowering(conv="patches")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert lowering.resolve("auto", backend="cpu") == got  # once
        with pytest.raises(jaxdl.InputError, match="could not build the GEMM kernel"):
            lowering.resolve("on", backend="cpu")
        assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    finally:
        monkeypatch.undo()
        build.register.cache_clear()
        lowering._resolve.cache_clear()
    assert cpu.unavailable() is None and adam.unavailable() is None


def test_library_is_built_once_per_source_compiler_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXDL_KERNEL_DIR", str(tmp_path))
    path = build.library_path(adam.SOURCE)
    build.build(adam.SOURCE, path)
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert build.library_path(adam.SOURCE) == path  # the same inputs: the same library
    assert build.library_path(gemm.SOURCE) != path  # another source: another library
    monkeypatch.setenv("CXX", "c++")
    assert build.library_path(adam.SOURCE) != path  # another compiler: another library


def test_the_epoch_never_copies_a_kernel(blobs):
    """The updates are ordered after the backward pass, so XLA updates every kernel in
    place: the compiled epoch holds no copy of any weight matrix (without the ordering,
    it copied each kernel that a backward GEMM reads, every step)."""
    model = jaxdl.MLP((16, 16), num_classes=3)
    setup, hp = train.prepare(jaxdl.RunConfig.of(model, jaxdl.make_optimizer("adam"), epochs=1, batch_size=64, kernels="on"), blobs.train)  # fmt: skip
    assert setup.lowering.adam
    state = compiled.programs(setup).init(train.as_key(0), hp)
    exe, _ = compiled.compile_epoch(setup, state, train.to_device(blobs.train), None, hp)
    assert adam.TARGET in exe.as_text()  # the updates are the handler's
    kernels = {f"f32[{','.join(map(str, k.shape))}]" for k in jax.tree.leaves(state.params)
               if k.ndim == 2}  # fmt: skip
    # A narrow layer's weight gradient is a transposed product: its copy is not a kernel's.
    copies = re.findall(r"= (f32\[[0-9,]+\])\{[0-9,]+\} copy\(%([\w.-]+)", exe.as_text())
    copied = {shape for shape, source in copies if not source.startswith("transpose")}
    assert kernels == {"f32[20,16]", "f32[16,16]", "f32[16,3]"}
    assert not kernels & copied, copied
