"""Models of one's own: any Flax module under the contract ``__call__(x, *, train)``
through fit, evaluate, predict, sweeps, checkpoints and the ensemble view."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl
from jaxdl import ensemble, sweep
from jaxdl.validate import InputError


class ResMLP(nn.Module):
    """A residual MLP with batch norm and jaxdl.Dropout on each block."""

    width: int = 16
    blocks: int = 2
    classes: int = 3
    rate: float = 0.2

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.Dense(self.width)(x.reshape(x.shape[0], -1))
        for _ in range(self.blocks):
            r = nn.Dense(self.width, use_bias=False)(h)  # batch norm's bias is the bias
            r = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(r))
            h = h + jaxdl.Dropout(self.rate)(r, train=train)
        return nn.Dense(self.classes)(h)


class SmallConv(nn.Module):
    """A conv net with batch norm on (B, H, W, C) images."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.Conv(4, (3, 3))(x)
        h = nn.relu(nn.BatchNorm(use_running_average=not train)(h))
        h = nn.avg_pool(h, (2, 2), (2, 2)).reshape(x.shape[0], -1)
        return nn.Dense(3)(jaxdl.Dropout(0.25)(h, train=train))


class FlaxDropout(nn.Module):
    """Flax's own nn.Dropout: jaxdl gives it the dropout rng stream."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.Dropout(0.3, deterministic=not train)(nn.relu(nn.Dense(16)(x)))
        return nn.Dense(3)(h)


class Tiny(nn.Module):
    """A few units behind jaxdl.Dropout, for exact enumeration (3 + 4 units)."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = jaxdl.Dropout(0.4)(x[:, :3], train=train)
        h = jnp.tanh(nn.Dense(4)(h))
        h = jaxdl.Dropout(0.5)(h, train=train)
        return nn.Dense(3)(nn.relu(nn.Dense(5)(h)))


def _fit(model, data, **kw):
    opt = jaxdl.make_optimizer("adam", learning_rate=3e-3)
    settings = dict(epochs=4, validation=data.valid, batch_size=64, verbose=False) | kw
    return jaxdl.fit(model, opt, data.train, **settings)


def _images(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32) * 0.5
    for c in range(3):  # class c: a bright band in rows 2c..2c+1
        x[y == c, 2 * c : 2 * c + 2] += 2.0
    return jaxdl.Dataset(x, y)


@pytest.mark.parametrize("module", [ResMLP(), FlaxDropout()], ids=["resmlp", "nn-dropout"])
def test_user_modules_train_evaluate_and_predict(blobs, module):
    state, hist = _fit(module, blobs)
    assert hist["val_accuracy"][-1] > 0.9
    ev = jaxdl.evaluate(module, state, blobs.test)
    probs = jaxdl.predict(module, state, blobs.test.x)
    assert probs.shape == (128, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert ev["accuracy"] == pytest.approx((probs.argmax(1) == blobs.test.y).mean(), abs=1e-6)
    # predict is the deterministic network, as the user's own apply gives it
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    own = module.apply({k: v for k, v in variables.items() if v}, blobs.test.x, train=False)
    np.testing.assert_allclose(probs, jax.nn.softmax(own), rtol=1e-5, atol=1e-6)


def test_batch_norm_statistics_are_trained(blobs):
    state, _ = _fit(ResMLP(), blobs, epochs=1)
    mean = state.batch_stats["BatchNorm_0"]["mean"]
    assert mean.shape == (16,) and float(jnp.abs(mean).max()) > 0


def test_a_conv_net_with_batch_norm_on_images():
    train, valid = _images(384, 0), _images(128, 1)
    model = SmallConv()
    assert jaxdl.masked_widths(model, (8, 8, 1)) == (4 * 4 * 4,)
    opt = jaxdl.make_optimizer("adam", learning_rate=1e-2)
    state, hist = jaxdl.fit(model, opt, train, epochs=4, validation=valid, batch_size=64,
                            verbose=False)  # fmt: skip
    assert hist["val_accuracy"][-1] > 0.9
    assert "BatchNorm_0" in state.batch_stats


def test_dropout_rates_are_the_modules_own_and_traced(blobs):
    model = ResMLP(rate=0.3)
    setup, hp = jaxdl.prepare(jaxdl.RunConfig.of(model, epochs=2), blobs.train)
    assert setup.dropout and np.asarray(hp.dropout).tolist() == pytest.approx([0.3, 0.3])
    _, hp2 = jaxdl.prepare(jaxdl.RunConfig.of(model, epochs=2, dropout=[0.1, 0.5]), blobs.train)
    assert np.asarray(hp2.dropout).tolist() == pytest.approx([0.1, 0.5])
    off, _ = jaxdl.prepare(jaxdl.RunConfig.of(model, epochs=2, dropout=0.0), blobs.train)
    assert not off.dropout
    with pytest.raises(InputError, match="FlaxDropout has no jaxdl.Dropout layer"):
        jaxdl.prepare(jaxdl.RunConfig.of(FlaxDropout(), dropout=0.5), blobs.train)


def test_dropout_layer_outside_jaxdl_behaves_like_flax_dropout():
    x = jnp.ones((4, 1000))
    layer = jaxdl.Dropout(0.25)
    assert (layer.apply({}, x) == x).all()  # not training: identity
    out = layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
    kept = np.asarray(out) != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(np.asarray(out)[kept], 1 / 0.75, rtol=1e-6)
    classic = jaxdl.Dropout(0.25, convention="classic").apply({}, x)
    np.testing.assert_allclose(classic, 0.75)
    given = {"dropout": {"rate": jnp.float32(0.5), "mask": jnp.asarray([1.0, 0.0] * 500)}}
    np.testing.assert_allclose(layer.apply(given, x)[0, :4], [2.0, 0.0, 2.0, 0.0])


def test_a_sweep_of_a_user_module_equals_standalone_fits(blobs):
    model = ResMLP()
    opt = jaxdl.make_optimizer("adam", learning_rate=3e-3)
    configs = sweep.grid(learning_rate=[3e-3, 1e-2], dropout=[0.1, 0.4])
    res = sweep.sweep(model, opt, blobs.train, configs, seeds=[1], epochs=2, batch_size=64,
                      validation=blobs.valid, verbose=False)  # fmt: skip
    assert len(res.rows) == 4 and res.compiles == 1
    for i in (0, 3):
        row = res.rows[i]
        o = jaxdl.make_optimizer("adam", learning_rate=row["learning_rate"])
        state, hist = jaxdl.fit(model, o, blobs.train, epochs=2, batch_size=64, key=1,
                                validation=blobs.valid, dropout=row["dropout"], verbose=False)  # fmt: skip
        leaf = jax.tree_util.tree_map(lambda v, i=i: v[i], res.states.params)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), leaf, state.params
        )
        np.testing.assert_allclose(res.history["val_loss"][i], hist["val_loss"], rtol=1e-4)


def test_a_sweep_keeps_the_modules_own_rates_when_none_is_swept(blobs):
    res = sweep.sweep(ResMLP(rate=0.3), jaxdl.make_optimizer("sgd", learning_rate=0.1),
                      blobs.train, sweep.grid(learning_rate=[0.05, 0.1]), epochs=1,
                      batch_size=64, verbose=False)  # fmt: skip
    assert res.states.rates is not None  # dropout on, at the module's rate, in each member
    np.testing.assert_allclose(np.asarray(res.states.rates), 0.3)


def test_ensemble_view_of_a_user_module_exact_equals_brute_force_and_mc_converges(
    enumerate_subnetworks,
):
    x = np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 9).astype(np.int32)
    model = Tiny()
    variables = model.init(jax.random.key(0), x[:1])
    assert jaxdl.masked_widths(model, (5,)) == (3, 4)
    rates = [0.4, 0.5]
    got = ensemble.exact_probs(model, variables, rates, x, batch_size=4)
    np.testing.assert_allclose(got["arithmetic"], enumerate_subnetworks(model, variables, rates, x)[0],
                               atol=2e-6)  # fmt: skip
    masks = ensemble.sample_masks(jax.random.key(3), model, rates, 20000, (5,))
    st = ensemble.mc_stats(model, variables, rates, x, y, masks)
    assert np.abs(st["probs"] - got["arithmetic"]).max() < 0.01
    out = ensemble.analyse(model, variables, rates, jaxdl.Dataset(x, y), key=jax.random.key(4),
                           k=8, repeats=2)  # fmt: skip
    assert out["exact_units"] == 7 and out["arithmetic_accuracy"].shape == (2, 8)
    assert 0 <= out["weight_scaling"]["accuracy"] <= 1


def test_checkpoint_and_resume_of_a_user_module_is_bit_exact(blobs, tmp_path):
    from jaxdl import checkpoint, compiled, train

    config = jaxdl.RunConfig.of(ResMLP(), epochs=4, batch_size=64)
    setup, hp = jaxdl.prepare(config, blobs.train, blobs.valid)
    init = compiled.programs(setup).init
    ref, ref_hist = train.fit_state(setup, init(train.as_key(0), hp), hp, blobs.train, blobs.valid)
    described = checkpoint.describe(setup, hp, blobs.train.x, blobs.train.y)
    assert "ResMLP" in described["setup"]  # the module is part of the run's identity
    ck = checkpoint.Checkpointer(tmp_path, described)

    def stop_at_2(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.fit_state(setup, init(train.as_key(0), hp), hp, blobs.train, blobs.valid,
                        on_epoch=stop_at_2, checkpointer=ck)  # fmt: skip
    saved = checkpoint.Checkpointer(tmp_path, described).restore(init(train.as_key(5), hp))
    assert saved.epoch in (1, 2)
    state, hist = train.fit_state(setup, saved.state, hp, blobs.train, blobs.valid,
                                  history=saved.host)  # fmt: skip
    assert hist == ref_hist
    same = jax.tree_util.tree_map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                                  state.params, ref.params)  # fmt: skip
    assert all(jax.tree_util.tree_leaves(same))


class NoTrain(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)


class WrongShape(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        return nn.Dense(3)(x)[:, :, None]


class Noisy(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        return nn.Dense(3)(x + jax.random.normal(self.make_rng("noise"), x.shape))


class Listy(nn.Module):
    widths: list

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        return nn.Dense(3)(x)


@pytest.mark.parametrize(
    "model, message",
    [
        (
            NoTrain(),
            r"NoTrain: expected __call__\(self, x, \*, train: bool\).*got __call__\(self, x\)",
        ),
        (WrongShape(), r"WrongShape: expected logits \(B, classes\).*got \(2, 3, 1\)"),
        (Noisy(), r"Noisy: expected a module that runs on inputs \(2, 20\).*noise"),
        (Listy([4]), r"Listy: expected hashable fields \(tuples, not lists\), got widths"),
        ("mlp", r"expected a flax.linen.Module"),
    ],
    ids=["no-train", "wrong-shape", "rng", "list-field", "not-a-module"],
)
def test_broken_contracts_are_named_before_training(blobs, model, message):
    with pytest.raises(InputError, match=message):
        _fit(model, blobs, epochs=1)


def test_labels_outside_the_models_classes_are_refused(blobs):
    bad = jaxdl.Dataset(blobs.train.x, blobs.train.y + 20)
    with pytest.raises(InputError, match=r"train y.*\[0, 3\)"):
        jaxdl.fit(ResMLP(), jaxdl.make_optimizer("sgd"), bad, epochs=1, verbose=False)
    with pytest.raises(InputError, match="train y"):  # MLP: 10 classes given, labels 20..22
        jaxdl.fit(jaxdl.MLP((8,), num_classes=10), jaxdl.make_optimizer("sgd"), bad, epochs=1,
                  verbose=False)  # fmt: skip


def test_run_config_of_a_user_module_builds_it_again(blobs):
    config = jaxdl.RunConfig.of(ResMLP(width=8), epochs=1)
    assert config.model.module.endswith("test_own_model:ResMLP")
    assert config.model.build() == ResMLP(width=8)
    back = jaxdl.RunConfig.from_dict(config.to_dict())
    assert back == config and back.model.build() == ResMLP(width=8)


class Tempered(nn.Module):
    """Logits divided by a traced temperature, read in two places (one number)."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.relu(nn.Dense(16)(x)) * jaxdl.Hyperparameter("scale", 1.0)()
        return nn.Dense(3)(h) / jaxdl.Hyperparameter("temperature", 1.0)()


def test_a_modules_own_number_is_traced_and_swept(blobs):
    model = Tempered()
    x = blobs.test.x[:4]
    v = model.init(jax.random.key(0), x)
    out = model.apply({**v, "hyperparams": {"temperature": 2.0}}, x)
    np.testing.assert_allclose(out, model.apply(v, x) / 2.0, rtol=1e-6)  # a user's own apply
    opt = jaxdl.make_optimizer("sgd", learning_rate=0.1)
    s1, _ = jaxdl.fit(model, opt, blobs.train, epochs=1, batch_size=64, verbose=False)
    assert float(s1.numbers["temperature"]) == 1.0
    from jaxdl import compiled

    setup, _ = jaxdl.prepare(jaxdl.RunConfig.of(model, opt, epochs=1, batch_size=64), blobs.train)
    before = dict(compiled.programs(setup).traces)
    s2, _ = jaxdl.fit(model, opt, blobs.train, epochs=1, batch_size=64, temperature=4.0,
                      verbose=False)  # fmt: skip
    assert compiled.programs(setup).traces == before  # a new value, the same program
    assert float(s2.numbers["temperature"]) == 4.0
    assert jaxdl.report.params_digest(s1.params) != jaxdl.report.params_digest(s2.params)
    # evaluate and predict use the run's value
    probs = jaxdl.predict(model, s2, x)
    own = model.apply({**jaxdl.ensemble.variables_of(s2)}, x)
    np.testing.assert_allclose(probs, jax.nn.softmax(own), rtol=1e-5, atol=1e-6)
    res = sweep.sweep(model, opt, blobs.train, sweep.grid(temperature=[1.0, 4.0]), seeds=[0],
                      epochs=1, batch_size=64, verbose=False)  # fmt: skip
    assert [r["temperature"] for r in res.rows] == [1.0, 4.0] and res.compiles <= 1
    leaf = jax.tree_util.tree_map(lambda a: a[1], res.states.params)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), leaf, s2.params
    )
    with pytest.raises(InputError, match="unknown setting 'temprature'.*'temperature'"):
        jaxdl.fit(model, opt, blobs.train, epochs=1, temprature=2.0, verbose=False)


def test_the_ensemble_view_of_flax_dropout_asks_for_jaxdl_dropout(blobs):
    model = FlaxDropout()
    variables = model.init(jax.random.key(0), blobs.test.x[:1])
    with pytest.raises(InputError, match="FlaxDropout: the ensemble view needs.*jaxdl.Dropout"):
        ensemble.analyse(model, variables, 0.3, blobs.test, key=jax.random.key(0), k=4)
