"""Plain JAX everywhere: models compose with every transformation whether or not the CPU
kernels are built; the kernels are one explicit lowering, resolved on the host, never
part of a checkpoint's identity; a GPU backend never gets them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxdl
from jaxdl import checkpoint, compiled, cpu, lowering, models, train
from jaxdl.checkpoint import Checkpointer
from jaxdl.lowering import XLA, Lowering

KERNELS_WHY = cpu.unavailable()
needs_kernels = pytest.mark.skipif(
    KERNELS_WHY is not None, reason=f"the CPU kernels cannot run here: {KERNELS_WHY}"
)

# Small models whose layers are wide enough (>= 32) for every kernel path to apply.
MODELS = {
    "mlp": (jaxdl.MLP(hidden=(64, 40), num_classes=3), (2, 12)),
    "cnn": (
        jaxdl.CNN(features=(4,), kernel_size=3, dense=(32,), num_classes=3, image_shape=(6, 6, 1)),
        (2, 36),
    ),
}


def _model(name):
    model, shape = MODELS[name]
    x = jax.random.normal(jax.random.key(1), shape)
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, x


def _loss(model, params, x):
    logits = model.apply({"params": params}, x)
    return jax.nn.logsumexp(logits, axis=-1).sum() - logits[:, 0].sum()


def _close(a, b, rtol=1e-4, atol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.fixture(autouse=True, scope="module")
def _kernels_registered():
    """Resolve once first, so the kernels (where they build) are registered, as in a
    process that trained with them: user transformations must still see plain Flax."""
    lowering.resolve("auto")


@pytest.mark.parametrize("name", MODELS)
def test_apply_is_plain_xla(name):
    model, params, x = _model(name)
    text = jax.jit(jax.grad(lambda p: _loss(model, p, x))).lower(params).as_text()
    assert "jaxdl_" not in text and "custom_call" not in text


@pytest.mark.parametrize("name", MODELS)
def test_jvp_and_jacfwd_agree_with_reverse_mode(name):
    model, params, x = _model(name)
    f = lambda p: _loss(model, p, x)  # noqa: E731
    v = jax.tree.map(lambda a: jnp.ones_like(a) / a.size, params)
    _, tangent = jax.jvp(f, (params,), (v,))
    g = jax.grad(f)(params)
    expected = sum(
        jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v), strict=True)
    )
    np.testing.assert_allclose(tangent, expected, rtol=1e-4)
    logits = lambda z: model.apply({"params": params}, z)  # noqa: E731
    _close(jax.jacfwd(logits)(x), jax.jacrev(logits)(x))


@pytest.mark.parametrize("name", MODELS)
def test_hessian_and_jvp_of_grad(name):
    model, params, x = _model(name)
    f_x = lambda z: _loss(model, params, z)  # noqa: E731
    h = jax.hessian(f_x)(x)  # (B, F, B, F)
    n = x.size
    flat = np.asarray(h).reshape(n, n)
    np.testing.assert_allclose(flat, flat.T, rtol=1e-3, atol=1e-5)
    v = jax.random.normal(jax.random.key(3), x.shape)
    _, hvp = jax.jvp(jax.grad(f_x), (x,), (v,))  # forward-over-reverse
    np.testing.assert_allclose(
        hvp.reshape(-1), flat @ np.asarray(v).reshape(-1), rtol=1e-3, atol=1e-5
    )
    f_p = lambda p: _loss(model, p, x)  # noqa: E731
    t = jax.tree.map(lambda a: jnp.full_like(a, 0.1), params)
    _, hvp_p = jax.jvp(jax.grad(f_p), (params,), (t,))  # forward-over-reverse
    rof = jax.grad(lambda p: jax.jvp(f_p, (p,), (t,))[1])(params)  # reverse-over-forward
    _close(hvp_p, rof, rtol=1e-4, atol=1e-5)
    assert any(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(hvp_p))


@pytest.mark.parametrize("name", MODELS)
def test_vmap_and_checkpoint(name):
    model, params, x = _model(name)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    apply = lambda p: model.apply({"params": p}, x)  # noqa: E731
    both = jax.vmap(apply)(stacked)
    _close(both[1], apply(jax.tree.map(lambda a: 2 * a, params)))
    g = jax.grad(lambda p: _loss(model, p, x))(params)
    g_remat = jax.grad(jax.checkpoint(lambda p: _loss(model, p, x)))(params)
    _close(g_remat, g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", MODELS)
def test_export_round_trip(name):
    model, params, x = _model(name)
    fn = jax.jit(lambda p, z: model.apply({"params": p}, z))
    exported = export.export(fn)(params, x)
    restored = export.deserialize(exported.serialize())
    np.testing.assert_array_equal(restored.call(params, x), fn(params, x))


# ------------------------------------------------------------------ resolution on the host


def test_resolution_values_and_errors(monkeypatch):
    off = lowering.resolve("off")
    assert off.kernels == "off" and not (off.gemm or off.adam or off.masks)
    with pytest.raises(jaxdl.InputError, match="kernels: .*'auto', 'on' or 'off'|kernels"):
        lowering.resolve("yes")
    monkeypatch.setenv(lowering.ENV, "off")
    assert lowering.resolve("auto").kernels == "off"
    monkeypatch.setenv(lowering.ENV, "maybe")
    with pytest.raises(jaxdl.InputError, match="JAXDL_KERNELS"):
        lowering.resolve("auto")
    monkeypatch.delenv(lowering.ENV)
    auto = lowering.resolve("auto")
    assert auto.kernels == ("on" if KERNELS_WHY is None else "off")
    if KERNELS_WHY is not None:
        with pytest.raises(jaxdl.InputError, match="cannot run"):
            lowering.resolve("on")


def test_a_gpu_backend_never_gets_the_kernels(blobs, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert lowering.resolve("auto") == Lowering(conv="xla") == XLA
    with pytest.raises(jaxdl.InputError, match="backend is gpu"):
        lowering.resolve("on")
    opt = jaxdl.make_optimizer("adam")
    setup, hp = train.prepare(
        jaxdl.RunConfig.of(
            jaxdl.MLP(hidden=(64,), num_classes=3), opt, epochs=1, batch_size=64, dropout=0.5
        ),
        blobs.train,
    )
    assert setup.lowering == XLA
    state = compiled.programs(setup).init(jax.random.key(0), hp)
    data = train.to_device(blobs.train)
    text = compiled.programs(setup).epoch.lower(state, data, None, hp).as_text()
    assert "jaxdl_" not in text


def test_the_lowering_is_not_part_of_a_checkpoints_identity(blobs):
    opt = jaxdl.make_optimizer("adam")
    kw = dict(epochs=1, batch_size=64, dropout=0.5)
    first = "on" if KERNELS_WHY is None else "auto"
    on = train.prepare(
        jaxdl.RunConfig.of(jaxdl.MLP(hidden=(64,), num_classes=3), opt, kernels=first, **kw),
        blobs.train,
    )[0]
    off = train.prepare(
        jaxdl.RunConfig.of(jaxdl.MLP(hidden=(64,), num_classes=3), opt, kernels="off", **kw),
        blobs.train,
    )[0]
    assert repr(on) == repr(off) and "lowering" not in repr(on)
    hp = train.make_hparams(on, opt, (20,), dropout=0.5)
    describe = lambda s: checkpoint.describe(s, hp, blobs.train.x, blobs.train.y)  # noqa: E731
    assert describe(on) == describe(off)
    if KERNELS_WHY is None:
        assert on != off  # they are different programs: caches keep them apart
        assert compiled.programs(on) is not compiled.programs(off)


# ------------------------------------------------------------------ checkpoints move


def _stopped_run(setup, hp, blobs, directory, config, at: int):
    """Trains from seed 0 with a checkpointer until a SIGINT after epoch ``at``."""
    ck = Checkpointer(directory, config)

    def stop(epoch, metrics):
        if epoch == at:
            os.kill(os.getpid(), signal.SIGINT)

    saved = {}

    def keep(epoch, state):
        saved[epoch] = jax.tree.map(np.array, checkpoint._encode(state))

    state = compiled.programs(setup).init(jax.random.key(0), hp)
    with pytest.raises(checkpoint.Interrupted), ck.catch_signals():
        train.fit_state(setup, state, hp, blobs.train, blobs.valid, on_epoch=stop,
                        on_state=keep, checkpointer=ck)  # fmt: skip
    return saved[at]


@needs_kernels
@pytest.mark.parametrize("first,then", [("on", "off"), ("off", "on")])
def test_a_run_resumes_with_the_other_lowering(blobs, tmp_path, first, then):
    model = jaxdl.MLP(hidden=(64, 40), num_classes=3)
    opt = jaxdl.make_optimizer("adam", learning_rate=3e-3)
    kw = dict(epochs=5, batch_size=64, dropout=[0.2, 0.5, 0.5])
    setups = {
        k: train.prepare(jaxdl.RunConfig.of(model, opt, kernels=k, **kw), blobs.train, blobs.valid)
        for k in (first, then)
    }
    (s1, hp), (s2, _) = setups[first], setups[then]
    assert s1.lowering.kernels == first and s2.lowering.kernels == then
    config = checkpoint.describe(s1, hp, blobs.train.x, blobs.train.y)
    at_stop = _stopped_run(s1, hp, blobs, tmp_path, config, at=2)
    ck = Checkpointer(tmp_path, checkpoint.describe(s2, hp, blobs.train.x, blobs.train.y))
    restored = ck.restore(compiled.programs(s2).init(jax.random.key(5), hp))
    assert restored.epoch == 2
    got = jax.tree.leaves(checkpoint._encode(restored.state))
    for a, b in zip(got, jax.tree.leaves(at_stop), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # bit for bit
    state, _ = train.fit_state(s2, restored.state, hp, blobs.train, blobs.valid,
                               checkpointer=ck, history=restored.host)  # fmt: skip
    resumed = jaxdl.evaluate(model, state, blobs.test)["accuracy"]
    whole, _ = train.fit_state(s1, compiled.programs(s1).init(jax.random.key(0), hp), hp,
                               blobs.train, blobs.valid)  # fmt: skip
    uninterrupted = jaxdl.evaluate(model, whole, blobs.test)["accuracy"]
    assert abs(resumed - uninterrupted) <= 0.005
    _close(state.params, whole.params, rtol=1e-3, atol=1e-4)  # the same run up to rounding


READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(64, name="layer_0")(x))
            x = nn.relu(nn.Dense(40, name="layer_1")(x))
            return nn.Dense(3, name="output")(x)

    directory, x_path = sys.argv[1], sys.argv[2]
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    x = np.load(x_path)
    logits = MLP().apply({"params": state["params"]}, x)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    print(json.dumps({"step": int(step), "probs": np.asarray(probs).tolist()}))
    assert "jaxdl" not in sys.modules
    """
)


def test_a_checkpoint_read_with_orbax_and_flax_alone_predicts_as_jaxdl(blobs, tmp_path):
    model = jaxdl.MLP(hidden=(64, 40), num_classes=3)
    opt = jaxdl.make_optimizer("adam", learning_rate=1e-2)
    es = jaxdl.EarlyStopping("val_loss", patience=2)  # restores the best epoch's weights
    splits_valid = jaxdl.Dataset(blobs.valid.x, np.roll(blobs.valid.y, 1))  # peaks early
    ck = Checkpointer(tmp_path / "ckpt")
    state, history = jaxdl.fit(model, opt, blobs.train, epochs=8, batch_size=64, key=0,
                               validation=splits_valid, early_stopping=es, checkpointer=ck)  # fmt: skip
    best = jaxdl.best_epoch(state)
    assert best < len(history["train_loss"])  # the result is not the last epoch's weights
    np.save(tmp_path / "x.npy", blobs.test.x[:16])
    out = subprocess.run(
        [sys.executable, "-c", READER, str(tmp_path / "ckpt"), str(tmp_path / "x.npy")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    read = json.loads(out.stdout.strip().splitlines()[-1])
    assert read["step"] == len(history["train_loss"])
    np.testing.assert_allclose(
        read["probs"], jaxdl.predict(model, state, blobs.test.x[:16]), rtol=1e-5, atol=1e-6
    )


def test_models_import_nothing_of_the_kernels():
    code = "import jaxdl.models, sys; print(any(m.startswith('jaxdl.cpu') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    assert "cpu" not in models.__dict__
