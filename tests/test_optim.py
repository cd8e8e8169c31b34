"""Optimizers: every family's update against a NumPy closed form, hyperparameter injection,
structure equality, freezing, per-layer learning rates, schedules and input checks."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdl
from jaxdl import optim
from jaxdl.optim import make_optimizer
from jaxdl.validate import InputError

FAMILIES = tuple(optim.FAMILIES)
SHAPES = {
    "layer_0": {"kernel": (3, 2), "bias": (2,)},
    "bn_0": {"scale": (2,), "bias": (2,)},
    "output": {"kernel": (2, 2), "bias": (2,)},
}
# Non-default family numbers, so that a hyperparameter that is ignored shows up; eps is
# large enough that putting it inside or outside the square root changes the result.
CUSTOM = {
    "sgd": {},
    "momentum": {"momentum": 0.8},
    "momentum_ema": {"momentum": 0.7},
    "nesterov": {"momentum": 0.6},
    "adagrad": {"eps": 0.1},
    "rmsprop": {"decay": 0.7, "eps": 0.1},
    "adam": {"b1": 0.8, "b2": 0.9, "eps": 0.1},
    "adamw": {"b1": 0.8, "b2": 0.9, "eps": 0.1},
}


def _tree(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return {
        layer: {k: jnp.asarray(scale * rng.normal(size=s), jnp.float32) for k, s in leaves.items()}
        for layer, leaves in SHAPES.items()
    }


PARAMS = _tree(0)
GRADS = [_tree(1), _tree(2, scale=0.5), _tree(3, scale=2.0)]


def _flat(tree) -> dict[str, np.ndarray]:
    return {
        f"{layer}/{k}": np.asarray(v, np.float64)
        for layer, leaves in tree.items()
        for k, v in leaves.items()
    }


def _reference(name: str, h, params, grads_seq):
    """The documented update rule in float64 NumPy: the updates of each step."""
    p = _flat(params)
    state: dict[str, dict[str, np.ndarray]] = {}
    out = []
    for t, grads in enumerate(grads_seq, start=1):
        g = _flat(grads)
        norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
        if not norm < h["clip_norm"]:
            g = {k: v / norm * h["clip_norm"] for k, v in g.items()}
        step = {}
        for k, gk in g.items():
            s = state.setdefault(k, {})
            if name == "sgd":
                u = gk
            elif name in ("momentum", "nesterov"):
                s["v"] = h["momentum"] * s.get("v", 0.0) + gk
                u = s["v"] if name == "momentum" else gk + h["momentum"] * s["v"]
            elif name == "momentum_ema":
                s["m"] = h["momentum"] * s.get("m", 0.0) + (1 - h["momentum"]) * gk
                u = s["m"]
            elif name == "adagrad":
                s["s"] = s.get("s", 0.1) + gk**2
                u = gk / np.sqrt(s["s"] + h["eps"])
            elif name == "rmsprop":
                s["s"] = h["decay"] * s.get("s", 0.0) + (1 - h["decay"]) * gk**2
                u = gk / np.sqrt(s["s"] + h["eps"])
            else:  # adam, adamw
                s["m"] = h["b1"] * s.get("m", 0.0) + (1 - h["b1"]) * gk
                s["v"] = h["b2"] * s.get("v", 0.0) + (1 - h["b2"]) * gk**2
                m_hat = s["m"] / (1 - h["b1"] ** t)
                v_hat = s["v"] / (1 - h["b2"] ** t)
                u = m_hat / (np.sqrt(v_hat) + h["eps"])
            if k.endswith("/kernel"):
                u = u + h["weight_decay"] * p[k]
            step[k] = -h["learning_rate"] * u
        p = {k: p[k] + step[k] for k in p}
        out.append(step)
    return out


def _run(opt, params=PARAMS, grads_seq=GRADS):
    """Applies ``opt.tx`` to ``grads_seq``; returns the updates of each step."""
    state = opt.init(params)
    out = []
    for grads in grads_seq:
        updates, state = opt.tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


def _assert_matches(actual, expected):
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        a = _flat(a)
        assert a.keys() == e.keys()
        for k in a:
            np.testing.assert_allclose(a[k], e[k], rtol=1e-6, atol=1e-6, err_msg=f"step {step} {k}")


VARIANTS = {
    "defaults": lambda name: {"learning_rate": 0.1},
    "custom": lambda name: {"learning_rate": 0.1, **CUSTOM[name]},
    "decay": lambda name: {"learning_rate": 0.1, "weight_decay": 0.3, **CUSTOM[name]},
    "clip": lambda name: {"learning_rate": 0.1, "clip_norm": 0.5, **CUSTOM[name]},
    "decay_clip": lambda name: {
        "learning_rate": 0.1,
        "weight_decay": 0.3,
        "clip_norm": 0.5,
        **CUSTOM[name],
    },
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_closed_form(name, variant):
    overrides = VARIANTS[variant](name)
    opt = optim.make_optimizer(name, **overrides)
    h = dict(opt.hyperparams)
    assert {k: h[k] for k in overrides} == overrides
    _assert_matches(_run(opt), _reference(name, h, PARAMS, GRADS))


def test_defaults_table():
    assert optim.defaults("adamw")["weight_decay"] == 1e-4
    assert optim.defaults("adam")["weight_decay"] == 0.0
    assert optim.defaults("adam")["learning_rate"] == 1e-3
    assert optim.defaults("sgd")["learning_rate"] == 0.01
    assert optim.defaults("momentum")["momentum"] == 0.9
    assert optim.defaults("sgd")["clip_norm"] == math.inf


@pytest.mark.parametrize("name", FAMILIES)
def test_weight_decay_reaches_kernels_only(name):
    plain = _flat(_run(optim.make_optimizer(name, learning_rate=0.1, weight_decay=0.0))[-1])
    decayed = _flat(_run(optim.make_optimizer(name, learning_rate=0.1, weight_decay=0.5))[-1])
    for k in plain:
        if k.endswith("/kernel"):
            assert np.all(plain[k] != decayed[k]), k
        else:  # biases and batch-norm parameters
            np.testing.assert_array_equal(plain[k], decayed[k], err_msg=k)


def test_weight_decay_is_decoupled_value():
    """Zero gradients: the step is exactly -lr·wd·w on kernels and 0 elsewhere, even for Adam."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
    for name in ("sgd", "adam"):
        opt = optim.make_optimizer(name, learning_rate=0.1, weight_decay=0.2)
        (updates,) = _run(opt, grads_seq=[zeros])
        for k, u in _flat(updates).items():
            want = -0.1 * 0.2 * _flat(PARAMS)[k] if k.endswith("/kernel") else np.zeros_like(u)
            np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-7, err_msg=f"{name} {k}")


@pytest.mark.parametrize("clip", [0.5, 2.0, 100.0])
def test_clip_by_global_norm_values(clip):
    g = GRADS[0]
    norm = float(optax.tree.norm(g))
    assert 2.0 < norm < 100.0
    (updates,) = _run(optim.make_optimizer("sgd", learning_rate=1.0, clip_norm=clip), grads_seq=[g])
    factor = min(1.0, clip / norm)
    for k, u in _flat(updates).items():
        np.testing.assert_allclose(u, -factor * _flat(g)[k], rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), min(norm, clip), rtol=1e-6)


@pytest.mark.parametrize("radius", [0.05, 0.3, 1e3])
def test_max_norm_projects_each_units_incoming_weights(radius):
    opt = optim.make_optimizer("sgd", learning_rate=1.0, max_norm=radius)
    assert opt.constrain and not optim.make_optimizer("sgd").constrain
    g = GRADS[0]
    state = opt.init(PARAMS)
    updates, _ = opt.tx.update(g, state, PARAMS)
    new = _flat(optax.apply_updates(PARAMS, updates))
    old, grad = _flat(PARAMS), _flat(g)
    for k, p in new.items():
        free = old[k] - grad[k]  # the plain SGD step
        if not k.endswith("/kernel"):
            np.testing.assert_allclose(p, free, rtol=1e-6, atol=1e-7, err_msg=k)
            continue
        cols = np.sqrt((free.reshape(-1, free.shape[-1]) ** 2).sum(0))  # one norm per unit
        want = free * np.minimum(1.0, radius / cols)
        np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-7, err_msg=k)
        got = np.sqrt((p.reshape(-1, p.shape[-1]) ** 2).sum(0))
        assert np.all(got <= radius * (1 + 1e-5)), k
    if radius == 0.05:
        assert np.any(cols > radius)  # the constraint was active


def test_max_norm_is_traced_and_refused_when_not_built():
    opt = optim.make_optimizer("adam", max_norm=3.0)
    assert opt == optim.make_optimizer("adam", max_norm=0.5)  # same structure: no recompile
    assert optim.get_hyperparams(opt.init(PARAMS))["max_norm"] == pytest.approx(3.0)
    with pytest.raises(jaxdl.InputError, match="max_norm"):
        optim.make_optimizer("adam", max_norm=0.0)
    with pytest.raises(jaxdl.InputError, match="max_norm.*made without the max-norm"):
        optim.check_structure(
            optim.make_optimizer("adam"), {**optim.defaults("adam"), "max_norm": 2.0}
        )


def _sgd_updates(opt, grads=GRADS[0], lr=None):
    state = opt.init(PARAMS)
    if lr is not None:
        state = optim.set_hyperparams(state, {"learning_rate": lr})
    updates, _ = opt.tx.update(grads, state, PARAMS)
    return _flat(updates)


@pytest.mark.parametrize(
    "structure",
    [{}, {"freeze": ("bn_0",)}, {"layer_lr": {"output": 0.5}}],
    ids=["plain", "freeze", "layer_lr"],
)
def test_set_hyperparams_changes_next_update_and_keeps_dtypes(structure):
    opt = optim.make_optimizer("sgd", learning_rate=0.1, **structure)
    state = opt.init(PARAMS)
    new = optim.set_hyperparams(state, {"learning_rate": 0.25, "weight_decay": 1})
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(new), strict=True):
        assert (a.dtype, a.shape, a.weak_type) == (b.dtype, b.shape, b.weak_type)
    hp = optim.get_hyperparams(new)
    assert float(hp["learning_rate"]) == pytest.approx(0.25)
    assert float(hp["weight_decay"]) == 1.0
    assert hp["weight_decay"].dtype == jnp.float32
    updates, _ = opt.tx.update(
        GRADS[0], optim.set_hyperparams(state, {"learning_rate": 0.25}), PARAMS
    )
    mult = dict(structure.get("layer_lr", {}))
    frozen = structure.get("freeze", ())
    for k, u in _flat(updates).items():
        layer = k.split("/")[0]
        want = 0.0 if layer in frozen else -0.25 * mult.get(layer, 1.0) * _flat(GRADS[0])[k]
        np.testing.assert_allclose(u, want, rtol=1e-6, atol=0, err_msg=k)


@pytest.mark.parametrize(
    "structure", [{}, {"freeze": ("layer_0",)}, {"layer_lr": {"layer_0": 2.0}}]
)
def test_get_hyperparams_returns_injected_values(structure):
    opt = optim.make_optimizer(
        "adam", learning_rate=0.003, b1=0.8, eps=1e-5, clip_norm=4.0, **structure
    )
    hp = optim.get_hyperparams(opt.init(PARAMS))
    assert set(hp) == set(optim.injected_names("adam"))
    want = {"learning_rate": 0.003, "b1": 0.8, "b2": 0.999, "eps": 1e-5, "clip_norm": 4.0}
    for k, v in want.items():
        assert float(hp[k]) == pytest.approx(v, rel=1e-7), k
    assert float(hp["weight_decay"]) == 0.0
    assert "lr_decay" not in hp  # schedule numbers are read by the train step, not Optax


def test_optimizers_differing_only_in_numbers_are_equal():
    a = optim.make_optimizer("adam", learning_rate=1e-3)
    b = optim.make_optimizer("adam", learning_rate=0.1, b1=0.5, eps=1e-6, lr_decay=0.1)
    assert a == b
    # Switching clipping or weight decay on adds a pass to the chain: a new structure,
    # but its values are still free.
    c = optim.make_optimizer("adam", weight_decay=0.01, clip_norm=1.0)
    assert c != a and c == optim.make_optimizer("adam", weight_decay=0.5, clip_norm=3.0)
    assert hash(a) == hash(b)
    # ... yet each starts from its own numbers.
    assert float(optim.get_hyperparams(a.init(PARAMS))["learning_rate"]) == pytest.approx(1e-3)
    assert float(optim.get_hyperparams(b.init(PARAMS))["learning_rate"]) == pytest.approx(0.1)
    different = [
        optim.make_optimizer("adamw"),
        optim.make_optimizer("adam", schedule="step"),
        optim.make_optimizer("adam", freeze=("layer_0",)),
        optim.make_optimizer("adam", layer_lr={"layer_0": 0.5}),
    ]
    for other in different:
        assert other != a
    assert len({a, b, *different}) == 1 + len(different)


def test_equal_optimizers_share_one_compiled_update():
    @functools.partial(jax.jit, static_argnums=0)
    @chex.assert_max_traces(n=1)
    def update(opt, state, grads, params):
        return opt.tx.update(grads, state, params)[0]

    for lr in (0.1, 0.3):
        opt = optim.make_optimizer("momentum", learning_rate=lr, momentum=0.5)
        u = _flat(update(opt, opt.init(PARAMS), GRADS[0], PARAMS))
        np.testing.assert_allclose(
            u["layer_0/kernel"], -lr * _flat(GRADS[0])["layer_0/kernel"], rtol=1e-6
        )


@pytest.mark.parametrize("name", FAMILIES)
def test_freeze_gives_exactly_zero_updates(name):
    frozen = optim.make_optimizer(name, learning_rate=0.1, weight_decay=0.1, freeze=("layer_0",))
    free = optim.make_optimizer(name, learning_rate=0.1, weight_decay=0.1)
    for f, u in zip(_run(frozen), _run(free), strict=True):
        f, u = _flat(f), _flat(u)
        for k in f:
            if k.startswith("layer_0/"):
                assert not np.any(f[k]), k
            else:
                np.testing.assert_allclose(f[k], u[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_layer_lr_scales_that_layer_only():
    base = _sgd_updates(optim.make_optimizer("sgd", learning_rate=0.1))
    half = _sgd_updates(optim.make_optimizer("sgd", learning_rate=0.1, layer_lr={"layer_0": 0.5}))
    for k in base:
        want = 0.5 * base[k] if k.startswith("layer_0/") else base[k]
        np.testing.assert_allclose(half[k], want, rtol=1e-7, atol=0, err_msg=k)


def _h(name="sgd", **overrides):
    values = {**optim.defaults(name), **overrides}
    return {k: jnp.float32(v) for k, v in values.items()}


def test_step_schedule():
    h = _h(lr_decay=0.5, lr_decay_every=2.0)
    got = [float(optim.lr_factor("step", jnp.float32(e), h, 10, 1.0)) for e in (0, 1.9, 2, 4.5)]
    np.testing.assert_allclose(got, [1.0, 1.0, 0.5, 0.25], rtol=1e-7)


def test_warmup_cosine_schedule():
    h = _h(warmup_epochs=2.0, lr_min_ratio=0.1)
    epochs = (0.0, 1.0, 2.0, 6.0, 10.0, 12.0)
    got = [float(optim.lr_factor("warmup_cosine", jnp.float32(e), h, 10, 1.0)) for e in epochs]
    want = [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # 3 of the 8 cosine epochs: 0.1 + 0.9 · ½(1 + cos(3π/8))
    got = float(optim.lr_factor("warmup_cosine", jnp.float32(5.0), h, 10, 1.0))
    assert got == pytest.approx(0.1 + 0.45 * (1 + math.cos(3 * math.pi / 8)), rel=1e-6)
    no_warmup = float(optim.lr_factor("warmup_cosine", jnp.float32(0.0), _h(), 10, 1.0))
    assert no_warmup == pytest.approx(1.0)


def test_constant_and_plateau_schedules():
    h = _h()
    assert float(optim.lr_factor("constant", jnp.float32(7.0), h, 10, 0.25)) == 1.0
    assert float(optim.lr_factor("plateau", jnp.float32(7.0), h, 10, jnp.float32(0.25))) == 0.25


def test_current_hyperparams_schedules_lr_and_gates_weight_decay():
    opt = optim.make_optimizer("adamw", schedule="plateau", learning_rate=0.01, weight_decay=0.02)
    base = _h("adamw", learning_rate=0.01, weight_decay=0.02, decay_start_epoch=3.0)
    cur = functools.partial(optim.current_hyperparams, opt, base, total_epochs=10)
    before = cur(epoch=jnp.float32(2.9), plateau_scale=jnp.float32(0.25))
    after = cur(epoch=jnp.float32(3.0), plateau_scale=jnp.float32(0.5))
    assert set(before) == set(optim.injected_names("adamw"))
    assert float(before["learning_rate"]) == pytest.approx(0.0025)
    assert float(after["learning_rate"]) == pytest.approx(0.005)
    assert float(before["weight_decay"]) == 0.0
    assert float(after["weight_decay"]) == pytest.approx(0.02)
    assert float(after["b1"]) == pytest.approx(0.9)

    step = optim.make_optimizer("sgd", schedule="step", learning_rate=0.1)
    values = optim.current_hyperparams(
        step, _h(learning_rate=0.1, lr_decay_every=2.0), jnp.float32(4.5), 10, jnp.float32(1.0)
    )
    assert float(values["learning_rate"]) == pytest.approx(0.025)


@pytest.mark.parametrize(
    "name, kwargs, words",
    [
        ("adma", {}, ["optimizer", "'adma'", "did you mean 'adam'"]),
        ("adam", {"momentum": 0.9}, ["adam hyperparameter", "'momentum'"]),
        ("sgd", {"learning_rate": 0.0}, ["learning_rate", "> 0"]),
        ("sgd", {"learning_rate": -0.1}, ["learning_rate", "> 0"]),
        ("sgd", {"learning_rate": math.nan}, ["learning_rate"]),
        ("momentum", {"momentum": 1.0}, ["momentum", "[0.0, 1.0)"]),
        ("momentum", {"momentum": 1.5}, ["momentum"]),
        ("adam", {"b2": 1.0}, ["b2"]),
        ("sgd", {"schedule": "cosine"}, ["schedule", "'cosine'", "warmup_cosine"]),
        ("sgd", {"clip_norm": 0.0}, ["clip_norm", "> 0"]),
        ("sgd", {"clip_norm": -1.0}, ["clip_norm"]),
        ("sgd", {"weight_decay": -1e-4}, ["weight_decay"]),
        ("sgd", {"layer_lr": {"layer_0": -1.0}}, ["layer_lr[layer_0]"]),
    ],
)
def test_bad_inputs_name_the_problem(name, kwargs, words):
    with pytest.raises(InputError) as err:
        optim.make_optimizer(name, **kwargs)
    for w in words:
        assert w in str(err.value)


def test_changing_lr_does_not_retrace():
    opt = optim.make_optimizer("momentum", learning_rate=0.1, momentum=0.5)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(opt_state, grads, params, lr):
        opt_state = optim.set_hyperparams(opt_state, {"learning_rate": lr})
        return opt.tx.update(grads, opt_state, params)

    state = opt.init(PARAMS)
    trace = 0.0
    for lr in (0.1, 0.01, 0.5, 1.0):
        updates, state = step(state, GRADS[0], PARAMS, jnp.float32(lr))
        trace = 0.5 * trace + _flat(GRADS[0])["output/kernel"]
        np.testing.assert_allclose(_flat(updates)["output/kernel"], -lr * trace, rtol=1e-6)
        assert float(optim.get_hyperparams(state)["learning_rate"]) == pytest.approx(lr)


def test_freeze_order_does_not_matter_and_unknown_layers_are_refused():
    from jaxdl import train

    assert make_optimizer("sgd", freeze=("b", "a")) == make_optimizer("sgd", freeze=("a", "b"))
    ds = jaxdl.synthetic(32, num_features=4, num_classes=2)
    model = jaxdl.MLP(hidden=(4,), num_classes=2)
    for kw in ({"freeze": ("layer_9",)}, {"layer_lr": {"layr_0": 0.5}}):
        with pytest.raises(InputError, match="layer"):
            train.prepare(
                jaxdl.RunConfig.of(model, make_optimizer("sgd", **kw), epochs=1, batch_size=8), ds
            )


def test_values_that_need_a_pass_the_chain_lacks_are_refused():
    from jaxdl import train

    model = jaxdl.MLP(hidden=(4,), num_classes=2)
    plain = make_optimizer("sgd")
    with pytest.raises(InputError, match="weight_decay"):
        train.make_hparams(model, plain, (3,), weight_decay=0.1)
    with pytest.raises(InputError, match="clip_norm"):
        train.make_hparams(model, plain, (3,), clip_norm=1.0)
    hp = train.make_hparams(model, make_optimizer("sgd", weight_decay=1e-3), (3,), weight_decay=0.0)
    assert float(hp.opt["weight_decay"]) == 0.0  # a decay chain may sweep down to 0
