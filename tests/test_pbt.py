"""Population-based training: exploit copies state bit for bit, explore perturbs only the
copies, one compile for the run, lineage kept, and a population that beats the best
fixed learning rate on a task where the best rate changes as training goes on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl
from jaxdl import pbt, sweep
from jaxdl.validate import InputError

MODEL = jaxdl.MLP((32,), num_classes=3)
RATES = np.logspace(-3, 0.5, 8).tolist()


@pytest.fixture(scope="module")
def blobs4():
    return jaxdl.synthetic_splits(512, 512, 128, num_features=20, num_classes=3, seed=1,
                                  separation=4.0)  # fmt: skip


def _config(epochs=10):
    return jaxdl.RunConfig.of(MODEL, jaxdl.make_optimizer("sgd"), epochs=epochs, batch_size=4)


def test_exploit_copies_the_source_bit_for_bit_and_perturbs_only_the_copy(blobs4):
    res = sweep.run(_config(2), blobs4.train, sweep.grid(learning_rate=[0.01, 0.02, 0.03, 0.04]),
                    validation=blobs4.valid, verbose=False)  # fmt: skip
    _, hp, _, _ = sweep.prepare_sweep(_config(2), blobs4.train,
                                      sweep.grid(learning_rate=[0.01, 0.02, 0.03, 0.04]))  # fmt: skip
    scores = jnp.asarray([0.1, 0.9, 0.5, 0.3])
    new, hp2, source = pbt.exploit(res.states, hp, scores, jax.random.key(0),
                                   jnp.asarray([0.8, 1.25]), n=4, k=1,
                                   names=("learning_rate",))  # fmt: skip
    assert np.asarray(source).tolist() == [1, 1, 2, 3]  # the worst (0) copies the best (1)
    old, got = (
        jax.tree_util.tree_leaves(res.states.replace(key=None)),
        jax.tree_util.tree_leaves(new.replace(key=None)),
    )
    for a, b in zip(old, got, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.array_equal(b[0], a[1], equal_nan=True)  # member 0 is now member 1
        assert np.array_equal(b[1:], a[1:], equal_nan=True)  # the others unchanged
    keys = jax.random.key_data(new.key)
    assert np.array_equal(keys, jax.random.key_data(res.states.key))  # its own randomness
    lr = np.asarray(hp2.opt["learning_rate"])
    assert lr[0] in (pytest.approx(0.02 * 0.8), pytest.approx(0.02 * 1.25))
    np.testing.assert_allclose(lr[1:], [0.02, 0.03, 0.04], rtol=1e-6)


def test_pbt_beats_the_best_fixed_rate_in_one_compile(blobs4):
    configs = sweep.grid(learning_rate=RATES)
    run = dict(ready_every=2, validation=blobs4.valid, factors=(0.5, 2.0), metric="val_loss",
               verbose=False)  # fmt: skip
    before = pbt.exploit._cache_size()
    p = pbt.pbt(_config(), blobs4.train, configs, **run)
    assert p.search == "pbt" and p.compiles <= 1 and pbt.exploit._cache_size() - before <= 1
    again = pbt.pbt(_config(), blobs4.train, sweep.grid(learning_rate=[r * 1.1 for r in RATES]),
                    **run)  # fmt: skip
    assert again.compiles == 0 and pbt.exploit._cache_size() - before <= 1
    fixed = sweep.run(_config(), blobs4.train, configs, validation=blobs4.valid, verbose=False)
    best_fixed = np.nanmin(fixed.history["val_loss"][:, -1])
    assert np.nanmin(p.history["val_loss"][:, -1]) < best_fixed  # same members, same epochs
    lin = p.lineage
    assert lin["epochs"] == [2, 4, 6, 8] and lin["source"].shape == (8, 4)
    lr = lin["learning_rate"]
    assert lr.shape == (8, 10) and np.isfinite(lr).all()
    np.testing.assert_allclose(lr[:, 0], RATES, rtol=1e-6)  # each starts at its own rate
    copied = lin["source"][:, 0] != np.arange(8)
    assert copied.sum() == 2  # the bottom quarter
    for i in np.flatnonzero(copied):  # a copy's rate: its source's, perturbed
        ratio = lr[i, 2] / lr[lin["source"][i, 0], 1]
        assert ratio == pytest.approx(0.5) or ratio == pytest.approx(2.0)
    for row, rate in zip(p.rows, lr[:, -1], strict=True):
        assert row["learning_rate"] == pytest.approx(rate)


def test_pbt_refuses_what_it_cannot_do(blobs4):
    configs = sweep.grid(learning_rate=[0.01, 0.1])
    with pytest.raises(InputError, match="early_stopping: expected no patience with pbt"):
        pbt.pbt(_config().replace(early_stopping=jaxdl.EarlyStopping(patience=2)), blobs4.train, configs,
                ready_every=2, validation=blobs4.valid)  # fmt: skip
    with pytest.raises(InputError, match="explore: unknown value 'momentum'; expected one of"):
        pbt.pbt(_config(), blobs4.train, configs, ready_every=2, validation=blobs4.valid,
                explore=("momentum",))  # fmt: skip
    with pytest.raises(InputError, match="at least 2 members"):
        pbt.pbt(_config(), blobs4.train, [{}], ready_every=2, validation=blobs4.valid)


def test_cli_sweep_search_pbt_writes_the_lineage(tmp_path, blobs4, capsys):
    import json

    from jaxdl import cli

    data = tmp_path / "d.npz"
    jaxdl.data.save_file(data, blobs4)
    argv = ["sweep", "--data", data, "--hidden", "32", "--optimizer", "sgd", "--lr",
            "0.001,0.01,0.1,1", "--epochs", "4", "--batch-size", "32", "--search", "pbt",
            "--ready-every", "2", "--runs-dir", tmp_path, "--name", "p", "--no-progress",
            "--json"]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["search"] == "pbt" and summary["members"] == 4
    lineage = json.loads((tmp_path / "p" / "lineage.json").read_text())
    assert lineage["epochs"] == [2] and len(lineage["source"]) == 4
    assert len(lineage["learning_rate"][0]) == 4
    assert (tmp_path / "p" / "lineage.png").stat().st_size > 0
