"""Successive halving: the plan, survivors equal to their grid runs, compaction (compile
counts, member-epochs), early-stopped members dropped, and ``jaxdl sweep --search``."""

from __future__ import annotations

import csv
import json

import jax
import numpy as np
import pytest

import jaxdl
from jaxdl import search, sweep
from jaxdl.validate import InputError

MODEL = jaxdl.MLP((16,), num_classes=3)
RATES = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]


@pytest.fixture(scope="module")
def hard():
    """3 overlapping classes: the learning rates sort out over epochs."""
    return jaxdl.synthetic_splits(512, 128, 128, num_features=20, num_classes=3, seed=0,
                                  separation=3.0)  # fmt: skip


def test_the_plan_of_rungs():
    assert search.rungs(81, 3, 1, 27) == [(81, 1), (27, 3), (9, 9), (3, 27)]
    assert search.rungs(9, 3, 1, 9) == [(9, 1), (3, 3), (1, 9)]
    assert search.rungs(10, 2, 2, 5) == [(10, 2), (5, 4), (2, 5)]
    assert search.rungs(4, 3, 5, 5) == [(4, 5)]  # min_epochs = epochs: a grid
    with pytest.raises(InputError, match="eta: expected an integer >= 2"):
        search.rungs(9, 1, 1, 9)
    with pytest.raises(InputError, match="min_epochs: expected at most the 9 epochs"):
        search.rungs(9, 3, 10, 9)


def test_halving_keeps_the_best_and_its_survivors_equal_their_grid_runs(hard):
    config = jaxdl.RunConfig.of(MODEL, jaxdl.make_optimizer("sgd"), epochs=9, batch_size=64)
    configs = sweep.grid(learning_rate=RATES)
    h = search.halving(config, hard.train, configs, eta=3, min_epochs=1, validation=hard.valid,
                       test=hard.test, verbose=False)  # fmt: skip
    g = sweep.run(config, hard.train, configs, validation=hard.valid, test=hard.test,
                  verbose=False)  # fmt: skip
    assert h.search == "halving" and h.compiles == 3  # one program per rung size: 9, 3, 1
    rungs = np.array([r["rung"] for r in h.rows])
    assert sorted(np.bincount(rungs)) == [1, 2, 6]
    runs = np.array([r["epochs_run"] for r in h.rows])
    assert h.model_epochs == runs.sum() == 9 * 1 + 3 * 2 + 1 * 6
    first = h.history["val_accuracy"][:, 0]
    kept = np.flatnonzero(rungs >= 1)  # the 3 best after epoch 1 went on
    assert set(kept) == set(np.argsort(-first, kind="stable")[:3])
    assert np.isnan(h.history["val_accuracy"][rungs == 0, 1:]).all()
    for i in np.flatnonzero(rungs == 2):  # the finalist: the same run as in the grid
        for a, b in zip(jax.tree_util.tree_leaves(h.states.params),
                        jax.tree_util.tree_leaves(g.states.params), strict=True):  # fmt: skip
            np.testing.assert_allclose(a[i], b[i], rtol=1e-5, atol=1e-6)
        assert h.rows[i]["test_accuracy"] == pytest.approx(g.rows[i]["test_accuracy"], abs=1e-6)
    for i in np.flatnonzero(rungs == 0):  # a member dropped after epoch 1 keeps that state
        assert int(h.states.epoch[i]) == 1
    again = search.halving(config, hard.train, sweep.grid(learning_rate=[r * 1.1 for r in RATES]),
                           eta=3, min_epochs=1, validation=hard.valid, verbose=False)  # fmt: skip
    assert again.compiles == 0  # new values, the same three programs


def test_members_stopped_early_are_compacted_away_at_the_next_rung(hard):
    es = jaxdl.EarlyStopping("val_loss", patience=1, min_delta=0.5)  # stops after 2 epochs
    config = jaxdl.RunConfig.of(MODEL, jaxdl.make_optimizer("sgd"), epochs=8, batch_size=64,
                                early_stopping=es)  # fmt: skip
    h = sweep.sweep(MODEL, jaxdl.make_optimizer("sgd"), hard.train, sweep.grid(learning_rate=RATES[:4]),
                    epochs=8, batch_size=64, early_stopping=es, validation=hard.valid,
                    search="halving", eta=2, min_epochs=4, verbose=False)  # fmt: skip
    assert config.training.epochs == 8
    runs = [r["epochs_run"] for r in h.rows]
    assert all(r["stopped"] for r in h.rows) and max(runs) == 2
    assert all(r["rung"] == 0 for r in h.rows)  # none went on: all had stopped by epoch 4
    assert h.model_epochs == sum(runs)


def test_sweep_refuses_what_halving_cannot_do(hard):
    with pytest.raises(InputError, match="search: expected grid for checkpointer"):
        sweep.sweep(MODEL, jaxdl.make_optimizer("sgd"), hard.train, [{}], epochs=2,
                    validation=hard.valid, search="halving", checkpointer=object())  # fmt: skip
    with pytest.raises(InputError, match="validation: expected validation data"):
        sweep.sweep(MODEL, jaxdl.make_optimizer("sgd"), hard.train, [{}], epochs=2,
                    search="halving")  # fmt: skip


def test_cli_sweep_search_halving(tmp_path, hard, run_cli):
    data = tmp_path / "d.npz"
    jaxdl.data.save_file(data, hard)
    common = ["sweep", "--data", data, "--hidden", "16", "--optimizer", "sgd", "--lr",
              ",".join(map(str, RATES)), "--epochs", "9", "--batch-size", "64", "--runs-dir",
              tmp_path, "--no-progress", "--no-plots"]  # fmt: skip
    code, out, err = run_cli(*common, "--search", "halving", "--name", "h", "--json")
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["search"] == "halving" and summary["model_epochs"] == 21
    assert summary["members"] == 9 and summary["compiles"] <= 3
    with (tmp_path / "h" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["rung"]) for r in rows) == [0] * 6 + [1] * 2 + [2]
    code, out, err = run_cli(*common, "--search", "halving", "--name", "h2", "--dropout-hidden",
                             "0.1,0.2")  # fmt: skip
    assert code == 0 and "rung" in out, err
    table = out[: out.index("members (halving")]
    assert max(map(len, table.splitlines())) <= 80  # the table of best members fits
    code, out, err = run_cli(*common, "--name", "g", "--json")
    grid = json.loads(out.splitlines()[-1])
    assert grid["search"] == "grid" and grid["model_epochs"] == 81
    code, _, err = run_cli(*common, "--search", "halving", "--eta", "1", "--name", "x")
    assert code == 2 and "jaxdl sweep: error: --eta: expected an integer >= 2" in err
    code, _, err = run_cli("sweep", "--resume", tmp_path / "h", "--search", "halving")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_halving_and_pbt_over_two_devices(tmp_path, hard):
    """The members split over 2 CPU devices (a fresh process: JAX's device count is
    fixed when it starts): a compacted or copied population is placed back on them."""
    import subprocess
    import sys

    data = tmp_path / "d.npz"
    jaxdl.data.save_file(data, hard)
    common = [sys.executable, "-m", "jaxdl.cli", "sweep", "--data", str(data), "--hidden", "8",
              "--optimizer", "sgd", "--lr", "0.01,0.03,0.1,0.3,1", "--epochs", "4",
              "--batch-size", "64", "--cpu-devices", "2", "--runs-dir", str(tmp_path),
              "--no-progress", "--no-plots", "--json"]  # fmt: skip
    for search_flags in (["--search", "halving", "--eta", "2"], ["--search", "pbt"]):
        out = subprocess.run([*common, *search_flags], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        summary = json.loads(out.stdout.splitlines()[-1])
        assert summary["devices"] == 2 and summary["search"] == search_flags[1]
