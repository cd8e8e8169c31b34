"""Tests for jaxdl.models: gradients, maxout, dropout masks and conventions, explicit masks,
masked widths, the CNN, batch norm with padding, model validation, zero-init symmetry.

Parameters are built from ``jax.eval_shape(model.init, ...)`` filled with NumPy draws and
every computation is one ``jit``, so each test compiles once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxdl
from jaxdl import compiled, losses, models, train
from jaxdl.validate import InputError

# The programs here are tiny: compile them quickly rather than optimise them.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture
def x64():
    """Double precision for the duration of one test, restored afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _normal(shape, seed=0, scale=1.0, dtype=np.float32):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(dtype)


def _shapes(model, x):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def _params(model, x, seed=0, scale=0.5, dtype=np.float32):
    """Parameters shaped as ``model.init`` makes them, every leaf N(0, scale²) (biases too)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (scale * rng.normal(size=s.shape)).astype(dtype),
        _shapes(model, x)["params"],
    )


def _with_kernel(params, layer, kernel):
    return {**params, layer: {**params[layer], "kernel": kernel}}


def _changed(a, index, value):
    """A copy of NumPy array ``a`` with ``a[index] = value``."""
    a = np.array(a)
    a[index] = value
    return a


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu", "maxout"])
def test_grad_equals_central_finite_differences(x64, activation):
    model = jaxdl.MLP(hidden=(4, 3), num_classes=3, activation=activation, maxout_pieces=2)
    x = _normal((7, 5), dtype=np.float64)
    y = np.array([0, 1, 2, 0, 1, 2, 1], np.int32)
    params = _params(model, x, seed=1, scale=0.8, dtype=np.float64)
    eps = 1e-6

    @jit
    def grad_and_fd(params):
        theta, unravel = ravel_pytree(params)

        def loss(theta):
            return losses.cross_entropy(model.apply({"params": unravel(theta)}, x), y)

        steps = eps * jnp.eye(theta.size, dtype=theta.dtype)
        fd = jax.vmap(lambda e: (loss(theta + e) - loss(theta - e)) / (2 * eps))(steps)
        return jax.grad(loss)(theta), fd

    grad, fd = map(np.asarray, grad_and_fd(params))
    assert grad.dtype == np.float64
    assert np.abs(grad).max() > 1e-3  # not a trivially zero gradient
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9 * np.abs(grad).max())
    assert np.linalg.norm(grad - fd) <= 1e-7 * np.linalg.norm(grad)


# ------------------------------------------------------------------ maxout


def test_maxout_is_max_over_pieces_of_dense_preactivations():
    pieces = 3
    model = jaxdl.MLP(hidden=(4, 2), num_classes=3, activation="maxout", maxout_pieces=pieces)
    x = _normal((6, 5))
    params = _params(model, x)
    assert params["layer_0"]["kernel"].shape == (5, 4 * pieces)
    assert params["layer_1"]["kernel"].shape == (4, 2 * pieces)
    assert params["output"]["kernel"].shape == (2, 3)
    logits, state = jit(lambda p: model.apply({"params": p}, x, mutable=["intermediates"]))(params)

    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    h = np.asarray(x, np.float64)
    for i, width in enumerate((4, 2)):
        pre = h @ p[f"layer_{i}"]["kernel"] + p[f"layer_{i}"]["bias"]
        # unit j owns kernel columns j*pieces ... j*pieces + pieces - 1
        h = np.stack([pre[:, j * pieces : (j + 1) * pieces].max(axis=1) for j in range(width)], 1)
        act = state["intermediates"][f"act_layer_{i}"][0]
        np.testing.assert_allclose(act, h, rtol=1e-5, atol=1e-6)
    expected = h @ p["output"]["kernel"] + p["output"]["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ mask sampling

WIDTHS = (784, 500, 300)
BATCH = 64


@jit
def _draws(key, other_key, rates):
    """Every sample_masks draw the mask tests inspect, in one compiled program."""
    pair = rates[:2]
    return {
        "batched": models.sample_masks(key, rates, WIDTHS, BATCH),
        "a": models.sample_masks(key, pair, (300, 300)),
        "b": models.sample_masks(key, pair, (300, 300)),
        "c": models.sample_masks(other_key, pair, (300, 300)),
        "small": models.sample_masks(key, pair, (5, 300), batch=9),
    }


def test_sample_masks_keep_fraction_matches_rate():
    cases = [(p, p, p) for p in (0.0, 0.1, 0.5, 0.8)] + [(0.1, 0.5, 0.9)]
    for seed, rates in enumerate(cases):
        masks = _draws(jax.random.key(seed), jax.random.key(99), jnp.array(rates))["batched"]
        for m, w, p in zip(masks, WIDTHS, rates, strict=True):
            m = np.asarray(m)
            assert m.shape == (BATCH, w) and m.dtype == np.float32
            assert set(np.unique(m)) <= {0.0, 1.0}
            # 5 binomial standard deviations of the mean of n Bernoulli(1 - p) draws
            tol = 5 * math.sqrt(p * (1 - p) / m.size)
            assert abs(m.mean() - (1 - p)) <= tol, (p, m.mean(), tol)
            if p == 0.0:
                assert np.all(m == 1.0)


def test_sample_masks_keys_and_shapes():
    d = _draws(jax.random.key(7), jax.random.key(8), jnp.array([0.5, 0.5, 0.5]))
    assert [m.shape for m in d["a"]] == [(300,), (300,)]
    for ma, mb, mc in zip(d["a"], d["b"], d["c"], strict=True):
        np.testing.assert_array_equal(ma, mb)  # same key, same masks
        assert np.any(np.asarray(ma) != np.asarray(mc))  # another key, other masks
    assert np.any(np.asarray(d["a"][0]) != np.asarray(d["a"][1]))  # layers are independent
    assert [m.shape for m in d["small"]] == [(9, 5), (9, 300)]
    rows = np.asarray(d["small"][1])
    assert len({r.tobytes() for r in rows}) == 9  # one subnetwork per example


# ------------------------------------------------------------------ conventions in expectation

N_MC = 20000


def _bernoulli_masks(rates, widths, n, seed=1):
    """n keep-masks per layer drawn with NumPy (one subnetwork per draw)."""
    rng = np.random.default_rng(seed)
    return tuple(
        (rng.random((n, w)) < 1.0 - float(r)).astype(np.float32)
        for r, w in zip(rates, widths, strict=True)
    )


def _mc_check(samples, expected, sigmas=5.0):
    """The Monte Carlo mean of ``samples`` (N, ...) equals ``expected`` within ``sigmas``
    standard errors (estimated from the samples); returns the standard errors."""
    samples = np.asarray(samples, np.float64)
    mean = samples.mean(0)
    stderr = samples.std(0, ddof=1) / math.sqrt(samples.shape[0])
    err = np.abs(mean - np.asarray(expected, np.float64))
    assert np.all(err <= sigmas * stderr + 1e-6), (err / np.maximum(stderr, 1e-12)).max()
    return stderr


def _mc_outputs(model, params, x, rates, fn=None):
    """``fn(model, params, x, masks=..., rates=..., train=True)`` under N_MC masks, and
    without masks (deterministic, and with no dropout at all)."""
    fn = fn or (lambda m, p, x, **kw: m.apply({"params": p}, x, **kw))
    masks = _bernoulli_masks(rates, models.masked_widths(model, x.shape[1:]), N_MC)

    @jit
    def run(masks):
        def one(m):
            return fn(model, params, x, masks=m, rates=rates, train=True)

        return jax.vmap(one)(masks), fn(model, params, x, rates=rates), fn(model, params, x)

    return jax.device_get(run(masks))


@pytest.mark.parametrize("convention", ["inverted", "classic"])
def test_linear_network_training_output_averages_to_deterministic_output(convention):
    model = jaxdl.MLP(
        hidden=(6, 5), num_classes=3, activation="linear", dropout_convention=convention
    )
    x = _normal((4, 8))
    params = _params(model, x)
    rates = np.array([0.2, 0.5, 0.3], np.float32)
    outs, deterministic, plain = _mc_outputs(model, params, x, rates)
    stderr = _mc_check(outs, deterministic)
    assert stderr.max() < 0.05  # the check has teeth
    if convention == "inverted":
        np.testing.assert_allclose(deterministic, plain, rtol=1e-6)
    else:
        assert np.abs(deterministic - plain).max() > 20 * stderr.max()


def test_classic_deterministic_is_weight_scaling():
    """Classic test time = each layer's kernel × the keep rate of its input (any activation)."""
    model = jaxdl.MLP(hidden=(6, 5), num_classes=3, activation="tanh", dropout_convention="classic")
    x = _normal((4, 8))
    params = _params(model, x)
    rates = np.array([0.2, 0.5, 0.3], np.float32)
    scaled = params
    for i, name in enumerate(["layer_0", "layer_1", "output"]):
        scaled = _with_kernel(scaled, name, params[name]["kernel"] * (1 - rates[i]))
    apply = jit(lambda p, r: model.apply({"params": p}, x, rates=r))
    np.testing.assert_allclose(apply(params, rates), apply(scaled, None), rtol=1e-5, atol=1e-6)


def _preactivation(model, params, x, **kw):
    _, state = model.apply(
        {"params": params}, x, capture_intermediates=True, mutable=["intermediates"], **kw
    )
    return state["intermediates"]["layer_0"]["__call__"][0]


def test_input_dropout_first_preactivation_expectation_matches_across_conventions():
    p = 0.4
    keep = 1.0 - p
    rates = np.array([p, 0.0], np.float32)
    inverted = jaxdl.MLP(hidden=(6,), num_classes=3, activation="linear")
    classic = inverted.clone(dropout_convention="classic")
    x = _normal((4, 8))
    params = _params(inverted, x)
    w, b = np.asarray(params["layer_0"]["kernel"]), np.asarray(params["layer_0"]["bias"])
    # The classic network representing the same function keeps W/keep on its input layer
    # (inverted dropout scales the kept inputs by 1/keep instead).
    params_c = _with_kernel(params, "layer_0", params["layer_0"]["kernel"] / keep)

    pre_inv, det_inv, plain_inv = _mc_outputs(inverted, params, x, rates, _preactivation)
    pre_cls, det_cls, _ = _mc_outputs(classic, params_c, x, rates, _preactivation)
    # same masks: the same pre-activation in both conventions, draw by draw
    np.testing.assert_allclose(pre_inv, pre_cls, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(det_inv, det_cls, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(det_inv, np.asarray(x) @ w + b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(det_inv, plain_inv, rtol=1e-6)
    _mc_check(pre_inv, det_inv)
    _mc_check(pre_cls, det_cls)

    # with the same weights, the classic convention averages to W·(keep·x) + b
    pre_same, det_same, _ = _mc_outputs(classic, params, x, rates, _preactivation)
    np.testing.assert_allclose(det_same, keep * np.asarray(x) @ w + b, rtol=1e-5, atol=1e-6)
    _mc_check(pre_same, det_same)


# ------------------------------------------------------------------ explicit masks


def test_all_ones_masks_classic_equal_no_dropout_network():
    model = jaxdl.MLP(hidden=(6, 5), num_classes=3, activation="relu", dropout_convention="classic")
    inverted = model.clone(dropout_convention="inverted")
    x = _normal((4, 8))
    params = _params(model, x)
    rates = np.array([0.3, 0.5, 0.2], np.float32)
    widths = models.masked_widths(model, (8,))
    ones = tuple(np.ones((w,), np.float32) for w in widths)
    batched_ones = tuple(np.ones((4, w), np.float32) for w in widths)

    @jit
    def outputs(params):
        v = {"params": params}
        return (
            model.apply(v, x),
            model.apply(v, x, masks=ones, rates=rates),
            model.apply(v, x, masks=batched_ones, rates=rates),
            inverted.apply(v, x, masks=ones, rates=rates),
        )

    plain, shared, per_example, inv = outputs(params)
    np.testing.assert_allclose(shared, plain, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(per_example, plain, rtol=1e-6, atol=1e-7)
    assert not np.allclose(inv, plain)  # the inverted convention rescales kept units


@pytest.mark.parametrize("convention", ["inverted", "classic"])
def test_dropped_hidden_unit_makes_output_independent_of_its_incoming_weights(convention):
    model = jaxdl.MLP(
        hidden=(6, 5), num_classes=3, activation="tanh", dropout_convention=convention
    )
    x = _normal((4, 8))
    params = _params(model, x)
    rates = np.array([0.0, 0.5, 0.5], np.float32)
    ones = np.ones((6,), np.float32)
    shared = (np.ones((8,), np.float32), _changed(ones, 2, 0.0), np.ones((5,), np.float32))
    # per-example masks: only example 1 drops unit 2
    rows = _changed(np.ones((4, 6), np.float32), (1, 2), 0.0)
    per_example = (np.ones((4, 8), np.float32), rows, np.ones((4, 5), np.float32))
    kernel, bias = params["layer_0"]["kernel"], params["layer_0"]["bias"]
    perturbed = {
        **params,
        "layer_0": {
            "kernel": _changed(kernel, (slice(None), 2), kernel[:, 2] + 3.0),
            "bias": _changed(bias, 2, bias[2] - 2.0),
        },
    }
    other = _with_kernel(params, "layer_0", _changed(kernel, (slice(None), 3), kernel[:, 3] + 3.0))
    apply = jit(lambda p, m: model.apply({"params": p}, x, masks=m, rates=rates))

    out = apply(params, shared)
    np.testing.assert_array_equal(apply(perturbed, shared), out)
    assert not np.allclose(apply(other, shared), out)  # a kept unit's weights matter
    a, b = apply(params, per_example), apply(perturbed, per_example)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], b[0])


def test_dropped_input_feature_makes_output_independent_of_it():
    model = jaxdl.MLP(hidden=(6,), num_classes=3)
    x = _normal((4, 8))
    params = _params(model, x)
    rates = np.array([0.5, 0.0], np.float32)
    masks = (_changed(np.ones((8,), np.float32), 5, 0.0), np.ones((6,), np.float32))
    apply = jit(lambda x: model.apply({"params": params}, x, masks=masks, rates=rates))
    np.testing.assert_array_equal(apply(_changed(x, (slice(None), 5), 1e3)), apply(x))


# ------------------------------------------------------------------ widths and the CNN


def test_masked_widths():
    mlp = jaxdl.MLP(hidden=(500, 300))
    assert models.masked_widths(mlp, (28, 28)) == (784, 500, 300)
    assert models.masked_widths(mlp, (784,)) == (784, 500, 300)
    assert models.masked_widths(jaxdl.MLP(hidden=()), (5,)) == (5,)
    cnn = jaxdl.CNN(features=(32, 64))
    assert models.masked_widths(cnn, (28, 28, 1)) == (7 * 7 * 64, 512)
    cnn = jaxdl.CNN(features=(32, 64), dense=(128, 64))
    assert models.masked_widths(cnn, (784,)) == (3136, 128, 64)
    cnn = jaxdl.CNN(features=(8, 16, 32))
    assert models.masked_widths(cnn, (28, 28, 1)) == (3 * 3 * 32, 512)
    cnn = jaxdl.CNN(features=(16,), dense=(), image_shape=(32, 32, 3))
    assert models.masked_widths(cnn, (32, 32, 3)) == (16 * 16 * 16,)


def test_cnn_forward_shapes_masks_and_finite_grads():
    model = jaxdl.CNN(features=(32, 64), dense=(32,), num_classes=10)
    images = np.random.default_rng(0).uniform(size=(3, 28, 28, 1)).astype(np.float32)
    flat = images.reshape(3, 784)
    shapes = _shapes(model, flat)["params"]
    assert shapes["conv_0"]["kernel"].shape == (5, 5, 1, 32)
    assert shapes["conv_1"]["kernel"].shape == (5, 5, 32, 64)
    assert shapes["layer_0"]["kernel"].shape == (7 * 7 * 64, 32)
    params = _params(model, flat, scale=0.05)
    widths = models.masked_widths(model, (28, 28, 1))
    rates = np.array([0.2, 0.5], np.float32)
    y = np.array([1, 7, 3], np.int32)

    masks = _bernoulli_masks(rates, widths, 3)  # one mask per example

    @jit
    def run(params, masks):
        def loss(p):
            logits = model.apply({"params": p}, flat, masks=masks, rates=rates, train=True)
            return losses.cross_entropy(logits, y), logits

        grads, dropped = jax.grad(loss, has_aux=True)(params)
        v = {"params": params}
        return model.apply(v, flat), model.apply(v, images), dropped, grads

    out_flat, out_img, dropped, grads = jax.device_get(run(params, masks))
    assert out_flat.shape == out_img.shape == dropped.shape == (3, 10)
    np.testing.assert_allclose(out_flat, out_img, rtol=1e-6, atol=1e-6)
    assert not np.allclose(dropped, out_flat)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).max() > 0, path


# ------------------------------------------------------------------ batch norm


def _bn_variables(model, x):
    """Random parameters; batch statistics as initialised (mean 0, var 1)."""
    stats = jax.tree_util.tree_map_with_path(
        lambda path, s: np.full(s.shape, 0.0 if path[-1].key == "mean" else 1.0, s.dtype),
        _shapes(model, x)["batch_stats"],
    )
    return {"params": _params(model, x), "batch_stats": stats}


def test_batch_norm_training_updates_running_statistics():
    model = jaxdl.MLP(hidden=(5,), num_classes=3, batch_norm=True)
    x = 2.0 + _normal((16, 4), scale=3.0)
    variables = _bn_variables(model, x)

    @jit
    def run(variables):
        _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        moved = {"params": variables["params"], **updates}
        _, unchanged = model.apply(moved, x, train=False, mutable=["batch_stats"])
        return updates["batch_stats"], unchanged["batch_stats"]

    updated, unchanged = run(variables)
    layer = variables["params"]["layer_0"]
    pre = np.asarray(x, np.float64) @ np.asarray(layer["kernel"], np.float64) + np.asarray(
        layer["bias"]
    )
    new = updated["bn_0"]
    # momentum 0.9: running ← 0.9·running + 0.1·batch (biased batch variance)
    np.testing.assert_allclose(new["mean"], 0.1 * pre.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * pre.var(0), rtol=1e-4, atol=1e-6)
    # test mode uses, and does not change, the running statistics
    np.testing.assert_array_equal(unchanged["bn_0"]["mean"], new["mean"])
    np.testing.assert_array_equal(unchanged["bn_0"]["var"], new["var"])


@pytest.mark.parametrize(
    "model",
    [
        jaxdl.MLP(hidden=(5, 4), num_classes=3, batch_norm=True),
        jaxdl.CNN(features=(3,), dense=(4,), num_classes=3, batch_norm=True, image_shape=(6, 6, 1)),
    ],
    ids=["mlp", "cnn"],
)
def test_batch_norm_statistics_ignore_padding_rows(model):
    n_real, n_pad = 6, 3
    real = _normal((n_real, 36))
    padded = np.concatenate([real, np.full((n_pad, 36), 1e6, np.float32)])
    example_mask = np.arange(n_real + n_pad) < n_real
    variables = _bn_variables(model, real)

    @jit
    def run(variables):
        def train_apply(x, **kw):
            return model.apply(variables, x, train=True, mutable=["batch_stats"], **kw)

        return (
            train_apply(real),
            train_apply(padded, example_mask=example_mask),
            train_apply(padded),
        )

    (out_real, upd_real), (out_pad, upd_pad), (_, upd_bad) = jax.device_get(run(variables))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        upd_pad["batch_stats"],
        upd_real["batch_stats"],
    )
    np.testing.assert_allclose(out_pad[:n_real], out_real, rtol=1e-5, atol=1e-5)
    # without the example mask the padding does pollute the statistics
    worst = max(float(s["var"].max()) for s in upd_bad["batch_stats"].values())
    assert worst > 1e3


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (jaxdl.MLP(activation="rleu"), r"activation: unknown value 'rleu' \(did you mean 'relu'\?\)"),
        (jaxdl.MLP(activation="sigmiod"), r"did you mean 'sigmoid'"),
        (jaxdl.MLP(weight_init="he_norml"), r"init: unknown value 'he_norml' \(did you mean 'he_normal'\?\)"),
        (jaxdl.MLP(dropout_convention="clasic"), r"dropout convention: unknown value 'clasic' \(did you mean 'classic'\?\)"),
        (jaxdl.MLP(hidden=(4, 0)), r"layer width: expected an integer > 0, got 0"),
        (jaxdl.MLP(num_classes=1), r"num_classes: expected at least 2 classes, got 1"),
        (jaxdl.MLP(activation="maxout", maxout_pieces=0), r"maxout pieces: expected an integer > 0"),
        (jaxdl.CNN(features=(8, 0)), r"layer width: expected an integer > 0, got 0"),
        (jaxdl.CNN(dense=(0,)), r"layer width"),
        (jaxdl.CNN(pool="mean"), r"pool: unknown value 'mean'"),
        (jaxdl.CNN(kernel_size=0), r"kernel size: expected an integer > 0"),
    ],
)  # fmt: skip
def test_check_model_rejects_bad_settings(model, message):
    with pytest.raises(InputError, match=message):
        models.check_model(model)


def test_check_model_accepts_valid_models():
    valid = (jaxdl.MLP(), jaxdl.MLP(activation="maxout", weight_init="glorot_normal"), jaxdl.CNN())
    for model in valid:
        assert models.check_model(model) is model


# ------------------------------------------------------------------ symmetry of zero init


def test_zero_init_never_breaks_symmetry_but_xavier_does():
    data = jaxdl.synthetic(192, num_features=6, num_classes=3, seed=0)
    # sigmoid: with zero weights its hidden units output 0.5, so gradients reach every
    # layer (relu and tanh output 0, and their hidden weights would never move at all)
    model = jaxdl.MLP(hidden=(8,), num_classes=3, activation="sigmoid", weight_init="zeros")
    opt = jaxdl.make_optimizer("sgd", learning_rate=0.5)
    kw = {"epochs": 4, "batch_size": 32}
    state, history = jaxdl.fit(model, opt, data, key=0, **kw)
    k0 = np.asarray(state.params["layer_0"]["kernel"])
    k_out = np.asarray(state.params["output"]["kernel"])
    assert np.abs(k0).max() > 1e-2  # the hidden weights did train
    # Every column identical up to float32 rounding: a CPU's GEMM may compute the columns
    # in different vector lanes and round them differently (13 ulps after these 24 steps
    # on an AVX2-only CPU), far below the spread (> 1e-2) that Xavier init gives below.
    assert np.ptp(k0, axis=1).max() <= 1e-5 * np.abs(k0).max()
    assert np.ptp(np.asarray(state.params["layer_0"]["bias"])) <= 1e-6
    assert np.ptp(k_out, axis=0).max() <= 1e-5 * np.abs(k_out).max()  # every row identical
    assert np.all(np.isfinite(history["train_loss"]))

    # The same compiled training program started from Xavier-uniform weights.
    setup, hp = train.prepare(jaxdl.RunConfig.of(model, opt, **kw), data)
    start = compiled.programs(setup).init(jax.random.key(1), hp)
    rng = np.random.default_rng(0)
    params = {
        name: {
            "kernel": (rng.uniform(-1, 1, size=(fi, fo)) * math.sqrt(6 / (fi + fo))).astype(
                np.float32
            ),
            "bias": np.zeros((fo,), np.float32),
        }
        for name, (fi, fo) in {"layer_0": (6, 8), "output": (8, 3)}.items()
    }
    k_start = params["layer_0"]["kernel"].copy()
    state, _ = train.fit_state(setup, start.replace(params=params), hp, data)
    k0 = np.asarray(state.params["layer_0"]["kernel"])
    assert np.ptp(k0, axis=1).min() > 1e-2
    assert not np.allclose(k0, k_start)  # it trained too


def test_cnn_without_conv_blocks_is_refused():
    with pytest.raises(InputError, match="at least one conv block"):
        models.check_model(jaxdl.CNN(features=(), dense=(16,)))


@pytest.mark.parametrize("k", [1, 3, 4, 5])
def test_patches_convolution_equals_flax_conv_values_and_gradients(k):
    from flax import linen as nn

    x = jax.random.normal(jax.random.key(0), (3, 7, 6, 2))
    ref = nn.Conv(4, (k, k), padding="SAME")
    params = ref.init(jax.random.key(1), x)
    for impl in ("patches", "xla"):
        conv = models.Conv(4, k, impl=impl)
        assert jax.tree_util.tree_map(jnp.shape, conv.init(jax.random.key(1), x)) == (
            jax.tree_util.tree_map(jnp.shape, params)
        )
        np.testing.assert_allclose(conv.apply(params, x), ref.apply(params, x), atol=1e-5)

        def loss(p, xx, m=conv):
            return (jnp.sin(m.apply(p, xx)) ** 2).sum()

        got = jax.grad(loss, argnums=(0, 1))(params, x)
        want = jax.grad(functools.partial(loss, m=ref), argnums=(0, 1))(params, x)
        for g, w in zip(
            jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
        ):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_cnn_conv_impls_agree_and_bad_impl_is_refused():
    x = jax.random.uniform(jax.random.key(0), (4, 784))
    a = jaxdl.CNN(features=(4, 8), dense=(16,), conv_impl="patches")
    b = a.clone(conv_impl="xla")
    params = a.init(jax.random.key(1), x)
    np.testing.assert_allclose(a.apply(params, x), b.apply(params, x), atol=1e-5)
    with pytest.raises(InputError, match="conv impl"):
        models.check_model(a.clone(conv_impl="fft"))
