"""The command line end to end on tiny data, and its contract (exit codes, --json)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxdl
from jaxdl import cli
from jaxdl.config import saved_flags


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    """A 4-class image-shaped data set (784 features) written as the CLI's .npz format."""
    s = jaxdl.synthetic_splits(200, 60, 60, num_features=784, num_classes=4, seed=2, separation=8.0)
    return jaxdl.data.save_file(tmp_path_factory.mktemp("data") / "tiny.npz", s)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_end_to_end_writes_run_dir_and_json(tmp_path, tiny_npz, capsys):
    code, out, err = _run(
        capsys, "train", "--data", str(tiny_npz), "--hidden", "32", "--epochs", "4", "--batch-size", "50",
        "--runs-dir", str(tmp_path), "--name", "r1", "--json", "--no-progress", "--early-stopping", "3",
        "--lr", "3e-3",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    for key in ("test_accuracy", "test_loss", "best_epoch", "epochs_run", "samples_per_second",
                "compile_seconds", "params_digest", "run_dir"):  # fmt: skip
        assert key in res
    assert 0.9 <= res["test_accuracy"] <= 1.0
    assert 1 <= res["best_epoch"] <= res["epochs_run"] <= 4
    assert len(res["params_digest"]) == 64
    run = Path(res["run_dir"])
    assert run == tmp_path / "r1"
    for f in (
        "config.json",
        "history.json",
        "history.csv",
        "results.json",
        "curves.png",
        "layers.png",
    ):
        assert (run / f).stat().st_size > 0, f
    config = saved_flags(json.loads((run / "config.json").read_text()))
    assert config["hidden"] == [32] and config["epochs"] == 4 and config["seed"] == 0
    hist = json.loads((run / "history.json").read_text())
    assert len(hist["train_loss"]) == res["epochs_run"]
    assert json.loads((run / "results.json").read_text())["params_digest"] == res["params_digest"]


def test_same_flags_same_digest_and_existing_name_refused(tmp_path, tiny_npz, capsys):
    args = ["train", "--data", str(tiny_npz), "--hidden", "16", "--epochs", "2", "--batch-size", "40",
            "--runs-dir", str(tmp_path), "--json", "--no-progress", "--no-plots", "--dropout-hidden", "0.3"]  # fmt: skip
    digests = []
    for name in ("a", "b"):
        code, out, _ = _run(capsys, *args, "--name", name)
        assert code == 0
        digests.append(json.loads(out.splitlines()[-1])["params_digest"])
    assert digests[0] == digests[1]
    before = (tmp_path / "a" / "results.json").read_text()
    code, out, err = _run(capsys, *args, "--name", "a")
    assert code == 2 and "exists" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "a" / "results.json").read_text() == before  # nothing overwritten


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--hidden", "0"], "--hidden"),
        (["--hidden", "a,b"], "--hidden"),
        (["--activation", "relux"], "relu"),
        (["--optimizer", "adma"], "adam"),
        (["--init", "hee_normal"], "he_normal"),
        (["--lr", "-1"], "--lr: expected a finite number > 0, got -1.0"),
        (["--lr", "abc"], "--lr"),
        (["--dropout-hidden", "1.0"], "dropout"),
        (["--dropout-input", "-0.1"], "dropout"),
        (["--batch-size", "100000"], "batch_size"),
        (["--epochs", "0"], "epochs"),
        (["--momentum", "0.9"], "momentum"),  # adam takes no momentum
        (["--schedule", "linear"], "--schedule"),
        (["--data", "missing.npz"], "missing.npz"),
        (["--l2", "-1"], "l2"),
        (["--early-stopping", "-2"], "--early-stopping"),
        (["--layer-lr", "output:3"], "--layer-lr"),
        (["--layer-lr", "outptu=3"], "did you mean 'output'"),
        (["--freeze", "layer_7"], "freeze layer"),
        (["--checkpoint-every", "-1"], "--checkpoint-every"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints"),
        (["--data", "."], "data set"),
        (["--resume", "nowhere"], "--resume"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flags, expect, tmp_path, tiny_npz, capsys):
    _assert_one_line_error(capsys, "train", tmp_path, tiny_npz, flags, expect)


def _assert_one_line_error(capsys, command, tmp_path, tiny_npz, flags, expect):
    """Exit 2, one line naming the problem, no traceback, no run directory left."""
    argv = [
        command,
        "--data",
        str(tiny_npz),
        "--epochs",
        "1",
        "--runs-dir",
        str(tmp_path),
        "--no-progress",
    ]
    code, _, err = _run_exit(capsys, [*argv, *flags])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expect in lines[0]
    assert not any(tmp_path.iterdir()), "a failed run must not leave a run directory"


def _run_exit(capsys, argv):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bad_labels_in_data_file_exit_2(tmp_path, capsys):
    x = np.random.default_rng(0).uniform(size=(30, 4)).astype(np.float32)
    y = np.arange(30) % 3
    bad = dict(x_train=x, y_train=y.astype(np.float32), x_valid=x, y_valid=y, x_test=x, y_test=y)
    np.savez(tmp_path / "bad.npz", **bad)
    code, _, err = _run_exit(
        capsys, ["train", "--data", str(tmp_path / "bad.npz"), "--runs-dir", str(tmp_path / "r")]
    )
    assert code == 2 and "integer" in err and len(err.strip().splitlines()) == 1


def _splits(n=30, f=4, **change):
    rng = np.random.default_rng(0)
    arrays = {}
    for k in ("train", "valid", "test"):
        arrays[f"x_{k}"] = rng.uniform(size=(n, f)).astype(np.float32)
        arrays[f"y_{k}"] = (np.arange(n) % 3).astype(np.int32)
    arrays.update(change)
    return {k: v for k, v in arrays.items() if v is not None}


def _nan_x():
    x = np.random.default_rng(0).uniform(size=(30, 4)).astype(np.float32)
    x[4, 1] = np.inf
    return x


BAD_FILES = {
    "truncated": (lambda p: p.write_bytes(_npz_bytes(_splits())[:700]), "unreadable"),
    "empty file": (lambda p: p.write_bytes(b""), "unreadable"),
    "not a zip": (lambda p: p.write_text("x,y\n1,2\n"), "unreadable"),
    "a directory": (lambda p: p.mkdir(), "not found"),
    "missing split": (lambda p: np.savez(p, **_splits(y_test=None)), "missing y_test"),
    "Inf feature": (lambda p: np.savez(p, **_splits(x_train=_nan_x())), "NaN/Inf"),
    "no examples": (
        lambda p: np.savez(
            p, **_splits(x_train=np.zeros((0, 4), np.float32), y_train=np.zeros(0, np.int32))
        ),
        "at least one example",
    ),  # fmt: skip
    "1-D features": (lambda p: np.savez(p, **_splits(x_train=np.zeros(30, np.float32))), "shape"),
    "integer features": (
        lambda p: np.savez(p, **_splits(x_train=np.zeros((30, 4), np.int64))),
        "floating dtype",
    ),
    "feature count differs": (
        lambda p: np.savez(p, **_splits(x_valid=np.zeros((30, 5), np.float32))),
        "validation x shape",
    ),
    "negative label": (
        lambda p: np.savez(p, **_splits(y_valid=np.full(30, -1, np.int32))),
        "expected labels in",
    ),
    "label/example count": (
        lambda p: np.savez(p, **_splits(y_train=np.zeros(29, np.int32))),
        "29 labels for 30 examples",
    ),
}


def _npz_bytes(arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("command", ["train", "sweep", "ensemble"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_files_exit_2_with_one_line(case, command, tmp_path, capsys):
    make, expect = BAD_FILES[case]
    path = tmp_path / "in" / "d.npz"
    path.parent.mkdir()
    make(path)
    runs = tmp_path / "runs"
    code, _, err = _run_exit(capsys, [command, "--data", str(path), "--runs-dir", str(runs), "--epochs", "1", "--batch-size", "10", "--no-progress"])  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expect in lines[0], lines[0]
    assert not runs.exists() or not any(runs.iterdir()), (
        "a failed run must not leave a run directory"
    )


def test_help_shows_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "jaxdl.cli", "train", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "MLP hidden widths, e.g. 500,500 (default: 500,500)" in text
    assert "(default: adam)" in text


def test_console_script_runs_as_a_subprocess(tmp_path, tiny_npz):
    """The installed `jaxdl` entry point: progress as plain lines, JSON as the last stdout line."""
    exe = Path(sys.executable).parent / "jaxdl"
    cmd = [
        str(exe) if exe.exists() else sys.executable,
        *([] if exe.exists() else ["-m", "jaxdl.cli"]),
    ]
    out = subprocess.run(
        [*cmd, "train", "--data", str(tiny_npz), "--hidden", "8", "--epochs", "2", "--batch-size", "50",
         "--runs-dir", str(tmp_path), "--json", "--no-plots"],  # fmt: skip
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "epoch 2/2" in out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["epochs_run"] == 2


@pytest.mark.e2e
def test_default_model_one_epoch_on_real_mnist(tmp_path, capsys):
    try:
        jaxdl.load("mnist")
    except jaxdl.data.DownloadError as e:
        pytest.skip(f"MNIST could not be fetched: {e}")
    code, out, err = _run(
        capsys, "train", "--epochs", "1", "--runs-dir", str(tmp_path), "--json", "--no-plots"
    )
    assert code == 0, err
    res = json.loads(out.splitlines()[-1])
    assert res["test_accuracy"] > 0.95


def test_sweep_end_to_end_one_compile_and_outputs(tmp_path, tiny_npz, capsys):
    code, out, err = _run(
        capsys, "sweep", "--data", str(tiny_npz), "--hidden", "16", "--epochs", "2", "--batch-size", "50",
        "--optimizer", "sgd", "--lr", "logspace:1e-3:1e-1:3", "--dropout-hidden", "0,0.5", "--seeds", "2",
        "--runs-dir", str(tmp_path), "--name", "s", "--json", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["members"] == 12 and res["compiles"] == 1 and res["diverged"] == 0
    assert {"learning_rate", "dropout_hidden", "seed", "best_val_accuracy", "test_accuracy"} <= set(
        res["best"]
    )
    run = tmp_path / "s"
    rows = (run / "results.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[0].startswith("dropout_hidden,learning_rate,seed,")
    for f in (
        "config.json",
        "results.json",
        "history.json",
        "summary.json",
        "sweep.png",
        "curves.png",
    ):
        assert (run / f).stat().st_size > 0, f
    best = max(json.loads((run / "results.json").read_text()), key=lambda r: r["best_val_accuracy"])
    assert best["best_val_accuracy"] == res["best"]["best_val_accuracy"]


def test_sweep_data_order_flag_reaches_the_sweep(tmp_path, tiny_npz, capsys):
    """Two seeds: own orders by default; --data-order shared trains seed 1 on seed 0's
    order, so its member differs while seed 0's does not."""
    digests = {}
    for order in ("own", "shared"):
        code, out, err = _run(
            capsys, "sweep", "--data", str(tiny_npz), "--hidden", "8", "--epochs", "1",
            "--optimizer", "sgd", "--lr", "0.1", "--seeds", "2", "--data-order", order,
            "--runs-dir", str(tmp_path), "--name", order, "--json", "--no-progress", "--no-plots",
        )  # fmt: skip
        assert code == 0, err
        assert (
            json.loads((tmp_path / order / "config.json").read_text())["options"]["data_order"]
            == order
        )
        rows = json.loads((tmp_path / order / "results.json").read_text())
        digests[order] = [r["test_loss"] for r in rows]
    assert digests["own"][0] == pytest.approx(digests["shared"][0], rel=1e-5)
    assert digests["own"][1] != pytest.approx(digests["shared"][1], rel=1e-5)


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--lr", "logspace:0:1:3"], "logspace bounds"),
        (["--lr", "1e-3,abc"], "--lr"),
        (["--lr", "linspace:0:1"], "--lr"),
        (["--seeds", "0"], "--seeds"),
        (["--dropout-hidden", "0.2,1.5"], "dropout"),
        (["--data-order", "mine"], "--data-order"),
        (["--cpu-devices", "0"], "--cpu-devices"),
        (["--cpu-devices", "two"], "--cpu-devices"),
        (["--cpu-devices", "5"], "--cpu-devices: cannot use 5 CPU devices"),  # JAX started
    ],
)
def test_sweep_bad_ranges_exit_2(flags, expect, tmp_path, tiny_npz, capsys):
    _assert_one_line_error(capsys, "sweep", tmp_path, tiny_npz, flags, expect)


def test_a_cnn_takes_its_image_shape_from_hwc_images(tmp_path, capsys):
    """Images of your own, (N, H, W, C) in the .npz: ``--model cnn`` reads H, W, C from
    them (the run's config records it), and a flat array of another size says what a CNN
    expects."""
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 3, n)
        x = rng.normal(size=(n, 8, 8, 3)).astype(np.float32) + y[:, None, None, None]
        return jaxdl.Dataset(x, y.astype(np.int32))

    path = tmp_path / "images.npz"
    jaxdl.data.save_file(path, jaxdl.Splits(split(96), split(32), split(32)))
    code, out, err = _run(
        capsys, "train", "--data", str(path), "--model", "cnn", "--conv-features", "4",
        "--conv-dense", "8", "--epochs", "2", "--batch-size", "32", "--runs-dir",
        str(tmp_path / "runs"), "--name", "c", "--json", "--no-progress", "--no-plots",
    )  # fmt: skip
    assert code == 0, err
    config = json.loads((tmp_path / "runs" / "c" / "config.json").read_text())
    assert config["run"]["model"]["args"]["image_shape"] == [8, 8, 3]
    assert config["run"]["model"]["args"]["num_classes"] == 3
    assert 0.0 <= json.loads(out.strip().splitlines()[-1])["test_accuracy"] <= 1.0
    flat = tmp_path / "flat.npz"
    s = jaxdl.synthetic_splits(64, 16, 16, num_features=10, num_classes=3)
    jaxdl.data.save_file(flat, s)
    code, _, err = _run(capsys, "train", "--data", str(flat), "--model", "cnn")
    assert code == 2 and "image_shape (28, 28, 1) (N, H, W, C), or flat (N, 784)" in err
    assert "got (64, 10)" in err
