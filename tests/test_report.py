"""Tests for jaxdl.report: atomic files, history, plots, run dirs, digest, progress."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl import report
from jaxdl.report import files as report_files
from jaxdl.report import plots
from jaxdl.validate import InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(n: int = 5, layers: int = 3) -> dict[str, list[float]]:
    rng = np.random.default_rng(0)
    epochs = np.arange(1, n + 1)
    h = {
        "train_loss": list(1.0 / epochs),
        "train_accuracy": list(1.0 - 0.5 / epochs),
        "val_loss": list(1.1 / epochs + 0.01 * epochs),
        "val_accuracy": list(0.95 - 0.4 / epochs),
        "learning_rate": [1e-3] * n,
    }
    for i in range(layers):
        h[f"grad_norm/layer_{i}"] = list(rng.uniform(0.01, 1.0, n) * 10.0**-i)
        h[f"dead_fraction/layer_{i}"] = list(rng.uniform(0, 0.3, n))
        h[f"act_std/layer_{i}"] = list(rng.uniform(0.5, 1.5, n))
        h[f"saturated_fraction/layer_{i}"] = list(rng.uniform(0, 0.1, n))
    return h


# --- atomic writes ------------------------------------------------------------


def test_atomic_writes_round_trip_and_leave_no_temp_files(tmp_path):
    obj = {"a": 1, "b": [1.5, "x"], "c": {"d": None}}
    report.write_json(tmp_path / "sub" / "o.json", obj)  # parent is created
    report.write_text(tmp_path / "t.txt", "héllo\n")
    report.write_csv(tmp_path / "r.csv", [{"x": 1, "y": 2.5}])
    assert json.loads((tmp_path / "sub" / "o.json").read_text()) == obj
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "r.csv").read_text() == "x,y\n1,2.5\n"
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert names == ["o.json", "r.csv", "sub", "t.txt"]
    # the mode a plain open() would give (not mkstemp's private 0600)
    plain = tmp_path / "plain"
    plain.write_text("")
    for name in ("sub/o.json", "t.txt", "r.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777, name


def test_crash_during_replace_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    report.write_json(path, {"old": True})

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        report.write_json(path, {"new": True})
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]  # temp file cleaned up


def test_crash_mid_write_keeps_the_complete_old_history(tmp_path, monkeypatch):
    """The process dies after part of the new bytes reached the temp file: history.json
    and history.csv still hold the complete previous history; no temp file is left."""
    old = {"train_loss": [0.5, 0.25], "val_accuracy": [0.9, 0.95]}
    report.save_history(tmp_path, old)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    written = []

    def dies_half_way(fd):
        written.append(os.fstat(fd).st_size)  # the new content is partly on disk here
        raise OSError("killed")

    monkeypatch.setattr(os, "fsync", dies_half_way)
    new = {k: [*v, 0.1] * 1000 for k, v in old.items()}
    with pytest.raises(OSError, match="killed"):
        report.save_history(tmp_path, new)
    assert written and written[0] > 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert json.loads((tmp_path / "history.json").read_text()) == old


def test_to_jsonable_numpy_jax_and_non_finite():
    obj = {
        "np_f": np.float32(0.5),
        "np_i": np.int64(3),
        "np_b": np.bool_(True),
        "arr": np.array([[1, 2], [3, 4]]),
        "jax": jnp.array([0.25, jnp.nan]),
        "jax0": jnp.asarray(2.0),
        "nan": float("nan"),
        "inf": [float("inf"), -np.inf],
        "tup": (1, np.float64(2.0)),
        7: "int key",
    }
    out = report.to_jsonable(obj)
    assert out == {
        "np_f": 0.5,
        "np_i": 3,
        "np_b": True,
        "arr": [[1, 2], [3, 4]],
        "jax": [0.25, None],
        "jax0": 2.0,
        "nan": None,
        "inf": [None, None],
        "tup": [1, 2.0],
        "7": "int key",
    }
    assert type(out["np_i"]) is int and type(out["np_f"]) is float
    json.dumps(out, allow_nan=False)  # strictly valid JSON


def test_write_json_non_finite_is_null(tmp_path):
    report.write_json(tmp_path / "r.json", {"loss": np.float32("nan")})
    assert (tmp_path / "r.json").read_text().strip() == '{\n  "loss": null\n}'


def test_write_csv_union_of_columns(tmp_path):
    rows = [{"b": 1, "a": np.float32(0.5)}, {"a": 2, "c": "z"}, {"d": jnp.asarray(3)}]
    report.write_csv(tmp_path / "u.csv", rows)
    with open(tmp_path / "u.csv", newline="") as f:
        got = list(csv.reader(f))
    assert got == [
        ["b", "a", "c", "d"],
        ["1", "0.5", "", ""],
        ["", "2", "z", ""],
        ["", "", "", "3"],
    ]


# --- history ------------------------------------------------------------------


def test_history_rows_and_save_history(tmp_path):
    h = {"train_loss": [0.5, 0.25, 0.125], "val_accuracy": np.array([0.8, 0.9, 0.95])}
    rows = report.history_rows(h)
    assert rows == [
        {"epoch": 1, "train_loss": 0.5, "val_accuracy": pytest.approx(0.8)},
        {"epoch": 2, "train_loss": 0.25, "val_accuracy": pytest.approx(0.9)},
        {"epoch": 3, "train_loss": 0.125, "val_accuracy": pytest.approx(0.95)},
    ]
    paths = report.save_history(tmp_path, h)
    assert [p.name for p in paths] == ["history.json", "history.csv"]
    assert json.loads((tmp_path / "history.json").read_text()) == {
        "train_loss": [0.5, 0.25, 0.125],
        "val_accuracy": [0.8, 0.9, 0.95],
    }
    with open(tmp_path / "history.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["epoch", "train_loss", "val_accuracy"]
    assert [r["epoch"] for r in table] == ["1", "2", "3"]
    assert [float(r["train_loss"]) for r in table] == [0.5, 0.25, 0.125]
    assert float(table[2]["val_accuracy"]) == pytest.approx(0.95)


def test_history_rows_empty():
    assert report.history_rows({}) == []
    assert report.history_rows({"train_loss": []}) == []


def test_history_mismatched_lengths_raise(tmp_path):
    with pytest.raises(ValueError, match="different lengths"):
        report.history_rows({"train_loss": [1.0, 2.0], "val_loss": [1.0]})
    with pytest.raises(ValueError):
        report.save_history(tmp_path, {"train_loss": [1.0, 2.0], "val_loss": [1.0]})
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# --- plots --------------------------------------------------------------------


def _assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes


def test_plot_curves_writes_png(tmp_path):
    paths = report.plot_curves(_history(12), tmp_path / "curves.png", best_epoch=7)
    assert paths == [tmp_path / "curves.png"]
    _assert_png(paths[0])


def test_plot_curves_loss_only_and_nothing(tmp_path):
    h = {"train_loss": [1.0, float("nan"), 0.5]}  # a diverged epoch must not break plotting
    _assert_png(report.plot_curves(h, tmp_path / "loss.png")[0])
    assert report.plot_curves({"learning_rate": [0.1]}, tmp_path / "none.png") == []
    assert not (tmp_path / "none.png").exists()


def test_plot_layer_stats_writes_png(tmp_path):
    h = _history(10, layers=12)
    h["grad_norm/layer_0"][3] = 0.0  # zero on a log axis is hidden, not an error
    paths = report.plot_layer_stats(h, tmp_path / "layers.png")
    assert paths == [tmp_path / "layers.png"]
    _assert_png(paths[0], min_bytes=20_000)


def test_plot_layer_stats_subset_and_nothing(tmp_path):
    h = {"dead_fraction/layer_0": [0.1, 0.2], "dead_fraction/layer_1": [0.0, 0.1]}
    _assert_png(report.plot_layer_stats(h, tmp_path / "dead.png")[0])
    assert report.plot_layer_stats({"train_loss": [1.0]}, tmp_path / "x.png") == []


def test_natural_sort_of_layers():
    keys = ["grad_norm/layer_10", "grad_norm/layer_2", "grad_norm/layer_1"]
    assert sorted(keys, key=plots.natural_key) == [
        "grad_norm/layer_1",
        "grad_norm/layer_2",
        "grad_norm/layer_10",
    ]


# --- run directories ----------------------------------------------------------


def test_make_run_dir_auto_name_and_suffix(tmp_path, monkeypatch):
    monkeypatch.setattr(report_files, "_timestamp", lambda: "20250101-120000")
    root = tmp_path / "a" / "runs"  # parents are created
    first = report.make_run_dir(root, None)
    second = report.make_run_dir(root, None)
    third = report.make_run_dir(root, None, prefix="sweep")
    fourth = report.make_run_dir(root, None)
    assert first == root / "train-20250101-120000" and first.is_dir()
    assert second.name == "train-20250101-120000-2"
    assert third.name == "sweep-20250101-120000"
    assert fourth.name == "train-20250101-120000-3"


def test_make_run_dir_real_timestamp_format(tmp_path):
    name = report.make_run_dir(tmp_path, None).name
    prefix, date, clock = name.split("-")[:3]
    assert prefix == "train" and len(date) == 8 and len(clock) == 6
    assert (date + clock).isdigit()


def test_make_run_dir_explicit_name(tmp_path):
    path = report.make_run_dir(tmp_path / "runs", "baseline")
    assert path == tmp_path / "runs" / "baseline" and path.is_dir()
    assert report.make_run_dir(tmp_path / "runs", "baseline") == path  # empty: fine to use
    (path / "history.json").write_text("{}")
    with pytest.raises(InputError, match="already exists.*--name"):
        report.make_run_dir(tmp_path / "runs", "baseline")
    assert (path / "history.json").read_text() == "{}"


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b"])
def test_make_run_dir_rejects_path_like_names(tmp_path, bad):
    with pytest.raises(InputError, match="--name"):
        report.make_run_dir(tmp_path, bad)


def test_make_run_dir_root_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("not a dir")
    with pytest.raises(InputError, match="is a file"):
        report.make_run_dir(tmp_path / "runs", "x")


# --- params digest ------------------------------------------------------------


def _params():
    rng = np.random.default_rng(1)
    return {
        "Dense_0": {
            "kernel": rng.normal(size=(4, 3)).astype(np.float32),
            "bias": np.zeros(3, np.float32),
        },
        "Dense_1": {
            "kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "bias": jnp.zeros(2),
        },
    }


def test_params_digest_deterministic_and_order_independent():
    p = _params()
    d = report.params_digest(p)
    assert len(d) == 64 and int(d, 16) >= 0
    assert report.params_digest(_params()) == d
    reordered = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(p.items()))}
    assert report.params_digest(reordered) == d
    big_endian = {**p, "Dense_0": {**p["Dense_0"], "bias": p["Dense_0"]["bias"].astype(">f4")}}
    assert report.params_digest(big_endian) == d  # byte order of the host array is irrelevant


def test_params_digest_sensitive_to_one_ulp_dtype_shape_and_name():
    p = _params()
    d = report.params_digest(p)
    k = np.array(p["Dense_0"]["kernel"])
    k[2, 1] = np.nextafter(k[2, 1], np.float32(np.inf))
    assert report.params_digest({**p, "Dense_0": {**p["Dense_0"], "kernel": k}}) != d
    b16 = {**p, "Dense_1": {**p["Dense_1"], "bias": jnp.zeros(2, jnp.bfloat16)}}
    f64 = {**p, "Dense_0": {**p["Dense_0"], "bias": np.zeros(3, np.float64)}}
    reshaped = {**p, "Dense_0": {**p["Dense_0"], "kernel": p["Dense_0"]["kernel"].reshape(3, 4)}}
    renamed = {"Dense_0": p["Dense_0"], "Dense_2": p["Dense_1"]}
    digests = {report.params_digest(x) for x in (b16, f64, reshaped, renamed)}
    assert len(digests) == 4 and d not in digests


# --- progress -----------------------------------------------------------------


def test_progress_plain_lines():
    out = io.StringIO()
    metrics = {"train_loss": 0.123456, "train_accuracy": 0.965, "val_loss": 0.2, "lr": 1.0}
    with report.Progress(20, stream=out) as p:
        p.update(1, metrics)
        p.update(3, {**metrics, "val_accuracy": 0.5})
        p.update(4, {})
        p.finish(stopped_early=True, best_epoch=2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith(
        "epoch 1/20  train_loss 0.1235  train_accuracy 0.9650  val_loss 0.2000  ("
    )
    assert "lr" not in lines[0]
    assert "val_accuracy 0.5000  (" in lines[1]
    assert lines[1].endswith("s)") and ", eta " in lines[1]
    assert lines[2].startswith("epoch 4/20  (")
    assert lines[3].startswith("stopped early after 4/20 epochs in ") and lines[3].endswith(
        "; best epoch 2"
    )


def test_progress_finish_without_early_stop():
    out = io.StringIO()
    with report.Progress(2, stream=out) as p:
        p.update(2, {"train_loss": 1.0})
        p.finish()
    assert out.getvalue().splitlines()[-1].startswith("done: 2/2 epochs in ")


def test_progress_disabled_prints_nothing():
    out = io.StringIO()
    with report.Progress(5, enabled=False, stream=out) as p:
        p.update(1, {"train_loss": 1.0})
        p.finish(stopped_early=True, best_epoch=1)
    assert out.getvalue() == ""


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("columns", [80, 140])
def test_progress_tty_uses_rich_bar_that_fits_the_terminal(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))  # rich sizes its console from it
    out = FakeTTY()
    metrics = {"train_loss": 0.5, "train_accuracy": 0.75, "val_loss": 0.25, "val_accuracy": 0.9}
    with report.Progress(20, stream=out) as p:
        for e in range(1, 21):
            p.update(e, {**metrics, "train_loss": 0.5 / e})
        p.finish(best_epoch=18)
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.getvalue())  # without the colour codes
    lines = [line.rstrip() for line in plain.replace("\r", "\n").splitlines() if line.strip()]
    assert "done: 20/20 epochs" in plain and "best epoch 18" in plain
    every = "loss 0.0250 acc 0.7500 val_loss 0.2500 val_acc 0.9000"
    # One line kept per finished epoch, then the bar: epoch count, time remaining, metrics.
    kept = [line for line in lines if re.fullmatch(r"epoch \d+/20  loss .*s", line)]
    assert [line.split()[1] for line in kept] == [f"{e}/20" for e in range(1, 21)]
    bar = [line for line in lines if line.startswith("epoch 20/20 ") and line not in kept][-1]
    assert bar.endswith(every) and re.search(r" \d+:\d\d:\d\d ", bar), bar
    assert all(len(line) <= columns and "…" not in line for line in lines), lines


# --- table --------------------------------------------------------------------


def test_format_table():
    rows = [
        {"name": "adam", "acc": 0.98123, "lr": 1e-5, "epochs": 20},
        {"name": "sgd-momentum", "acc": np.float32(0.5), "lr": 0.1, "epochs": 3, "extra": 1},
        {"name": "nan", "acc": math.nan},
    ]
    text = report.format_table(rows, ["name", "acc", "lr", "epochs"])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "acc", "lr", "epochs"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["adam", "0.9812", "1.000e-05", "20"]
    assert lines[3].split() == ["sgd-momentum", "0.5000", "0.1000", "3"]
    assert lines[4].split() == ["nan", "nan"]
    # Numbers are right-aligned: their last characters line up.
    ends = {lines[2].index("0.9812") + 6, lines[3].index("0.5000") + 6, lines[0].index("acc") + 3}
    assert len(ends) == 1
    assert report.format_table([], ["a", "bb"]).splitlines() == ["a  bb", "-  --"]


def test_no_tmp_files_left_after_plots(tmp_path):
    report.plot_curves(_history(3), tmp_path / "c.png")
    report.plot_layer_stats(_history(3), tmp_path / "l.png")
    assert sorted(os.listdir(tmp_path)) == ["c.png", "l.png"]


def _figures(monkeypatch) -> list:
    """The matplotlib figures the plot functions make, captured instead of written."""
    from jaxdl.report import plots

    made = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: made.append(fig) or Path(path))
    return made


def test_curves_show_the_learning_rate_a_log_loss_and_the_run(monkeypatch, tmp_path):
    made = _figures(monkeypatch)
    h = {"train_loss": [2.3, 0.5, 0.05], "val_loss": [2.0, 0.6, 0.2],
         "train_accuracy": [0.2, 0.8, 0.99], "learning_rate": [1e-3, 5e-4, 0.0]}  # fmt: skip
    report.plot_curves(h, tmp_path / "c.png", title="r1: mlp 500-500 relu, adam lr 0.001")
    (fig,) = made
    loss, acc, lr = fig.axes
    assert loss.get_yscale() == "log" and acc.get_yscale() == "linear"  # 2.3 → 0.05: decades
    assert lr.get_title() == "Learning rate per epoch"
    assert fig._suptitle.get_text() == "r1: mlp 500-500 relu, adam lr 0.001"
    report.plot_curves({"train_loss": [0.5, 0.4]}, tmp_path / "d.png")
    assert made[1].axes[0].get_yscale() == "linear" and made[1]._suptitle is None


def test_three_layer_panels_sit_in_one_row(monkeypatch, tmp_path):
    made = _figures(monkeypatch)
    h = {f"{s}/layer_0": [0.1, 0.2] for s in ("grad_norm", "dead_fraction", "act_std")}
    report.plot_layer_stats(h, tmp_path / "l.png")
    axes = [ax for ax in made[0].axes if ax.get_visible()]
    assert len(made[0].axes) == 3 and len(axes) == 3  # no empty fourth panel
    assert len({round(ax.get_position().y0, 3) for ax in axes}) == 1


def test_sweep_curves_say_which_member_is_which(monkeypatch, tmp_path):
    made = _figures(monkeypatch)
    rows = [{"learning_rate": lr, "seed": s, "best_val_accuracy": 0.5}
            for lr in (1e-3, 1e-2) for s in (0, 1)]  # fmt: skip
    hist = {"val_accuracy": np.linspace(0.1, 0.9, 8).reshape(4, 2)}
    report.plot_sweep(rows, ["learning_rate"], hist, tmp_path)
    labels = [t.get_text() for t in made[-1].axes[0].get_legend().get_texts()]
    assert labels == ["learning_rate=0.001, seed=0", "learning_rate=0.001, seed=1",
                      "learning_rate=0.01, seed=0", "learning_rate=0.01, seed=1"]  # fmt: skip
    many = [{"learning_rate": lr, "seed": s, "best_val_accuracy": 0.5}
            for lr in (1e-3, 1e-2, 1e-1) for s in range(5)]  # fmt: skip
    report.plot_sweep(many, ["learning_rate"], {"val_accuracy": np.ones((15, 2))}, tmp_path)
    labels = [t.get_text() for t in made[-1].axes[0].get_legend().get_texts()]
    assert labels == ["learning_rate=0.001", "learning_rate=0.01", "learning_rate=0.1"]


def test_sweep_axes_tick_at_the_swept_values_and_titles_fit(monkeypatch, tmp_path):
    made = _figures(monkeypatch)
    rows = [{"learning_rate": lr, "dropout_hidden": d, "best_val_accuracy": 0.5}
            for lr in (1e-3, 3e-3) for d in (0.0, 0.5)]  # fmt: skip
    title = "sweep-20261207-111347: mlp 500-500 relu, adam, a name long enough to wrap"
    report.plot_sweep(rows, ["learning_rate"], {"val_accuracy": np.ones((4, 2))}, tmp_path,
                      title=title)  # fmt: skip
    ax = made[-2].axes[0]
    assert ax.get_xscale() == "linear"  # 3x apart: not a decade
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.001", "0.003"]
    np.testing.assert_allclose(ax.get_xticks(), [1e-3, 3e-3])
    lines = made[-2]._suptitle.get_text().splitlines()
    assert len(lines) == 2 and max(map(len, lines)) <= 11 * 5.2  # one 5.2-inch panel
    many = [{"learning_rate": lr, "best_val_accuracy": 0.5} for lr in np.geomspace(1e-4, 1e-1, 12)]
    report.plot_sweep(many, ["learning_rate"], {"val_accuracy": np.ones((12, 2))}, tmp_path)
    assert made[-2].axes[0].get_xscale() == "log"  # many values: the log axis's own ticks


def test_the_sweep_line_counts_members_training_stopped_and_diverged():
    m = {"val_accuracy": np.array([0.9, np.nan, 0.7, np.nan, 0.8]),
         "diverged": np.array([False, True, False, False, False])}  # fmt: skip
    assert report.sweep_text(m) == "val_acc best 0.9000 med 0.8000; 3/5 on, 1 stopped, 1 diverged"
    m["diverged"][1] = False
    text = report.sweep_text(m)
    assert text == "val_acc best 0.9000 med 0.8000; 3/5 on, 2 stopped"
    assert len(f"epoch 12/20 ━━━━━ 0:01:02 {text}") <= 80  # the bar's line at 80 columns
    assert (
        report.sweep_text({"train_accuracy": np.array([np.nan])}) == "acc: none training, 1 stopped"
    )


def test_progress_shows_in_a_jupyter_kernel_not_where_ipykernel_is_only_imported(monkeypatch):
    import io
    import sys
    import types

    from jaxdl.report import progress

    plain = io.StringIO()  # not a terminal
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: None  # e.g. a test runner that executed notebooks
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert not progress.interactive(plain)
    shell = type("ZMQInteractiveShell", (), {})()
    fake.get_ipython = lambda: shell  # inside a running kernel
    assert progress.interactive(plain)
