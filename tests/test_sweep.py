"""Sweeps: one program for many members, equal to standalone runs, isolated failures."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl
from jaxdl import member_programs, report, sweep
from jaxdl.validate import InputError


def _close(a, b, **kw):
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6, **kw), a, b
    )


def _member(tree, i):
    return jax.tree_util.tree_map(lambda v: v[i], tree)


MODEL = jaxdl.MLP(hidden=(16,), num_classes=3)


def test_members_equal_standalone_fits_and_compile_once(blobs):
    opt = jaxdl.make_optimizer("momentum", learning_rate=0.05)
    configs = sweep.grid(learning_rate=[0.02, 0.1], dropout=[0.0, 0.3])
    res = sweep.sweep(
        MODEL,
        opt,
        blobs.train,
        configs,
        seeds=[3, 4],
        epochs=3,
        batch_size=50,
        validation=blobs.valid,
        l2=1e-4,
    )
    assert len(res.rows) == 8 and res.compiles == 1
    for i, row in enumerate(res.rows):
        o = jaxdl.make_optimizer("momentum", learning_rate=row["learning_rate"])
        state, hist = jaxdl.fit(
            MODEL,
            o,
            blobs.train,
            epochs=3,
            batch_size=50,
            validation=blobs.valid,
            key=row["seed"],
            dropout=row["dropout"],
            l2=1e-4,
        )
        _close(_member(res.states.params, i), state.params)
        np.testing.assert_allclose(res.history["val_loss"][i], hist["val_loss"], rtol=1e-4)
    # Seeds give different initialisations (and orders, and masks).
    assert report.params_digest(_member(res.states.params, 0)) != report.params_digest(
        _member(res.states.params, 1)
    )
    # New values, same structure: the same program.
    res2 = sweep.sweep(
        MODEL,
        opt,
        blobs.train,
        sweep.grid(learning_rate=[0.3, 0.5], dropout=[0.1, 0.2]),
        seeds=[3, 4],
        epochs=3,
        batch_size=50,
        validation=blobs.valid,
        l2=1e-3,
    )
    assert res2.compiles == 0


def test_members_in_blocks_equal_members_at_once_with_a_shorter_last_block(monkeypatch):
    class S(NamedTuple):
        epoch: jax.Array
        w: jax.Array

    def steps(st, hp):  # 3 steps; metrics (steps, members)
        def body(st, x):
            w = st.w * hp[:, None] + x
            return S(st.epoch + 1, w), w.sum(axis=1)

        return jax.lax.scan(body, st, jnp.arange(3.0))

    k = 7
    states = S(jnp.zeros(k, int), jnp.arange(k * 2.0).reshape(k, 2))
    hps = jnp.linspace(0.5, 1.5, k)
    whole = steps(states, hps)
    for b in (1, 3, 6):  # 7 blocks of 1; 2 of 3 and 1; 1 of 6 and 1
        got = member_programs._in_blocks(steps, states, hps, b)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, whole)
    # blocks of at most 3 members (bytes per member: w and epoch), equal where 3 or 2 divide
    monkeypatch.setattr(member_programs, "BLOCK_BYTES", 3 * (100 * 4 + 4))
    sizes = {n: member_programs.block_size(S(jnp.zeros(n), jnp.zeros((n, 100)))) for n in (4, 6, 7)}
    assert sizes == {4: 2, 6: 3, 7: 3}


@pytest.mark.parametrize("expected", ["shared_blocks", "shared_concat", "shared_batched", "serial"])
def test_members_sharing_a_seed_share_one_minibatch_and_equal_standalone_fits(
    blobs, monkeypatch, request, expected
):
    # MODEL's first layer has 16 units: one concatenated GEMM up to the threshold (on a
    # CPU in blocks of members); wider ones run in turn on a CPU, or batched elsewhere.
    concat = expected in ("shared_blocks", "shared_concat")
    monkeypatch.setattr(member_programs, "CONCAT_MAX_WIDTH", 16 if concat else 8)
    if expected in ("shared_concat", "shared_batched"):
        monkeypatch.setattr(member_programs, "SERIAL_PLATFORMS", ())
    opt = jaxdl.make_optimizer("adam")
    configs = sweep.grid(learning_rate=[3e-3, 3e-2], dropout=[0.0, 0.2])
    kw = dict(epochs=3, batch_size=48, validation=blobs.valid, l1=1e-4)  # 48: a partial batch
    config = jaxdl.RunConfig.of(MODEL, opt, epochs=3, batch_size=48, l1=1e-4)
    setup, hp, keys, _ = sweep.prepare_sweep(
        config, blobs.train, configs, seeds=[5], validation=blobs.valid
    )
    if expected == "shared_blocks":  # the 4 members as 2 blocks of 2
        states = jax.eval_shape(member_programs.programs(setup).init, keys, hp)
        leaves = jax.tree_util.tree_leaves(states)
        per_member = sum(v.size * v.dtype.itemsize for v in leaves) // 4
        monkeypatch.setattr(member_programs, "BLOCK_BYTES", 3 * per_member)
        assert member_programs.block_size(states) == 2  # 3 fit, 2 divide the 4
        member_programs._programs.cache_clear()  # may hold a trace with other blocks
        request.addfinalizer(member_programs._programs.cache_clear)
    form = member_programs.batch_form(setup, shared=True)
    assert form == expected
    assert member_programs.batch_form(setup, shared=True, platform="gpu") == (
        "shared_concat" if concat else "shared_batched"
    )
    assert member_programs.batch_form(setup, shared=True, one_seed=False) == (
        expected if concat else "shared_batched"
    )  # a shared order across seeds is not each member's own
    before = member_programs.programs(setup, None, form).traces["epoch"]
    res = sweep.sweep(MODEL, opt, blobs.train, configs, seeds=[5], **kw)
    assert member_programs.programs(setup, None, form).traces["epoch"] == before + res.compiles
    own = sweep.sweep(MODEL, opt, blobs.train, configs, seeds=[5], data_order="own", **kw)
    _close(res.states.params, own.states.params)
    for i, row in enumerate(res.rows):
        o = jaxdl.make_optimizer("adam", learning_rate=row["learning_rate"])
        state, hist = jaxdl.fit(MODEL, o, blobs.train, key=5, dropout=row["dropout"], **kw)
        _close(_member(res.states.params, i), state.params)
        np.testing.assert_allclose(res.history["val_loss"][i], hist["val_loss"], rtol=1e-4)
        np.testing.assert_allclose(res.history["train_loss"][i], hist["train_loss"], rtol=1e-4)


def test_shared_data_order_across_seeds_is_the_first_members(blobs):
    opt = jaxdl.make_optimizer("sgd", learning_rate=0.05)
    kw = dict(seeds=[1, 2], epochs=2, batch_size=50)
    shared = sweep.sweep(MODEL, opt, blobs.train, [{}], data_order="shared", **kw)
    own = sweep.sweep(MODEL, opt, blobs.train, [{}], **kw)  # auto: own orders (seeds differ)
    _close(_member(shared.states.params, 0), _member(own.states.params, 0))
    # Seed 2 keeps its initialisation but trains on seed 1's order: not its own fit.
    alone, _ = jaxdl.fit(MODEL, opt, blobs.train, key=2, epochs=2, batch_size=50)
    _close(_member(own.states.params, 1), alone.params)
    diff = np.abs(shared.states.params["layer_0"]["kernel"][1] - alone.params["layer_0"]["kernel"])
    assert diff.max() > 1e-3
    with pytest.raises(InputError, match="data_order"):
        sweep.sweep(MODEL, opt, blobs.train, [{}], data_order="mine", **kw)


def test_diverging_member_is_frozen_and_the_others_are_unaffected(blobs):
    opt = jaxdl.make_optimizer("sgd", learning_rate=0.1)
    kw = dict(seeds=1, epochs=3, batch_size=64, validation=blobs.valid)
    with_bad = sweep.sweep(
        MODEL, opt, blobs.train, [{"learning_rate": 0.1}, {"learning_rate": 1e6}], **kw
    )
    alone = sweep.sweep(MODEL, opt, blobs.train, [{"learning_rate": 0.1}], **kw)
    good, bad = with_bad.rows
    assert bad["diverged"] and not good["diverged"]
    assert bad["epochs_run"] < 3 and good["epochs_run"] == 3
    _close(_member(with_bad.states.params, 0), _member(alone.states.params, 0))
    bad_params = _member(with_bad.states.params, 1)
    assert all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(bad_params))
    assert np.isnan(with_bad.history["train_loss"][1, -1])
    assert with_bad.best()["learning_rate"] == 0.1


def test_per_member_early_stopping_freezes_finished_members(blobs):
    opt = jaxdl.make_optimizer("adam", learning_rate=1e-3)
    es = jaxdl.EarlyStopping(monitor="val_loss", patience=1)
    small = jaxdl.data.subset(blobs.train, 64)
    configs = [{"learning_rate": 0.3}, {"learning_rate": 1e-4}]  # overfits fast / barely moves
    res = sweep.sweep(
        MODEL,
        opt,
        small,
        configs,
        epochs=15,
        batch_size=16,
        validation=blobs.valid,
        early_stopping=es,
    )
    runs = [r["epochs_run"] for r in res.rows]
    assert runs[0] < runs[1], runs
    assert res.rows[0]["stopped"]
    # The stopped member equals its standalone fit, which breaks at the same epoch and
    # restores the same best epoch.
    state, hist = jaxdl.fit(
        MODEL,
        jaxdl.make_optimizer("adam", learning_rate=0.3),
        small,
        epochs=15,
        batch_size=16,
        validation=blobs.valid,
        early_stopping=es,
    )
    assert len(hist["val_loss"]) == runs[0]
    assert res.rows[0]["best_epoch"] == jaxdl.best_epoch(state)
    _close(_member(res.states.params, 0), state.params)
    assert np.isnan(res.history["val_loss"][0, runs[0] :]).all()


def test_weight_decay_sweep_switches_the_decay_pass_on(blobs):
    opt = jaxdl.make_optimizer("sgd", learning_rate=0.1)
    res = sweep.sweep(
        MODEL, opt, blobs.train, sweep.grid(weight_decay=[0.0, 0.5]), epochs=2, batch_size=64
    )
    norms = [float(np.linalg.norm(res.states.params["layer_0"]["kernel"][i])) for i in range(2)]
    assert norms[1] < norms[0]


def test_test_set_metrics_in_rows(blobs):
    res = sweep.sweep(
        MODEL,
        jaxdl.make_optimizer("adam", learning_rate=1e-2),
        blobs.train,
        [{}],
        seeds=2,
        epochs=2,
        batch_size=64,
        test=blobs.test,
    )
    for i, row in enumerate(res.rows):
        state = jaxdl.TrainState(
            **{
                f: _member(getattr(res.states, f), i)
                for f in (
                    "step",
                    "epoch",
                    "params",
                    "opt_state",
                    "batch_stats",
                    "key",
                    "rates",
                    "plateau",
                    "stopping",
                )
            }
        )
        assert row["test_accuracy"] == pytest.approx(
            jaxdl.evaluate(MODEL, state, blobs.test)["accuracy"], abs=1e-6
        )


def test_value_parsing_and_grids():
    assert sweep.parse_values("1e-4,3e-4") == [1e-4, 3e-4]
    np.testing.assert_allclose(sweep.parse_values("logspace:1e-4:1e-1:4"), [1e-4, 1e-3, 1e-2, 1e-1])
    np.testing.assert_allclose(sweep.parse_values("linspace:0:0.5:3"), [0.0, 0.25, 0.5])
    for bad in ("", "a,b", "logspace:0:1:3", "logspace:1e-4:1e-1", "linspace:0:1:0"):
        with pytest.raises(InputError):
            sweep.parse_values(bad, what="--lr")
    g = sweep.grid(learning_rate=[1, 2, 3], l2=[0, 1])
    assert len(g) == 6 and g[-1] == {"learning_rate": 3, "l2": 1}
    with pytest.raises(InputError):
        sweep.grid(learning_rate=[])
    r = sweep.random_configs(
        0, 200, learning_rate=(1e-4, 1e-1, "log"), dropout=(0.0, 0.5, "linear")
    )
    lrs = np.log10([c["learning_rate"] for c in r])
    assert lrs.min() >= -4 and lrs.max() <= -1 and abs(np.median(lrs) + 2.5) < 0.3  # log-uniform
    assert sweep.random_configs(0, 5, l2=(1e-5, 1e-2, "log")) == sweep.random_configs(
        0, 5, l2=(1e-5, 1e-2, "log")
    )


def test_unknown_sweep_setting_is_refused(blobs):
    with pytest.raises(InputError, match="did you mean 'learning_rate'"):
        sweep.sweep(
            MODEL, jaxdl.make_optimizer("sgd"), blobs.train, [{"learning_rat": 0.1}], epochs=1
        )
    with pytest.raises(InputError, match="momentum"):
        sweep.sweep(MODEL, jaxdl.make_optimizer("adam"), blobs.train, [{"momentum": 0.9}], epochs=1)


SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np, jaxdl
from jaxdl import member_programs, sweep
assert len(jax.devices()) == 8
s = jaxdl.synthetic_splits(256, 64, 64, num_features=20, num_classes=3, seed=0, separation=6.0)
m = jaxdl.MLP(hidden=(16,), num_classes=3)
opt = jaxdl.make_optimizer("adam", learning_rate=1e-2)
cfgs = sweep.grid(learning_rate=[1e-3, 1e-2, 3e-2, 1e30], dropout=[0.0, 0.2])[3:]
kw = dict(seeds=[0, 1, 2], epochs=3, batch_size=32, validation=s.valid)  # 15 members on 8 devices
multi = sweep.sweep(m, opt, s.train, cfgs, **kw)
single = sweep.sweep(m, opt, s.train, cfgs, devices=jax.devices()[:1], **kw)
assert len(multi.rows) == 15 and multi.compiles == 1
assert [r["diverged"] for r in multi.rows] == [r["diverged"] for r in single.rows]
assert sum(r["diverged"] for r in multi.rows) == 6
ok = np.array([not r["diverged"] for r in multi.rows])  # diverged ones hold chaotic values
for a, b in zip(jax.tree_util.tree_leaves(multi.states.params), jax.tree_util.tree_leaves(single.states.params)):
    np.testing.assert_allclose(a[ok], b[ok], rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(multi.history["val_loss"][ok], single.history["val_loss"][ok], rtol=1e-5)
assert multi.devices == 8 and single.devices == 1
# one seed: the shared data order (one minibatch for every member) sharded the same way
kw1 = dict(seeds=[0], epochs=2, batch_size=32, validation=s.valid)
cfgs1 = sweep.grid(learning_rate=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
multi = sweep.sweep(m, opt, s.train, cfgs1, **kw1)
single = sweep.sweep(m, opt, s.train, cfgs1, devices=jax.devices()[:1], **kw1)
assert multi.devices == 5  # no more devices than members
for a, b in zip(jax.tree_util.tree_leaves(multi.states.params), jax.tree_util.tree_leaves(single.states.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(multi.history["val_loss"], single.history["val_loss"], rtol=1e-5)
# a wider MLP: each device trains its members in turn (shard_map of a loop)
wide = jaxdl.MLP(hidden=(member_programs.CONCAT_MAX_WIDTH + 1,), num_classes=3)
for seeds in ([0], [0, 1]):
    config = jaxdl.RunConfig.of(wide, opt, epochs=2, batch_size=32)
    setup, *_ = sweep.prepare_sweep(config, s.train, cfgs1, seeds=seeds, validation=s.valid)
    assert member_programs.batch_form(setup, len(seeds) == 1, len(seeds) == 1) == "serial"
    # over devices, a shard_map of the loop: only where Shardy partitions (jax >= 0.7)
    vmapped = "shared_batched" if len(seeds) == 1 else "own"
    on_mesh = "serial" if member_programs.shardy_partitions() else vmapped
    assert member_programs.batch_form(setup, len(seeds) == 1, len(seeds) == 1, sharded=True) == on_mesh
    kw2 = dict(seeds=seeds, epochs=2, batch_size=32, validation=s.valid)
    multi = sweep.sweep(wide, opt, s.train, cfgs1, **kw2)
    single = sweep.sweep(wide, opt, s.train, cfgs1, devices=jax.devices()[:1], **kw2)
    assert multi.devices == (8 if len(seeds) == 2 else 5)
    for a, b in zip(jax.tree_util.tree_leaves(multi.states.params), jax.tree_util.tree_leaves(single.states.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(multi.history["val_loss"], single.history["val_loss"], rtol=1e-5)
print("OK")
"""


def test_member_axis_sharded_over_8_devices_equals_single_device():
    """Fake CPU devices must be configured before JAX starts: a fresh interpreter."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


def test_sweep_that_does_not_fit_runs_in_chunks_with_the_same_results(blobs):
    opt = jaxdl.make_optimizer("adam", learning_rate=1e-2)
    configs = [{"learning_rate": lr} for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)]
    kw = dict(seeds=1, epochs=2, batch_size=64, validation=blobs.valid)
    whole = sweep.sweep(MODEL, opt, blobs.train, configs, **kw)
    config = jaxdl.RunConfig.of(MODEL, opt, epochs=2, batch_size=64)
    setup, hp, _, _ = sweep.prepare_sweep(config, blobs.train, configs, validation=blobs.valid)
    per = member_programs.member_bytes(setup, hp)
    assert per > 4 * sum(v.size for v in jax.tree_util.tree_leaves(whole.states.params)) / 5
    with pytest.warns(UserWarning, match="3 chunks of 2 members"):
        chunked = sweep.sweep(MODEL, opt, blobs.train, configs, max_memory_bytes=2 * per + 1, **kw)
    assert chunked.chunks == 3 and whole.chunks == 1
    progs = member_programs.programs(
        setup, None, member_programs.batch_form(setup, shared=True)
    )  # one seed
    assert progs.traces["epoch"] == 2  # whole (5) and chunks (2): shapes differ
    _close(chunked.states.params, whole.states.params)
    np.testing.assert_allclose(chunked.history["val_loss"], whole.history["val_loss"], rtol=1e-5)
    assert [r["learning_rate"] for r in chunked.rows] == [c["learning_rate"] for c in configs]


def test_structures_are_swept_one_program_each(blobs):
    structures = {
        "relu-sgd": (jaxdl.MLP(hidden=(16,), num_classes=3), jaxdl.make_optimizer("momentum")),
        "tanh-adam": (
            jaxdl.MLP(hidden=(8, 8), num_classes=3, activation="tanh"),
            jaxdl.make_optimizer("adam"),
        ),
    }
    configs = sweep.grid(learning_rate=[1e-2, 1e-1], momentum=[0.5, 0.9])
    out = sweep.sweep_structures(
        structures, blobs.train, configs, epochs=2, batch_size=64, validation=blobs.valid
    )
    assert set(out) == set(structures)
    assert len(out["relu-sgd"].rows) == 4 and out["relu-sgd"].rows[0]["structure"] == "relu-sgd"
    # Adam takes no momentum: that axis is dropped and the duplicates run once.
    assert [r["learning_rate"] for r in out["tanh-adam"].rows] == [1e-2, 1e-1]
    assert all("momentum" not in r for r in out["tanh-adam"].rows)
    assert out["tanh-adam"].states.params["layer_1"]["kernel"].shape == (2, 8, 8)
    assert all(r.compiles <= 1 for r in out.values())


def test_a_sweep_shows_how_its_members_do_when_asked(blobs, capsys):
    configs = sweep.grid(learning_rate=[1e-3, 1e-1])
    kw = dict(epochs=2, batch_size=64, validation=blobs.valid)
    sweep.sweep(MODEL, jaxdl.make_optimizer("adam"), blobs.train, configs, verbose=True, **kw)
    err = capsys.readouterr().err
    assert "epoch 2/2  val_acc best" in err and "2/2 on" in err
    sweep.sweep(MODEL, jaxdl.make_optimizer("adam"), blobs.train, configs, **kw)
    assert capsys.readouterr().err == ""
