"""What a newcomer reads: --help, unknown flags, errors that name the flag typed, paths
that are files, files that are never overwritten silently, and what a run says while it
starts, trains and ends (tiny data sets only)."""

import re

import numpy as np
import pytest

from jaxdl import cli


def _run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors and --help
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _help(capsys, *command) -> str:
    code, out, _ = _run(capsys, *command, "--help")
    assert code == 0
    return out


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["train", "--epohcs", "2"], "unknown flag --epohcs (did you mean --epochs?)"),
        (["train", "--epoch", "2"], "unknown flag --epoch (did you mean --epochs?)"),  # no abbrev
        (["sweep", "--lr", "0.1", "--bogus"], "unknown flag --bogus; see jaxdl sweep --help"),
        (["runs", "a", "b"], "unexpected argument 'b'"),
    ],
)
def test_unknown_flags_exit_2_with_the_nearest_flag(capsys, argv, expect):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert expect in err and len(err.strip().splitlines()) == 1, err


def test_help_shows_each_real_default_once_as_typed(capsys):
    text = " ".join(_help(capsys, "train").split())  # unwrapped
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("(default:") > 20
    assert "MLP hidden widths, e.g. 500,500 (default: 500,500)" in text
    assert "--b1 B1 Adam β1 (default: 0.9)" in text
    assert "--b2 B2 Adam β2 (default: 0.999)" in text
    assert "learning rate (default: 0.01 for sgd, momentum," in text
    assert "0.001 for rmsprop, adam, adamw)" in text
    assert (
        "--dropout-hidden DROPOUT_HIDDEN dropout rate on each hidden layer (a module of your own: on each jaxdl.Dropout layer); default 0 (your module's own rates)"
        in text
    )
    assert "(default: train-<timestamp>)" in text
    for flag in ("--lr", "--init-scale", "--data-dir", "--name", "--schedule"):
        body = text.split(" options: ")[1]
        line = re.search(rf" {flag} \S+ (.*?)(?= --|$)", body).group(1)
        assert line.count("default") == 1, (flag, line)
    sweep = " ".join(_help(capsys, "sweep").split())
    assert "(default: sweep-<timestamp>)" in sweep
    assert "The sweepable flags: --lr, --momentum," in sweep and "--dropout-hidden;" in sweep


@pytest.mark.parametrize(
    "command", [["train"], ["sweep"], ["ensemble"], ["runs"], ["compare"], ["report"], ["data"]]
)
def test_every_command_has_a_description_and_examples(capsys, command):
    out = _help(capsys, *command)
    usage, description = out.split("\n\n")[:2]
    assert usage.startswith(f"usage: jaxdl {command[0]}")
    assert len(description.split()) >= 8, description
    examples = out.split("examples:\n")[1].splitlines()
    assert examples and all(line.startswith(f"  jaxdl {command[0]}") for line in examples)


def test_help_fits_80_columns_and_never_splits_a_flag(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for command in ("train", "sweep", "ensemble"):
        out = _help(capsys, command)
        assert max(map(len, out.splitlines())) <= 80
        assert not re.search(r"--[a-z]+-\n", out)  # e.g. "--lr-" at a line's end


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["train", "--dropout-hidden", "1.5"], "--dropout-hidden: expected a number in [0.0, 1.0)"),
        (["sweep", "--dropout-hidden", "0.2,1.5"], "--dropout-hidden: expected a number in"),
        (["train", "--train-size", "0"], "--train-size: expected an integer > 0, got 0"),
        (["train", "--l2", "-1"], "--l2: "),
        (["sweep", "--lr", "0.1,-1"], "--lr: "),
        (["train", "--epochs", "0"], "--epochs: "),
    ],
)
def test_errors_name_the_flag_that_was_typed(capsys, argv, expect):
    code, _, err = _run(capsys, *argv)
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err


def test_train_size_above_the_data_names_the_flag(capsys, tmp_path):
    import jaxdl

    path = tmp_path / "d.npz"
    jaxdl.data.save_file(path, jaxdl.synthetic_splits(40, 10, 10, num_features=4, num_classes=2))
    code, _, err = _run(capsys, "train", "--data", path, "--train-size", "41", "--runs-dir",
                        tmp_path / "runs")  # fmt: skip
    assert code == 2 and "--train-size: expected at most the 40 training examples, got 41" in err
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("flag", ["--runs-dir", "--data-dir"])
def test_a_directory_flag_pointing_at_a_file_exits_2(capsys, tmp_path, flag):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = _run(capsys, "train", flag, afile)
    assert code == 2 and f"{flag}: {str(afile)!r} is a file; expected a directory" in err
    assert afile.read_text() == "x"


def test_a_config_key_spelled_as_in_python_suggests_the_flag(capsys, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("learning_rate = 0.1\n")
    code, _, err = _run(capsys, "train", "--config", path)
    assert code == 2 and "unknown key 'learning_rate' for jaxdl train (did you mean 'lr'?)" in err


@pytest.mark.parametrize("content", [b"garbage\n", None])
def test_a_file_that_is_not_an_npz_says_what_was_expected(capsys, tmp_path, content):
    path = tmp_path / "d.npz"
    if content is None:  # one array saved with np.save, renamed
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        path.write_bytes(content)
    code, _, err = _run(capsys, "train", "--data", path)
    assert code == 2 and "not an .npz archive" in err and "allow_pickle" not in err
    assert "x_train, y_train, x_valid, y_valid, x_test, y_test" in err


def test_report_never_overwrites_without_force(capsys, tiny_runs, tmp_path):
    root, _ = tiny_runs
    out = tmp_path / "r.html"
    out.write_text("mine")
    code, _, err = _run(capsys, "report", root / "t", "--out", out)
    assert code == 2 and "exists; give --force" in err and out.read_text() == "mine"
    code, _, err = _run(capsys, "report", root / "t", "--out", out, "--force")
    assert code == 0, err
    assert out.read_text().startswith("<!DOCTYPE html>")
    code, _, err = _run(capsys, "report", root / "t", "--out", tmp_path)
    assert code == 2 and "is a directory" in err


@pytest.fixture
def small(tmp_path):
    import jaxdl

    path = tmp_path / "small.npz"
    jaxdl.data.save_file(path, jaxdl.synthetic_splits(120, 40, 40, num_features=6, num_classes=3))
    return path


def test_a_run_says_what_it_does_before_the_first_epoch_and_where_it_resumes(
    capsys, tmp_path, small
):
    common = ["--data", small, "--hidden", "13", "--epochs", "2", "--batch-size", "20",
              "--runs-dir", tmp_path / "runs", "--kernels", "off"]  # fmt: skip
    code, _, err = _run(capsys, "train", *common, "--name", "a")
    assert code == 0, err
    lines = err.splitlines()
    compiling = [i for i, line in enumerate(lines) if line.startswith("jaxdl: compiling")]
    assert len(compiling) == 1 and compiling[0] < min(
        i for i, line in enumerate(lines) if line.startswith("epoch 1/2")
    )
    assert "INFO" not in err  # once, as jaxdl's own line
    code, _, err = _run(capsys, "train", *common, "--name", "b", "--no-progress")
    assert code == 0 and "jaxdl:" not in err
    (tmp_path / "runs" / "a" / "results.json").unlink()  # as if it died while finishing
    code, _, err = _run(capsys, "train", "--resume", tmp_path / "runs" / "a")
    assert code == 0, err
    assert f"jaxdl: resuming {tmp_path / 'runs' / 'a'} after epoch 2 of 2" in err
    # b ran with --no-progress: resumed without it, it shows its progress (display flags
    # are the resuming command's own)
    (tmp_path / "runs" / "b" / "results.json").unlink()
    code, _, err = _run(capsys, "train", "--resume", tmp_path / "runs" / "b")
    assert code == 0 and "done: 2/2 epochs" in err, err


def test_a_sweep_labels_its_live_line_and_ends_with_a_member_table(capsys, tmp_path, small):
    code, out, err = _run(
        capsys, "sweep", "--data", small, "--hidden", "11", "--epochs", "2", "--batch-size", "20",
        "--lr", "0.01,0.1", "--seeds", "2", "--runs-dir", tmp_path, "--name", "s", "--no-plots",
    )  # fmt: skip
    assert code == 0, err
    assert re.search(r"epoch 2/2  val_acc best \d\.\d{4} med \d\.\d{4}; 4/4 on", err)
    lines = out.strip().splitlines()
    header = lines[0].split()
    assert header == ["learning_rate", "seed", "val_acc", "best_epoch", "test_acc", "epochs"]
    rows = [line.split() for line in lines[2:6]]
    assert {r[0] for r in rows} == {"0.01", "0.1"}  # as typed
    scores = [float(r[2]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # best first
    best = rows[0]
    assert lines[-3].startswith("4 members, 1 compile(s), 0 diverged")  # 3 lines, < 80 columns
    assert lines[-2].startswith(
        f"best: learning_rate={best[0]}, seed={best[1]}: val accuracy {best[2]}"
    )
    assert lines[-1].startswith("results ") and lines[-1].endswith("results.csv")
    import csv

    with open(tmp_path / "s" / "results.csv") as f:
        for row in csv.DictReader(f):  # float32 results to the digits float32 holds
            assert len(row["best_val_accuracy"]) <= 8 and len(row["test_loss"]) <= 12, row
