"""Run configurations: config.json reruns a run exactly; hand-written TOML/JSON files;
flags override files; unknown keys and bad values are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxdl import cli
from jaxdl.cli import config_file as config
from jaxdl.config import saved_flags
from jaxdl.validate import InputError


def _train_parser():
    return cli.build_parser().commands["train"]


def _sweep_parser():
    return cli.build_parser().commands["sweep"]


def _run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# --- reading and checking files ---------------------------------------------------------


def test_toml_values_parse_like_the_flags(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(
        'hidden = [64, 32]\nconv-dense = "128,64"\ndropout-hidden = 0.5\noptimizer = "momentum"\n'
        "momentum = 0.9\nepochs = 7\nbatch_norm = true\nlayer-lr = {output = 10.0}\n"
        'freeze = ["layer_0"]\nlr = 1e-2\ndata-dir = "cache"\nname = "exp1"\n'
    )
    got = config.defaults(_train_parser(), config.load(path), command="train", source="exp.toml")
    assert got == {
        "hidden": (64, 32),
        "conv_dense": (128, 64),
        "dropout_hidden": 0.5,
        "optimizer": "momentum",
        "momentum": 0.9,
        "epochs": 7,
        "batch_norm": True,
        "layer_lr": {"output": 10.0},
        "freeze": ("layer_0",),
        "lr": 0.01,
        "data_dir": Path("cache"),
        "name": "exp1",
    }


def test_sweep_lists_and_ranges_in_a_file(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(
        json.dumps({"lr": "logspace:1e-3:1e-1:3", "dropout_hidden": [0.0, 0.5], "seeds": 2})
    )
    got = config.defaults(_sweep_parser(), config.load(path), command="sweep", source="s")
    assert got["dropout_hidden"] == [0.0, 0.5] and got["seeds"] == 2
    assert got["lr"] == pytest.approx([1e-3, 1e-2, 1e-1])


@pytest.mark.parametrize(
    "values, expect",
    [
        ({"hiden": [32]}, "unknown key 'hiden' for jaxdl train (did you mean 'hidden'?)"),
        ({"batch-sise": 10}, "(did you mean 'batch_size'?)"),
        ({"seeds": 2}, "unknown key 'seeds' for jaxdl train (did you mean 'seed'?)"),
        ({"epochs": 2.5}, "epochs: expected an integer, got 2.5"),
        ({"epochs": True}, "epochs: expected a value for the flag, got True"),
        ({"batch_norm": "yes"}, "batch_norm: expected true or false"),
        ({"hidden": [32, 0]}, "hidden: expected positive integers"),
        ({"model": "cnnn"}, "model: unknown value 'cnnn' (did you mean 'cnn'?)"),
        ({"epochs": None}, "epochs: expected a value, got null"),
        ({"command": "sweep"}, "written by 'jaxdl sweep'; use it with that command"),
        ({"batch_size": 10, "batch-size": 20}, "'batch-size' is given twice"),
    ],
)
def test_bad_keys_and_values_name_the_key(values, expect):
    with pytest.raises(InputError) as e:
        config.defaults(_train_parser(), values, command="train", source="f.json")
    assert expect in str(e.value) and "f.json" in str(e.value)


@pytest.mark.parametrize(
    "name, text, expect",
    [
        ("bad.toml", "hidden = [32,", "not valid TOML"),
        ("bad.json", "{'hidden': 1}", "not valid JSON"),
        ("list.json", "[1, 2]", "expected a table of settings, got list"),
        ("missing.toml", None, "cannot read"),
    ],
)
def test_unreadable_files(tmp_path, name, text, expect):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=expect):
        config.load(tmp_path / name)


def test_record_keys_are_ignored_and_name_never_saved():
    values = {"command": "train", "resolved": {"x": 1}, "run_dir": "runs/a", "epochs": 3,
              "name": "a"}  # fmt: skip
    got = config.defaults(_train_parser(), values, command="train", source="c")
    assert got == {"epochs": 3}
    a = cli.build_parser().parse_args(["train", "--name", "x", "--config", "c.toml"])
    saved = config.settings(a)
    assert "name" not in saved and "config" not in saved
    assert saved["command"] == "train" and saved["seed"] == 0 and saved["runs_dir"] == "runs"


# --- the command line -----------------------------------------------------------------


def test_rerun_from_config_json_gives_the_same_digest(tiny_runs, tmp_path, capsys):
    root, _ = tiny_runs
    original = json.loads((root / "t" / "results.json").read_text())
    saved = saved_flags(json.loads((root / "t" / "config.json").read_text()))
    assert saved["seed"] == 0 and saved["hidden"] == [32, 16] and saved["epochs"] == 3
    assert saved["run_dir"] == str(root / "t") and "name" not in saved
    code, out, err = _run(
        capsys, "train", "--config", str(root / "t" / "config.json"), "--runs-dir", str(tmp_path),
        "--json", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["params_digest"] == original["params_digest"]
    assert res["test_accuracy"] == original["test_accuracy"]
    rerun = Path(res["run_dir"])
    assert rerun.parent == tmp_path and rerun.name.startswith("train-")  # a new directory
    again = saved_flags(json.loads((rerun / "config.json").read_text()))
    differ = {k for k in saved.keys() | again.keys() if saved.get(k) != again.get(k)}
    assert differ == {"run_dir", "runs_dir", "json"}  # only what the flags changed


def test_rerun_into_an_existing_name_is_refused(tiny_runs, capsys):
    root, _ = tiny_runs
    before = (root / "t" / "results.json").read_text()
    code, _, err = _run(
        capsys, "train", "--config", str(root / "t" / "config.json"), "--name", "t", "--no-progress"
    )
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert (root / "t" / "results.json").read_text() == before


def test_flags_override_the_file(tiny_runs, tmp_path, capsys):
    _, data_path = tiny_runs
    path = tmp_path / "exp.toml"
    path.write_text(
        f'data = "{data_path}"\nhidden = [8]\nepochs = 3\nbatch-size = 50\nseed = 4\n'
        'optimizer = "sgd"\nlr = 0.05\nno-plots = true\n'
    )
    code, out, err = _run(
        capsys, "train", "--config", str(path), "--epochs", "1", "--lr", "0.1",
        "--runs-dir", str(tmp_path / "runs"), "--json", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    saved = saved_flags(json.loads((Path(res["run_dir"]) / "config.json").read_text()))
    assert (saved["epochs"], saved["lr"]) == (1, 0.1)  # the flags
    assert (saved["hidden"], saved["seed"], saved["batch_size"]) == ([8], 4, 50)  # the file
    assert saved["optimizer"] == "sgd" and saved["no_plots"] is True
    assert saved["preprocess"] == "none"  # a default
    assert res["epochs_run"] == 1 and not (Path(res["run_dir"]) / "curves.png").exists()


def test_unknown_key_exits_2_with_one_line_and_no_run_dir(tmp_path, capsys):
    path = tmp_path / "exp.toml"
    path.write_text("hiden = [8]\n")
    runs_dir = tmp_path / "runs"
    code, _, err = _run(capsys, "train", "--config", str(path), "--runs-dir", str(runs_dir))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "unknown key 'hiden'" in lines[0] and "did you mean 'hidden'" in lines[0]
    assert not runs_dir.exists()


def test_sweep_config_json_reruns_the_sweep(tiny_runs, tmp_path, capsys):
    root, _ = tiny_runs
    code, out, err = _run(
        capsys, "sweep", "--config", str(root / "s" / "config.json"),
        "--runs-dir", str(tmp_path), "--json", "--no-progress", "--no-plots",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["members"] == 4
    old = json.loads((root / "s" / "results.json").read_text())
    new = json.loads((Path(res["run_dir"]) / "results.json").read_text())
    assert [r["best_val_accuracy"] for r in new] == [r["best_val_accuracy"] for r in old]
    code, _, err = _run(capsys, "train", "--config", str(root / "s" / "config.json"))
    assert code == 2 and "written by 'jaxdl sweep'" in err
