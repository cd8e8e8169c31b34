"""Tests for jaxdl.inits: documented variances, aliases, signal propagation through deep
nets, kernel scaling, and the traced init scale."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl
from jaxdl import compiled, inits, step, train
from jaxdl.validate import InputError

# The programs here are small: compile them quickly rather than optimise them.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# ------------------------------------------------------------------ documented variances

DENSE = (300, 800)  # fan_in 300, fan_out 800
CONV = (3, 3, 32, 64)  # fan_in 3·3·32 = 288, fan_out 3·3·64 = 576
CANONICAL = ("zeros", "normal", "uniform", "xavier_uniform", "xavier_normal", "he_normal", "he_uniform", "lecun_normal")  # fmt: skip
ALIASES = {
    "glorot_uniform": "xavier_uniform",
    "glorot_normal": "xavier_normal",
    "kaiming_normal": "he_normal",
    "kaiming_uniform": "he_uniform",
}


def _fans(shape):
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _documented(name, shape):
    """(distribution, variance, bound) of the kernel draw after the default scale."""
    fan_in, fan_out = _fans(shape)
    avg = 2.0 / (fan_in + fan_out)
    return {
        "zeros": ("zeros", 0.0, 0.0),
        "normal": ("normal", 0.01**2, None),
        "uniform": ("uniform", 0.05**2 / 3, 0.05),
        "xavier_uniform": ("uniform", avg, math.sqrt(3 * avg)),
        "xavier_normal": ("normal", avg, None),
        "he_normal": ("normal", 2.0 / fan_in, None),
        "he_uniform": ("uniform", 2.0 / fan_in, math.sqrt(6.0 / fan_in)),
        "lecun_normal": ("normal", 1.0 / fan_in, None),
    }[name]


@pytest.fixture(scope="module")
def draws():
    """One kernel per name (aliases included) and shape, after ``scale_kernels`` with the
    name's default scale; a name and its alias share a key."""

    @jit
    def draw(key):
        out = {}
        for name in (*CANONICAL, *ALIASES):
            k = jax.random.fold_in(key, CANONICAL.index(inits.canonical(name)))
            unit = inits.unit_initializer(name)
            scale = jnp.float32(inits.default_scale(name))
            for shape in (DENSE, CONV):
                kernel = unit(jax.random.fold_in(k, len(shape)), shape, jnp.float32)
                out[name, shape] = inits.scale_kernels({"kernel": kernel}, scale)["kernel"]
        return out

    return jax.device_get(draw(jax.random.key(0)))


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
@pytest.mark.parametrize("name", CANONICAL)
def test_draw_has_documented_distribution(draws, name, shape):
    w = np.asarray(draws[name, shape], np.float64)
    assert w.shape == shape and draws[name, shape].dtype == np.float32
    kind, var, bound = _documented(name, shape)
    if kind == "zeros":
        assert np.all(w == 0.0)
        return
    n = w.size
    z = w.reshape(-1) / math.sqrt(var)
    kurtosis = 3.0 if kind == "normal" else 1.8
    # 5 standard errors: of the mean (σ/√n) and of the sample variance (σ²·√((κ-1)/n))
    assert abs(z.mean()) <= 5 / math.sqrt(n)
    assert abs(z.var() - 1.0) <= 5 * math.sqrt((kurtosis - 1) / n), z.var()
    if kind == "uniform":
        assert np.abs(w).max() <= bound * (1 + 1e-6)
        assert np.abs(w).max() >= bound * (1 - 1e-3)
    else:
        # untruncated: the tails reach well past the 2σ cut of a truncated normal
        assert np.abs(z).max() > 3.5
    k = ((z - z.mean()) ** 4).mean() / z.var() ** 2
    assert abs(k - kurtosis) <= 5 * math.sqrt(24 / n), k


def test_normal_and_uniform_default_scales():
    assert inits.default_scale("normal") == 0.01
    assert inits.default_scale("uniform") == 0.05
    for name in ("zeros", "xavier_uniform", "xavier_normal", "he_normal", "he_uniform"):
        assert inits.default_scale(name) == 1.0


@pytest.mark.parametrize(("alias", "target"), ALIASES.items())
def test_aliases(draws, alias, target):
    assert alias in inits.NAMES and target in inits.NAMES
    assert inits.canonical(alias) == target
    assert inits.canonical(target) == target
    assert inits.default_scale(alias) == inits.default_scale(target)
    for shape in (DENSE, CONV):
        np.testing.assert_array_equal(draws[alias, shape], draws[target, shape])


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("he_norml", "he_normal"), ("xavier_unifrom", "xavier_uniform"), ("kaiming_norm", "kaiming_normal")],
)  # fmt: skip
def test_unknown_name_raises_with_suggestion(name, suggestion):
    message = (
        rf"init: unknown value '{name}' \(did you mean '{suggestion}'\?\); expected one of zeros, "
    )
    for fn in (inits.canonical, inits.unit_initializer, inits.default_scale):
        with pytest.raises(InputError, match=message):
            fn(name)
    with pytest.raises(InputError, match="init: unknown value 'orthogonal'; expected one of"):
        inits.canonical("orthogonal")


# ------------------------------------------------------------------ signal propagation

DEPTH, WIDTH, BATCH = 10, 256, 512
CONFIGS = {
    "he_relu": ("he_normal", "relu"),
    "xavier_tanh": ("xavier_uniform", "tanh"),
    "small_relu": ("normal", "relu"),
    "small_tanh": ("normal", "tanh"),
}


@pytest.fixture(scope="module")
def second_moments():
    """Per hidden layer, the mean square activation of a standard-normal batch pushed
    through MLP(hidden=(256,)*10) built by each config's named initialiser (biases 0)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, WIDTH)), jnp.float32)

    @jit
    def run(key):
        out = {}
        for name, (weight_init, activation) in CONFIGS.items():
            model = jaxdl.MLP(
                hidden=(WIDTH,) * DEPTH, activation=activation, weight_init=weight_init
            )
            params = model.init(key, x[:1])["params"]
            params = inits.scale_kernels(params, jnp.float32(inits.default_scale(weight_init)))
            _, state = model.apply({"params": params}, x, mutable=["intermediates"])
            acts = [state["intermediates"][f"act_layer_{i}"][0] for i in range(DEPTH)]
            out[name] = jnp.stack([jnp.mean(a.astype(jnp.float32) ** 2) for a in acts])
        out["input"] = jnp.mean(x**2)
        return out

    return {k: np.asarray(v, np.float64) for k, v in run(jax.random.key(0)).items()}


def test_he_relu_preserves_signal(second_moments):
    m = second_moments["he_relu"]
    # Var(h) = fan_in · (2/fan_in) · E[a²] and E[relu(h)²] = Var(h)/2: E[a²] is preserved
    assert abs(m[0] / second_moments["input"] - 1) < 0.1
    assert np.all((m / m[0] > 0.5) & (m / m[0] < 2.0)), m / m[0]


def _tanh_mean_field(q0, depth):
    """q_l = E[tanh(√q_{l-1} z)²], z ~ N(0, 1): the wide-layer limit for Var(w) = 1/fan_in."""
    z, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    q, out = q0, []
    for _ in range(depth):
        q = float(np.sum(weights * np.tanh(math.sqrt(q) * z) ** 2))
        out.append(q)
    return np.array(out)


def test_xavier_tanh_decays_slowly_as_mean_field_predicts(second_moments):
    m = second_moments["xavier_tanh"]
    # xavier with fan_in = fan_out: Var(w) = 2/(256+256) = 1/fan_in
    theory = _tanh_mean_field(second_moments["input"], DEPTH)
    np.testing.assert_allclose(m, theory, rtol=0.1)
    ratio = m[-1] / m[0]
    # tanh shrinks the signal only like ~1/(2l): no collapse, unlike small init below
    assert 0.1 < ratio < 0.5, ratio
    assert np.all(np.diff(m) < 0)


@pytest.mark.parametrize(("config", "gain"), [("small_relu", 0.5), ("small_tanh", 1.0)])
def test_small_normal_init_collapses_signal(second_moments, config, gain):
    m = second_moments[config]
    assert np.all(np.isfinite(m)) and np.all(m > 0)
    ratio = m[-1] / m[0]
    assert ratio < 1e-6, ratio
    # each layer multiplies E[a²] by fan_in · σ² · gain (relu halves it; tanh is ~linear here)
    per_layer = ratio ** (1 / (DEPTH - 1))
    np.testing.assert_allclose(per_layer, WIDTH * 0.01**2 * gain, rtol=0.1)


# ------------------------------------------------------------------ kernels vs other parameters


def _cnn_params():
    model = jaxdl.CNN(
        features=(4,), dense=(6,), num_classes=3, batch_norm=True, image_shape=(8, 8, 1)
    )
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64))))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes["params"]
    )


def _path(path):
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def test_is_kernel_on_conv_and_dense_tree():
    params = _cnn_params()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = {_path(p) for p, w in leaves if inits.is_kernel(p, w)}
    others = {_path(p) for p, w in leaves if not inits.is_kernel(p, w)}
    assert kernels == {"conv_0/kernel", "layer_0/kernel", "output/kernel"}
    assert others == {
        "conv_0/bias",
        "conv_bn_0/scale",
        "conv_bn_0/bias",
        "layer_0/bias",
        "bn_0/scale",
        "bn_0/bias",
        "output/bias",
    }
    # attribute paths (e.g. a NamedTuple field) count too
    w = jnp.ones((2, 2))
    assert inits.is_kernel((jax.tree_util.GetAttrKey("kernel"),), w)
    assert not inits.is_kernel((jax.tree_util.GetAttrKey("bias"),), w)


def test_scale_kernels_multiplies_kernels_only():
    params = _cnn_params()
    for scale in (3.0, 0.0):
        eager = inits.scale_kernels(params, jnp.float32(scale))
        traced = jit(inits.scale_kernels)(params, jnp.float32(scale))
        for out in (eager, traced):
            for (path, before), after in zip(
                jax.tree_util.tree_flatten_with_path(params)[0],
                jax.tree_util.tree_leaves(out),
                strict=True,
            ):
                assert after.dtype == before.dtype
                expected = np.float32(scale) * np.asarray(before)
                if _path(path).endswith("kernel"):
                    np.testing.assert_allclose(after, expected, rtol=1e-7, atol=0)
                else:
                    np.testing.assert_array_equal(after, before)


# ------------------------------------------------------------------ init_scale is traced


def test_init_scale_is_traced_and_scales_kernels_linearly():
    model = jaxdl.MLP(hidden=(256,), num_classes=3, weight_init="he_normal")
    opt = jaxdl.make_optimizer("sgd")
    feature_shape = (128,)
    setup = step.Setup(model, opt, feature_shape, n_train=97, batch_size=13, epochs=1)
    progs = compiled.programs(setup)
    key = jax.random.key(0)
    scales = (1.0, 0.5, 2.0, 0.0, 0.01)
    kernels = {}
    for s in scales:
        hp = train.make_hparams(setup, opt, feature_shape, init_scale=s)
        state = progs.init(key, hp)
        kernels[s] = jax.device_get(state.params)
    assert progs.traces["init"] == 1  # one trace for every init_scale value

    unit = kernels[1.0]
    w = np.asarray(unit["layer_0"]["kernel"], np.float64)
    # he_normal: Var = 2 / fan_in, within 5 standard errors
    assert abs(w.var() / (2 / 128) - 1) <= 5 * math.sqrt(2 / w.size)
    for s in scales:
        for layer in ("layer_0", "output"):
            np.testing.assert_allclose(
                kernels[s][layer]["kernel"], s * unit[layer]["kernel"], rtol=1e-6, atol=0
            )
            np.testing.assert_array_equal(kernels[s][layer]["bias"], 0.0)


def test_init_scale_defaults_and_validation():
    opt = jaxdl.make_optimizer("sgd")
    small = jaxdl.MLP(hidden=(4,), weight_init="normal")
    assert float(train.make_hparams(small, opt, (3,)).init_scale) == pytest.approx(0.01)
    assert float(train.make_hparams(jaxdl.MLP(hidden=(4,)), opt, (3,)).init_scale) == 1.0
    assert float(train.make_hparams(small, opt, (3,), init_scale=1.0).init_scale) == 1.0
    with pytest.raises(InputError, match=r"init_scale: expected a finite number >= 0, got -1.0"):
        train.make_hparams(small, opt, (3,), init_scale=-1.0)
