"""Training: values of single steps, whole epochs, fit, compile counts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdl
from jaxdl import compiled, losses, optim, report, step, train


def _mlp(**kw):
    return jaxdl.MLP(hidden=kw.pop("hidden", (32, 32)), num_classes=kw.pop("num_classes", 3), **kw)


def test_sgd_step_equals_hand_written_gradient_step(blobs):
    model = _mlp()
    opt = jaxdl.make_optimizer("sgd", learning_rate=0.1)
    setup, hp = train.prepare(jaxdl.RunConfig.of(model, opt, epochs=1, batch_size=32), blobs.train)
    state = step.init_state(setup, jax.random.key(0), hp)
    x, y = jnp.asarray(blobs.train.x[:32]), jnp.asarray(blobs.train.y[:32])

    def loss(p):
        return losses.cross_entropy(model.apply({"params": p}, x), y)

    expected = jax.tree_util.tree_map(
        lambda p, g: p - 0.1 * g, state.params, jax.grad(loss)(state.params)
    )
    new, metrics = step.train_step(setup, state, step.Batch(x, y), hp)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new.params, expected
    )
    np.testing.assert_allclose(metrics["loss"], loss(state.params), rtol=1e-6)
    assert int(new.step) == 1


def test_padded_batch_equals_batch_of_real_examples(blobs):
    """The weighted padding of a partial last batch changes nothing: same step as 7 real examples."""
    model = _mlp()
    opt = jaxdl.make_optimizer("adam", learning_rate=1e-2)
    setup, hp = train.prepare(jaxdl.RunConfig.of(model, opt, epochs=1, batch_size=16), blobs.train)
    state = step.init_state(setup, jax.random.key(1), hp)
    x, y = jnp.asarray(blobs.train.x[:16]), jnp.asarray(blobs.train.y[:16])
    w = (jnp.arange(16) < 7).astype(jnp.float32)
    x_pad = x.at[7:].set(1e3)  # garbage in the padding must not matter
    padded, m_pad = step.train_step(setup, state, step.Batch(x_pad, y, w), hp)
    real, m_real = step.train_step(setup, state, step.Batch(x[:7], y[:7]), hp)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        padded.params,
        real.params,
    )
    np.testing.assert_allclose(m_pad["loss"], m_real["loss"], rtol=1e-6)
    assert float(m_pad["weight"]) == 7.0


@pytest.mark.parametrize("n,batch", [(103, 10), (100, 10), (5, 5), (7, 3)])
def test_epoch_order_sees_every_example_once(blobs, n, batch):
    setup, _ = train.prepare(
        jaxdl.RunConfig.of(_mlp(), jaxdl.make_optimizer("sgd"), epochs=1, batch_size=batch),
        jaxdl.data.subset(blobs.train, n),
    )
    idx, w = step.epoch_order(setup, jax.random.key(0), jnp.int32(0))
    assert idx.shape == (-(-n // batch), batch)
    real = (
        np.asarray(idx).reshape(-1)[np.asarray(w).reshape(-1) > 0]
        if w is not None
        else np.asarray(idx).reshape(-1)
    )
    assert sorted(real.tolist()) == list(range(n))
    idx2, _ = step.epoch_order(setup, jax.random.key(0), jnp.int32(1))
    if n > 5:
        assert not np.array_equal(idx, idx2), "the order must be reshuffled every epoch"


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
    epoch=st.integers(0, 1000),
)
def test_epoch_order_property_every_example_exactly_once(n, data, seed, epoch):
    """Whatever N and batch size: each example once per epoch, padding (weight 0) only in
    the last batch, and a run's order is a function of (key, epoch) alone."""
    batch = data.draw(st.integers(1, n), label="batch")
    setup = step.Setup(_mlp(), jaxdl.make_optimizer("sgd"), (20,), n_train=n, batch_size=batch)
    key = jax.random.key(seed)
    idx, w = step.epoch_order(setup, key, jnp.int32(epoch))
    steps = -(-n // batch)
    assert idx.shape == (steps, batch)
    w = np.ones(idx.shape) if w is None else np.asarray(w)
    assert np.isin(w, (0.0, 1.0)).all() and w.sum() == n
    assert (w.reshape(-1)[:n] == 1).all(), "padding only after the n real slots"
    seen = np.bincount(np.asarray(idx).reshape(-1)[w.reshape(-1) > 0], minlength=n)
    assert (seen == 1).all()
    again, _ = step.epoch_order(setup, key, jnp.int32(epoch))
    np.testing.assert_array_equal(idx, again)


def test_second_fit_with_new_numbers_does_not_retrace(blobs):
    model = _mlp(hidden=(16,))
    kw = dict(epochs=3, batch_size=50, validation=blobs.valid, dropout=[0.1, 0.2], l2=1e-4)
    info1, info2 = jaxdl.FitInfo(), jaxdl.FitInfo()
    s1, h1 = jaxdl.fit(
        model,
        jaxdl.make_optimizer("momentum", learning_rate=0.05),
        blobs.train,
        key=0,
        info=info1,
        **kw,
    )
    kw.update(dropout=[0.3, 0.5], l2=1e-2)
    s2, h2 = jaxdl.fit(
        model,
        jaxdl.make_optimizer("momentum", learning_rate=0.01, momentum=0.5),
        blobs.train,
        key=1,
        info=info2,
        **kw,
    )
    kw.pop("validation")
    config = jaxdl.RunConfig.of(model, jaxdl.make_optimizer("momentum"), **kw)
    setup, _ = train.prepare(config, blobs.train, blobs.valid)
    progs = compiled.programs(setup)
    assert progs.traces == {"init": 1, "epoch": 1}
    assert len(progs.executables) == 1 and info2.compile_seconds == 0.0
    assert h1["learning_rate"][0] == pytest.approx(0.05) and h2["learning_rate"][
        0
    ] == pytest.approx(0.01)
    assert h1["val_loss"] != h2["val_loss"]


def test_programs_are_keyed_on_structure_not_on_an_optimizers_numbers(blobs):
    model = _mlp(hidden=(16,))
    kw = dict(epochs=2, batch_size=50)

    def setup(opt):
        return train.prepare(jaxdl.RunConfig.of(model, opt, **kw), blobs.train)[0]

    adam = setup(jaxdl.make_optimizer("adam", learning_rate=1e-3))
    other_numbers = setup(jaxdl.make_optimizer("adam", learning_rate=3e-2, b1=0.8, eps=1e-6))
    assert compiled.programs(adam) is compiled.programs(other_numbers)
    # The key holds the family's defaults, not the first caller's numbers.
    key = compiled.program_key(other_numbers)
    assert dict(key.optimizer.hyperparams) == optim.defaults("adam")
    assert key == adam and key.optimizer.tx is not other_numbers.optimizer.tx
    # Structure decides the program: another family, clipping, a frozen layer, a schedule.
    for opt in (
        jaxdl.make_optimizer("momentum"),
        jaxdl.make_optimizer("adam", clip_norm=1.0),
        jaxdl.make_optimizer("adam", freeze=["layer_0"]),
        jaxdl.make_optimizer("adam", schedule="warmup_cosine"),
    ):
        assert compiled.programs(setup(opt)) is not compiled.programs(adam), opt
    # Two runs differing only in numbers: one trace, and each run's own numbers used.
    progs = compiled.programs(adam)
    _, h1 = jaxdl.fit(model, jaxdl.make_optimizer("adam", learning_rate=1e-3), blobs.train, **kw)
    _, h2 = jaxdl.fit(model, jaxdl.make_optimizer("adam", learning_rate=3e-2), blobs.train, **kw)
    assert progs.traces == {"init": 1, "epoch": 1}
    assert h1["learning_rate"][0] == pytest.approx(1e-3)
    assert h2["learning_rate"][0] == pytest.approx(3e-2)
    assert h1["train_loss"] != h2["train_loss"]


def test_fit_learns_and_history_has_per_layer_statistics(blobs):
    model = _mlp(hidden=(32, 16))
    state, hist = jaxdl.fit(
        model,
        jaxdl.make_optimizer("adam", learning_rate=1e-2),
        blobs.train,
        epochs=5,
        batch_size=64,
        validation=blobs.valid,
    )
    assert hist["val_accuracy"][-1] > 0.95
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    for layer in ("layer_0", "layer_1", "output"):
        assert all(g > 0 for g in hist[f"grad_norm/{layer}"])
    for layer in ("layer_0", "layer_1"):
        assert all(0 <= d <= 1 for d in hist[f"dead_fraction/{layer}"])
        assert all(s > 0 for s in hist[f"act_std/{layer}"])
    assert set(map(len, hist.values())) == {5}
    assert jaxdl.evaluate(model, state, blobs.valid)["accuracy"] == pytest.approx(
        hist["val_accuracy"][-1], abs=1e-6
    )


def test_sanity_check_100_images_reach_100_percent_training_accuracy(random_images):
    """The course's check: without regularisation a big enough net memorises 100 images."""
    model = jaxdl.MLP(hidden=(500, 500))
    state, hist = jaxdl.fit(
        model,
        jaxdl.make_optimizer("adam", learning_rate=1e-3),
        random_images,
        epochs=60,
        batch_size=20,
    )
    assert jaxdl.evaluate(model, state, random_images)["accuracy"] == 1.0
    # Strong L2 is what prevents it.
    state, _ = jaxdl.fit(
        model,
        jaxdl.make_optimizer("adam", learning_rate=1e-3),
        random_images,
        epochs=60,
        batch_size=20,
        l2=0.1,
    )
    assert jaxdl.evaluate(model, state, random_images)["accuracy"] < 0.5


def test_same_seed_same_digest_different_seed_differs(blobs):
    model = _mlp(hidden=(16,))
    opt = jaxdl.make_optimizer("sgd", learning_rate=0.1)
    kw = dict(epochs=2, batch_size=50, dropout=0.2, input_noise=0.1)
    a, ha = jaxdl.fit(model, opt, blobs.train, key=3, **kw)
    b, hb = jaxdl.fit(model, opt, blobs.train, key=3, **kw)
    c, _ = jaxdl.fit(model, opt, blobs.train, key=4, **kw)
    assert report.params_digest(a.params) == report.params_digest(b.params)
    assert ha == hb
    assert report.params_digest(a.params) != report.params_digest(c.params)


def test_step_schedule_halves_learning_rate_in_history(blobs):
    opt = jaxdl.make_optimizer(
        "sgd", learning_rate=0.1, schedule="step", lr_decay=0.5, lr_decay_every=2
    )
    _, hist = jaxdl.fit(_mlp(hidden=(8,)), opt, blobs.train, epochs=6, batch_size=128)
    # The value logged is the one used by the epoch's last step.
    np.testing.assert_allclose(
        hist["learning_rate"], [0.1, 0.1, 0.05, 0.05, 0.025, 0.025], rtol=1e-6
    )


def test_plateau_schedule_halves_when_validation_stalls(blobs):
    # lr far too small to move: the validation loss stalls, so the rate is halved.
    opt = jaxdl.make_optimizer(
        "sgd", learning_rate=1e-9, schedule="plateau", lr_patience=1, lr_decay=0.5
    )
    _, hist = jaxdl.fit(
        _mlp(hidden=(8,)), opt, blobs.train, epochs=4, batch_size=128, validation=blobs.valid
    )
    lrs = np.asarray(hist["learning_rate"]) / 1e-9
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] < 1.0


def test_batch_norm_updates_running_statistics_and_trains(blobs):
    model = _mlp(hidden=(16,), batch_norm=True)
    state, hist = jaxdl.fit(
        model,
        jaxdl.make_optimizer("sgd", learning_rate=0.1),
        blobs.train,
        epochs=3,
        batch_size=60,
        validation=blobs.valid,
    )
    mean = state.batch_stats["bn_0"]["mean"]
    assert float(jnp.abs(mean).sum()) > 0  # moved away from the zero initialisation
    assert hist["val_accuracy"][-1] > 0.9


def test_saturation_statistic_sees_large_init_sigmoid(blobs):
    def saturated(scale):
        model = _mlp(hidden=(64,), activation="sigmoid", weight_init="normal")
        _, h = jaxdl.fit(
            model,
            jaxdl.make_optimizer("sgd", learning_rate=1e-6),
            blobs.train,
            epochs=1,
            batch_size=128,
            init_scale=scale,
        )
        return h["saturated_fraction/layer_0"][0]

    assert saturated(5.0) > 0.5 > 0.01 > saturated(0.01)


def test_cnn_trains_on_small_images():
    ds = jaxdl.synthetic(256, num_features=784, num_classes=4, seed=1)
    model = jaxdl.CNN(features=(4, 8), kernel_size=3, dense=(16,), num_classes=4)
    state, hist = jaxdl.fit(
        model,
        jaxdl.make_optimizer("adam", learning_rate=3e-3),
        ds,
        epochs=3,
        batch_size=64,
        dropout=0.1,
    )
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert jaxdl.predict(model, state, ds.x[:5]).shape == (5, 4)


def test_frozen_layer_keeps_initial_weights(blobs):
    model = _mlp(hidden=(16,))
    opt = jaxdl.make_optimizer("adam", learning_rate=1e-2, freeze=["layer_0"])
    setup, hp = train.prepare(jaxdl.RunConfig.of(model, opt, epochs=2, batch_size=64), blobs.train)
    start = step.init_state(setup, jax.random.key(0), hp)
    state, _ = jaxdl.fit(model, opt, blobs.train, epochs=2, batch_size=64, key=0)
    np.testing.assert_array_equal(
        state.params["layer_0"]["kernel"], start.params["layer_0"]["kernel"]
    )
    assert not np.array_equal(state.params["output"]["kernel"], start.params["output"]["kernel"])


def test_classic_and_inverted_dropout_train_to_similar_accuracy(blobs):
    accs = {}
    for conv in ("classic", "inverted"):
        model = _mlp(hidden=(64,), dropout_convention=conv)
        state, _ = jaxdl.fit(
            model,
            jaxdl.make_optimizer("adam", learning_rate=1e-2),
            blobs.train,
            epochs=4,
            batch_size=64,
            dropout=[0.2, 0.5],
        )
        assert state.rates is not None
        accs[conv] = jaxdl.evaluate(model, state, blobs.test)["accuracy"]
    assert min(accs.values()) > 0.9


def test_hparams_are_vmappable_members_equal_standalone_runs(blobs):
    """The design's promise: init and epochs vmap over (key, hparams)."""
    model = _mlp(hidden=(16,))
    opt = jaxdl.make_optimizer("sgd", learning_rate=0.1)
    setup, hp = train.prepare(
        jaxdl.RunConfig.of(model, opt, epochs=2, batch_size=64, dropout=0.1), blobs.train
    )
    lrs = jnp.array([0.05, 0.2], jnp.float32)
    hps = jax.tree_util.tree_map(lambda v: jnp.stack([v, v]), hp)
    hps = hps._replace(opt={**hps.opt, "learning_rate": lrs})
    keys = jax.random.split(jax.random.key(0), 2)
    states = jax.vmap(lambda k, h: step.init_state(setup, k, h))(keys, hps)
    data = train.to_device(blobs.train)
    states, _ = jax.vmap(lambda s, h: step.run_epoch(setup, s, data, None, h))(states, hps)
    for i in range(2):
        hp_i = hp._replace(opt={**hp.opt, "learning_rate": lrs[i]})
        single = step.init_state(setup, keys[i], hp_i)
        single, _ = step.run_epoch(setup, single, data, None, hp_i)
        jax.tree_util.tree_map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6),
            states.params,
            single.params,
        )


def test_gradient_clipping_bounds_the_update(blobs):
    opt = jaxdl.make_optimizer("sgd", learning_rate=1.0, clip_norm=1e-3)
    model = _mlp(hidden=(8,))
    setup, hp = train.prepare(jaxdl.RunConfig.of(model, opt, epochs=1, batch_size=64), blobs.train)
    state = step.init_state(setup, jax.random.key(0), hp)
    batch = step.Batch(jnp.asarray(blobs.train.x[:64]), jnp.asarray(blobs.train.y[:64]))
    new, _ = step.train_step(setup, state, batch, hp)
    delta = jax.tree_util.tree_map(lambda a, b: a - b, new.params, state.params)
    assert float(optax.tree.norm(delta)) == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.e2e
def test_sanity_check_on_100_real_mnist_images():
    try:
        splits = jaxdl.load("mnist")
    except jaxdl.data.DownloadError as e:
        pytest.skip(f"MNIST could not be fetched: {e}")
    small = jaxdl.data.subset(splits.train, 100)
    model = jaxdl.MLP(hidden=(500, 500))
    state, hist = jaxdl.fit(
        model, jaxdl.make_optimizer("adam", learning_rate=1e-3), small, epochs=30, batch_size=20
    )
    assert jaxdl.evaluate(model, state, small)["accuracy"] == 1.0
    assert hist["train_loss"][-1] < 0.01


def test_fit_shows_progress_when_asked_and_is_quiet_otherwise(blobs, capsys):
    model, opt = _mlp(hidden=(8,)), jaxdl.make_optimizer("adam")
    kw = dict(epochs=2, batch_size=64, validation=blobs.valid)
    jaxdl.fit(model, opt, blobs.train, verbose=True, **kw)
    err = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[0] for line in err[:2]] == ["epoch 1/2", "epoch 2/2"]
    assert "val_accuracy" in err[0] and err[-1].startswith("done: 2/2 epochs in")
    jaxdl.fit(model, opt, blobs.train, **kw)  # default: only on a terminal or in Jupyter
    jaxdl.fit(model, opt, blobs.train, verbose=False, **kw)
    assert capsys.readouterr().err == ""


def test_ticks_report_inside_an_epoch_and_change_nothing(blobs):
    """``Setup.ticks``: the compiled epoch tells the host how far it is, every few steps
    (``jaxdl.ticks``), without changing a bit of what it computes or the run's identity."""
    from jaxdl import ticks

    model = _mlp(hidden=(16,))
    config = jaxdl.RunConfig.of(model, jaxdl.make_optimizer("adam"), epochs=2, batch_size=32)
    plain, hp = train.prepare(config, blobs.train, blobs.valid)
    ticking = dataclasses.replace(plain, ticks=4)
    heard, digests = [], {}
    for s in (plain, ticking):
        state = compiled.programs(s).init(jax.random.key(0), hp)
        with ticks.listen(lambda done, total: heard.append((done, total))):
            state, _ = train.fit_state(s, state, hp, blobs.train, blobs.valid)
        digests[s.ticks] = jaxdl.params_digest(state.params)
    steps = plain.steps_per_epoch  # 16: ticks after steps 4, 8 and 12 (16 ends the epoch)
    assert heard == [(4, steps), (8, steps), (12, steps)] * 2
    assert digests[0] == digests[4] and repr(plain) == repr(ticking)


def test_a_live_bar_moves_within_an_epoch():
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    with report.Progress(3, stream=Terminal()) as p:
        assert p.ticks == report.progress.TICKS
        p.update(1, {"train_loss": 0.5})
        p.tick(10, 20)
        assert p._bar.tasks[0].completed == 1.5 and p._bar.tasks[0].fields["epoch"] == 2
    assert report.Progress(3, stream=io.StringIO()).ticks == 0  # no bar: no ticks
