"""``--model PATH.py:CLASS`` / ``package.module:CLASS`` with ``--model-args`` for train,
sweep and ensemble: the run records the module's source, resumes it, and refuses a
changed one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import jaxdl

MODULE = """
import flax.linen as nn
import jaxdl


class ResMLP(nn.Module):
    width: int = 32
    num_classes: int = 10
    rate: float = 0.2

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.Dense(self.width)(x.reshape(x.shape[0], -1))
        r = nn.relu(nn.Dense(self.width)(h))
        h = h + jaxdl.Dropout(self.rate)(r, train=train)
        return nn.Dense(self.num_classes)(h)


class Tempered(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        return nn.Dense(4)(nn.relu(nn.Dense(16)(x))) / jaxdl.Hyperparameter("temperature", 1.0)()


class Broken(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)
"""


@pytest.fixture
def files(tmp_path):
    module = tmp_path / "mymodels.py"
    module.write_text(MODULE)
    s = jaxdl.synthetic_splits(256, 64, 64, num_features=12, num_classes=4, seed=1, separation=6.0)
    data = tmp_path / "d.npz"
    jaxdl.data.save_file(data, s)
    return module, data, tmp_path / "runs"


def _train(run_cli, module, data, runs, name, *extra):
    return run_cli("train", "--data", data, "--model", f"{module}:ResMLP",
                 "--model-args", '{"width": 16}', "--epochs", "4", "--batch-size", "64", "--lr", "0.01",
                 "--runs-dir", runs, "--name", name, "--no-progress", "--no-plots", "--json",
                 "--keep-checkpoints", "5", *extra)  # fmt: skip


def test_train_records_the_module_and_resumes_it_bit_for_bit(files, run_cli):
    module, data, runs = files
    code, out, err = _train(run_cli, module, data, runs, "ref", "--tensorboard")
    assert code == 0, err
    assert list((runs / "ref").glob("events.out.tfevents.*"))  # TensorBoard, as for an MLP
    ref = json.loads(out.splitlines()[-1])
    assert ref["test_accuracy"] > 0.8
    saved = json.loads((runs / "ref" / "config.json").read_text())
    assert saved["run"]["model"] == {"module": f"{module}:ResMLP",
                                     "args": {"width": 16, "num_classes": 4}, "numbers": {}}  # fmt: skip
    assert (runs / "ref" / "model_source.py").read_text() == MODULE
    assert len(saved["model_source"]["sha256"]) == 64
    # A run stopped after epoch 2 (its later checkpoints and results gone) resumes to the same end.
    assert _train(run_cli, module, data, runs, "cut")[0] == 0
    for epoch in ("3", "4"):
        shutil.rmtree(runs / "cut" / "checkpoints" / epoch)
    (runs / "cut" / "results.json").unlink()
    code, out, err = run_cli("train", "--resume", runs / "cut", "--json", "--no-progress")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["params_digest"] == ref["params_digest"]
    # runs and compare read it back
    code, out, err = run_cli("runs", runs, "--json")
    assert code == 0 and {r["model"] for r in json.loads(out.splitlines()[-1])["runs"]} == {
        "ResMLP width=16"
    }
    code, out, err = run_cli("report", runs / "ref", "--out", runs / "ref.html")
    assert code == 0 and "ResMLP width=16" in (runs / "ref.html").read_text(), err
    code, out, err = run_cli("compare", runs / "ref", runs / "cut")
    settings = out.split("results")[0]  # the runs differ only in --tensorboard
    assert code == 0 and "tensorboard" in settings and "model" not in settings, err
    # the module edited: resuming is refused, naming the file
    (runs / "cut" / "results.json").unlink()
    module.write_text(MODULE.replace("nn.relu", "nn.tanh"))
    code, _, err = run_cli("train", "--resume", runs / "cut", "--no-progress")
    assert code == 2 and "mymodels.py' changed since" in err and len(err.splitlines()) == 1


def test_a_moved_module_resumes_from_the_runs_copy(files, run_cli):
    module, data, runs = files
    assert _train(run_cli, module, data, runs, "m")[0] == 0
    (runs / "m" / "results.json").unlink()
    module.rename(module.with_name("elsewhere.py"))
    code, out, err = run_cli("train", "--resume", runs / "m", "--json", "--no-progress")
    assert code == 0, err


def test_sweep_and_ensemble_take_a_module_of_ones_own(files, run_cli):
    module, data, runs = files
    spec = f"{module}:ResMLP"
    code, out, err = run_cli("sweep", "--data", data, "--model", spec, "--model-args",
                           '{"width": 8}', "--epochs", "2", "--batch-size", "64", "--lr",
                           "0.001,0.01", "--dropout-hidden", "0.1,0.3", "--runs-dir", runs,
                           "--name", "s", "--no-progress", "--no-plots", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["members"] == 4
    assert (runs / "s" / "model_source.py").exists()
    code, out, err = run_cli("ensemble", "--data", data, "--model", spec, "--model-args",
                           '{"width": 8}', "--epochs", "2", "--batch-size", "64", "--k", "4",
                           "--repeats", "1", "--runs-dir", runs, "--name", "e", "--no-progress",
                           "--no-plots", "--json")  # fmt: skip
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["exact_units"] == 8 and 0 < summary["weight_scaling_accuracy"] <= 1
    ens = json.loads((runs / "e" / "ensemble.json").read_text())
    assert ens["rates"] == pytest.approx([0.2])  # the module's own rate


@pytest.mark.parametrize(
    "model, args, message",
    [
        ("{module}:Broken", None, "Broken: expected __call__(self, x, *, train: bool)"),
        ("{module}:Missing", None, "has no 'Missing' (it has Broken, ResMLP, Tempered)"),
        ("{dir}/nope.py:ResMLP", None, "no such file"),
        ("no_such_package.models:Net", None, "cannot import 'no_such_package.models'"),
        ("{module}:ResMLP", '{"widht": 8}', "unknown argument 'widht' (did you mean 'width'?)"),
        ("{module}:ResMLP", "[8]", "--model-args: expected a JSON object"),
        ("resnet", None, "--model: unknown value 'resnet'; expected mlp, cnn, PATH.py:CLASS"),
        ("{module}:ResMLP --hidden 64", None, "--hidden: a flag of jaxdl's mlp and cnn; ResMLP"),
    ],
    ids=[
        "no-train",
        "missing",
        "no-file",
        "no-package",
        "bad-arg",
        "not-object",
        "not-spec",
        "mlp-flag",
    ],  # fmt: skip
)
def test_bad_models_exit_2_with_one_line(files, run_cli, model, args, message):
    module, data, runs = files
    spec, *more = model.format(module=module, dir=Path(module).parent).split()
    extra = [] if args is None else ["--model-args", args]
    code, _, err = run_cli("train", "--data", data, "--model", spec, *more, *extra, "--epochs",
                         "1", "--runs-dir", runs, "--no-progress")  # fmt: skip
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_modules_own_number_from_the_command_line(files, run_cli):
    module, data, runs = files
    common = ["train", "--data", data, "--model", f"{module}:Tempered", "--epochs", "1",
              "--runs-dir", runs, "--no-progress", "--no-plots", "--json"]  # fmt: skip
    code, out, err = run_cli(*common, "--name", "t3", "--model-numbers", '{"temperature": 3}')
    assert code == 0, err
    saved = json.loads((runs / "t3" / "config.json").read_text())
    assert saved["run"]["model"]["numbers"] == {"temperature": 3}
    one = json.loads(out.splitlines()[-1])
    code, out, err = run_cli(*common, "--name", "t1")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["params_digest"] != one["params_digest"]
    code, _, err = run_cli(*common, "--name", "bad", "--model-numbers", '{"temprature": 3}')
    assert code == 2 and "unknown setting 'temprature' (did you mean 'temperature'?)" in err
