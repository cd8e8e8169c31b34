"""The studies in quick mode on real MNIST, run through their notebooks: each notebook
runs top to bottom (a failing cell fails the test), shows its plots and numbers, and the
study writes its plots and a JSON of numbers that hold what the study is about. One run
checks both the notebook a student opens and the script behind it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent / "experiments"
NOTEBOOKS = ROOT.parent / "notebooks"


def _plots(name: str) -> list[str]:
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.STUDIES[name]["plots"]


def _study(name: str, out: Path) -> dict:
    """Executes notebook ``name`` with its study writing into ``out``; returns the
    study's summary as written to ``out/results.json``."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    marker = f'out = Path(tempfile.mkdtemp(prefix="{name}-"))'
    setup = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert len(setup) == 1, f"{name}.ipynb: no cell sets `out` (regenerate the notebooks)"
    setup[0].source = setup[0].source.replace(marker, f"out = Path({str(out)!r})")
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(_plots(name))
    assert "".join(o.get("text", "") for o in outputs).strip()  # the key numbers were shown
    return json.loads((out / "results.json").read_text())


@pytest.mark.e2e
def test_ensemble_k_curve_quick(tmp_path):
    summary = _study("ensemble_k_curve", tmp_path)
    for f in ("k_curve.png", "subnetworks.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    mc = summary["mc_error_percent"]
    assert summary["k"] == 20 and set(mc) == {"1", "2", "5", "10", "20"}
    assert mc["1"] > mc["20"]  # averaging subnetworks beats one subnetwork
    assert summary["weight_scaling_error_percent"] < mc["1"]
    assert summary["mean_entropy"]["noise"] > summary["mean_entropy"]["test"]
    ex = summary["exact_16_units"]  # all 2^16 subnetworks of the small net, enumerated
    assert (tmp_path / "exact_16_units" / "k_curve.png").stat().st_size > 0
    assert ex["exact_accuracy"] > 0.8 and abs(ex["exact_accuracy"] - ex["mc_accuracy"]["20"]) < 0.02
    assert ex["exact_nll"] <= ex["mc_nll"]["1"]  # the full ensemble beats one subnetwork


@pytest.mark.e2e
def test_sanity_check_quick(tmp_path):
    summary = _study("sanity_check", tmp_path)
    for f in ("train_accuracy.png", "final_accuracy.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    c = summary["conditions"]
    assert summary["memorised"] and c["none"]["train_accuracy"] == 1.0  # 100 images memorised
    assert c["none"]["train_accuracy_while_training"] == 1.0
    assert c["l2=1e-1"]["train_accuracy"] < 0.9  # a strong penalty prevents it
    assert c["dropout 0.5/0.8"]["train_accuracy"] < 0.9  # so does strong dropout
    assert c["dropout 0.5/0.8"]["train_accuracy_while_training"] < 0.9
    assert c["none"]["val_accuracy"] < 0.8  # memorising 100 images generalises poorly
    assert summary["compiles"] <= 1  # every condition is a member of one sweep


@pytest.mark.e2e
def test_vanishing_gradients_quick(tmp_path):
    summary = _study("vanishing_gradients", tmp_path)
    for f in ("grad_norms.png", "accuracy.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    ratio = summary["first_to_last_ratio"]
    # sigmoid: the first hidden layer gets a far smaller gradient than the last one
    assert ratio["sigmoid"] < 0.01
    assert ratio["sigmoid"] < 0.01 * ratio["relu"]
    assert ratio["sigmoid"] < 0.01 * ratio["maxout"]
    norms = summary["runs"]["sigmoid"]["grad_norm"]  # (layers, epochs): shrinks towards the input
    assert norms[0][-1] < norms[3][-1] < norms[-1][-1]
    acc = summary["test_accuracy"]
    assert acc["relu"] > acc["sigmoid"] + 0.05 and acc["maxout"] > acc["sigmoid"] + 0.05


@pytest.mark.e2e
def test_initialisation_quick(tmp_path):
    summary = _study("initialisation", tmp_path)
    for f in ("histograms.png", "act_std.png", "accuracy.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    runs, acc = summary["runs"], summary["test_accuracy"]
    zero = runs["zero"]  # symmetry: the units of every layer stay identical, though they learn
    assert max(zero["unit_spread_trained"]) == 0.0 and zero["kernel_norm_trained"][-1] > 0
    assert min(runs["he"]["unit_spread_trained"]) > 0
    small = runs["small normal"]["act_std_init"]  # deep activations collapse towards 0
    assert small[-1] < 1e-3 * small[0]
    assert sum(runs["large normal"]["saturated_init"]) / summary["depth"] > 0.2  # sigmoid at 0/1
    for good in ("xavier", "he"):
        assert runs[good]["act_std_init"][-1] > 0.1  # the scale survives the depth
        assert max(runs[good]["saturated_init"]) < 0.05
        for bad in ("zero", "small normal", "large normal"):
            assert acc[good] > acc[bad] + 0.3


@pytest.mark.e2e
def test_regularisation_quick(tmp_path):
    summary = _study("regularisation", tmp_path)
    for f in ("gap_curves.png", "final.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    c, gap = summary["conditions"], summary["gap"]
    assert c["none"]["train_accuracy"] > 0.99 and gap["none"] > 0.08  # 1k images: over-fitting
    for cure in ("l1", "l2", "dropout", "more data"):
        assert gap[cure] < gap["none"] - 0.01, cure
    assert c["more data"]["val_accuracy"] > c["none"]["val_accuracy"] + 0.02
    es = summary["early_stopping"]  # restores the best epoch: the one with the least val loss
    assert es["best_epoch"] == summary["none_min_val_loss_epoch"] < es["epochs_run"]
    assert es["restored_val_loss"] == pytest.approx(es["best_epoch_val_loss"], rel=1e-5)
    assert es["restored_val_loss"] < summary["none_final_val_loss"]
    assert summary["sweep_compiles"] <= 1


@pytest.mark.e2e
def test_loss_choice_quick(tmp_path):
    summary = _study("loss_choice", tmp_path)
    for f in ("curves.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    train, test = summary["final_train_accuracy"], summary["test_accuracy"]
    assert train["sigmoid + mse + sgd"] < 0.2 and test["sigmoid + mse + sgd"] < 0.2  # stalls
    assert train["relu + cross-entropy + adam"] > 0.9 and test["relu + cross-entropy + adam"] > 0.8


@pytest.mark.e2e
def test_optimizers_quick(tmp_path):
    summary = _study("optimizers", tmp_path)
    for f in ("mnist_loss.png", "surfaces.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    loss = summary["final_train_loss"]  # per epoch: more updates, more progress
    assert loss["sgd (batch 1)"] < loss["mini-batch sgd (100)"] < loss["gd (full batch)"]
    assert len(loss) == 7 and all(np.isfinite(v) for v in loss.values())
    for adaptive in ("adagrad", "rmsprop", "adam"):  # per-parameter steps: faster early on
        assert loss[adaptive] < loss["mini-batch sgd (100)"], adaptive
    steps = summary["steps_to_target"]
    for fast in ("momentum", "adagrad", "adam"):  # plain GD leaves the saddle slowest
        assert steps["saddle"][fast] < steps["saddle"]["sgd"] / 2
    assert steps["ravine"]["sgd"] is None and steps["ravine"]["momentum"] is not None
    assert steps["plateau"]["sgd"] is None  # the gradient is too small to get off the plateau
    for adaptive in ("adagrad", "rmsprop", "adam"):  # normalised steps do
        assert steps["plateau"][adaptive] is not None


@pytest.mark.e2e
def test_seeing_inside_quick(tmp_path):
    summary = _study("seeing_inside", tmp_path)
    for f in ("weights.png", "histograms.png", "dead_relu.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    dead = summary["final_dead_fraction"]
    assert dead["lr 3e-2"]["layer_0"] > 0.5 > dead["lr 1e-3"]["layer_0"]  # big steps kill ReLUs
    for r in summary["runs"].values():
        assert len(r["histograms"]) == summary["epochs"]  # one histogram per layer per epoch
        assert all(sum(h) == 1000 * 256 for h in r["histograms"][-1])
        assert r["first_layer_change"] > 0.1
    assert summary["test_accuracy"]["lr 1e-3"] > 0.85


@pytest.mark.e2e
def test_schedules_quick(tmp_path):
    summary = _study("schedules", tmp_path)
    for f in ("plateau.png", "weight_decay.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    const, halved = (
        summary["plateau_runs"]["constant"],
        summary["plateau_runs"]["halved on plateau"],
    )
    assert len(set(const["learning_rate"])) == 1
    lr, val, k = halved["learning_rate"], halved["val_loss"], summary["patience"]
    changes = [e for e in range(1, len(lr)) if lr[e] != lr[e - 1]]
    assert changes and summary["plateau"]["halved on plateau"]["halvings"] >= 1
    for e in changes:  # halved, and only after `patience` epochs without a new best
        assert lr[e] == pytest.approx(lr[e - 1] / 2)
        assert min(val[e - k : e]) >= min(val[: e - k])
    first = changes[0]  # the same run until the first halving
    assert const["val_loss"][:first] == halved["val_loss"][:first]
    runs, start = summary["decay_runs"], summary["decay_start_epoch"]
    late, none = runs[f"decay from epoch {start}"], runs["no decay"]
    assert late["val_loss"][:start] == none["val_loss"][:start]  # no decay before the switch
    assert late["val_loss"][-1] < none["val_loss"][-1]
    assert late["first_layer_norm"] < none["first_layer_norm"]
    assert runs["decay from the start"]["first_layer_norm"] < none["first_layer_norm"]


@pytest.mark.e2e
def test_batch_norm_quick(tmp_path):
    summary = _study("batch_norm", tmp_path)
    for f in ("grid.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    without, with_bn = (summary["structures"][k] for k in ("without batch norm", "with batch norm"))
    assert with_bn["mean_accuracy"] > without["mean_accuracy"] + 0.2  # far less sensitive
    assert with_bn["members_above_50_percent"] > without["members_above_50_percent"]
    assert len(with_bn["val_accuracy"]) * len(with_bn["val_accuracy"][0]) == summary["members"]
    assert with_bn["compiles"] <= 1 and without["compiles"] <= 1  # one program per structure


@pytest.mark.e2e
def test_cnn_quick(tmp_path):
    summary = _study("cnn", tmp_path)
    for f in ("curves.png", "filters.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    acc = summary["test_accuracy"]
    assert acc["cnn"] > acc["mlp"] + 0.02  # the same images and epochs: the CNN wins
    assert acc["cnn"] > 0.93
    assert summary["parameters"]["cnn"] == (5 * 5 * 32 + 32) + (5 * 5 * 32 * 64 + 64) + (
        7 * 7 * 64 * 512 + 512
    ) + (512 * 10 + 10)


@pytest.mark.e2e
def test_dropout_scale_quick(tmp_path):
    summary = _study("dropout_scale", tmp_path)
    for f in ("curves.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    assert summary["compiles"] <= 1  # both members are one program
    assert summary["largest_unit_norm"] <= summary["max_norm"] * (1 + 1e-5)
    c = summary["conditions"]
    plain, drop = c["max-norm only"], c["dropout 0.2/0.5 + max-norm"]
    # without dropout the net fits its training images better than it generalises ...
    assert plain["train_error_percent"][-1] < plain["val_error_percent"][-1]
    # ... with dropout the masked training net does worse than the deterministic one
    assert drop["train_error_percent"][-1] > drop["val_error_percent"][-1]
    assert all(e < 15 for e in summary["test_error_percent"].values())


@pytest.mark.e2e
def test_your_own_model_quick(tmp_path):
    summary = _study("your_own_model", tmp_path)
    for f in ("curves.png", "sweep.png", "k_curve.png", "subnetworks.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    assert summary["test_accuracy"] > 0.85
    sw = summary["sweep"]
    assert sw["members"] == 27 and sw["compiles"] == 1  # 3 rates × 3 dropouts × 3 seeds
    assert sw["best"]["test_accuracy"] > 0.85
    ens = summary["ensemble"]
    mc = ens["mc_error_percent"]
    assert set(mc) == {"1", "2", "5", "10", "20"}
    assert ens["single_error_percent"] >= mc["20"] - 0.5  # one subnetwork is no better
    assert abs(mc["20"] - ens["weight_scaling_error_percent"]) < 2.0
    assert ens["mean_entropy"]["noise"] > ens["mean_entropy"]["test"]
