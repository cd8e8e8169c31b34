"""Writes the study notebooks (``notebooks/*.ipynb``) from the text below.

Each notebook tells one study's story in a few markdown cells and runs the study's
script from ``experiments/`` in quick mode, then shows its plots and key numbers. The
logic lives in ``jaxdl`` and ``experiments/``; edit this file, not the ``.ipynb`` files,
and run ``python notebooks/make_notebooks.py`` to rewrite them (``--check`` only reports
whether they are up to date).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
import importlib.util
import sys
import tempfile
from pathlib import Path

from IPython.display import Image, display

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "experiments").is_dir())


def load_study(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a study may define its own Flax modules (dataclasses)
    spec.loader.exec_module(module)
    return module


out = Path(tempfile.mkdtemp(prefix="@NAME@-"))
study = load_study("@NAME@")"""

RUN = """\
# --quick: a small slice of MNIST and few epochs; drop it for the full study
# (python experiments/@NAME@.py writes to experiments/results/@NAME@/).
summary = study.main(["--quick", "--out", str(out)])"""

STUDIES = {
    "sanity_check": {
        "title": "The sanity check: memorise 100 images",
        "intro": (
            "Before a long run, the course asks for a sanity check: a network trained "
            "without any regularisation on a tiny slice of the data (here 100 MNIST "
            "images) must reach 100% training accuracy. If it cannot, the code or the "
            "set-up is broken. Regularisation is what keeps a healthy network from "
            "getting there: below, an L2 penalty and dropout are swept over their "
            "strengths, every condition a member of one vectorised sweep."
        ),
        "plots": ["train_accuracy.png", "final_accuracy.png"],
        "numbers": """\
for label, c in summary["conditions"].items():
    print(
        f"{label:18s} train {c['train_accuracy']:.3f} (while training "
        f"{c['train_accuracy_while_training']:.3f})  validation {c['val_accuracy']:.3f}"
    )""",
        "outro": (
            "Without regularisation the 100 images are memorised (training accuracy 1.0), "
            "yet validation accuracy stays low: memorising is not learning. A strong L2 "
            "penalty or strong dropout keeps the training accuracy below 1.0."
        ),
    },
    "vanishing_gradients": {
        "title": "Vanishing gradients: sigmoid vs ReLU vs maxout",
        "intro": (
            "An MLP with 8 hidden layers is trained with plain SGD three times, changing "
            "only the activation. After every epoch `jaxdl.fit` records the norm of the "
            "loss gradient of each layer (`grad_norm/layer_i` in the history). The "
            "derivative of the sigmoid is at most 1/4, so the gradient shrinks at every "
            "layer on its way back to the input."
        ),
        "plots": ["grad_norms.png", "accuracy.png"],
        "numbers": """\
for act in summary["first_to_last_ratio"]:
    print(
        f"{act:8s} first/last hidden-layer gradient norm "
        f"{summary['first_to_last_ratio'][act]:.2e}  test accuracy "
        f"{summary['test_accuracy'][act]:.3f}"
    )""",
        "outro": (
            "With sigmoid, the layers next to the input get gradients thousands of times "
            "smaller than the layers next to the output, so they learn slowest and the "
            "deep network barely leaves chance. ReLU and maxout keep the gradient's "
            "size through the depth."
        ),
    },
    "initialisation": {
        "title": "Initialisation: zero, small, large, Xavier, He",
        "intro": (
            "Five ways to draw the first weights of a 5-hidden-layer MLP, each trained "
            "for the same budget. The histograms show every hidden layer's activations "
            "on 1,000 training images before any training."
        ),
        "plots": ["histograms.png", "act_std.png", "accuracy.png"],
        "numbers": """\
for label, r in summary["runs"].items():
    print(
        f"{label:13s} act std layer 1 {r['act_std_init'][0]:.2e}, layer 5 "
        f"{r['act_std_init'][-1]:.2e}; max unit spread {max(r['unit_spread_trained']):.2e}; "
        f"test accuracy {r['test_accuracy']:.3f}"
    )""",
        "outro": (
            "Zero initialisation: every unit of a layer stays identical (the spread "
            "between units' weights is exactly 0 after training): symmetry is never "
            "broken. Small normal weights: the activations collapse towards 0 layer "
            "after layer. Large normal weights: sigmoid units sit at 0 or 1 where their "
            "derivative vanishes. Xavier (tanh) and He (ReLU) keep the scale through "
            "the depth, and only they train well in the budget."
        ),
    },
    "regularisation": {
        "title": "Under- and over-fitting on 1,000 images",
        "intro": (
            "With only 1,000 training images an MLP memorises the training set and the "
            "validation loss turns up after a few epochs. Compared: no regularisation, "
            "L1, L2, dropout (one vectorised sweep), early stopping on the validation "
            "loss (restoring the best epoch), and more data."
        ),
        "plots": ["gap_curves.png", "final.png"],
        "numbers": """\
for label, c in summary["conditions"].items():
    print(
        f"{label:15s} train {c['train_accuracy']:.3f}  validation {c['val_accuracy']:.3f}"
        f"  gap {c['gap']:.3f}"
    )
print("early stopping:", summary["early_stopping"])""",
        "outro": (
            "In this short run the penalties and dropout narrow the gap between "
            "training and validation accuracy, mostly by fitting the training images "
            "less; over the full 60 epochs (see `experiments/README.md`) L1 and L2 at "
            "these strengths lower validation accuracy too, and only dropout raises it. "
            "Early stopping returns the parameters of the epoch with the lowest "
            "validation loss. More data narrows the gap and raises validation accuracy "
            "the most."
        ),
    },
    "loss_choice": {
        "title": "Loss choice: the demo that stalls",
        "intro": (
            "The course's Keras demo trains a sigmoid MLP with mean squared error on "
            "softmax outputs and plain SGD, and stalls near chance. The full study "
            "changes one thing at a time (loss, activation, optimizer); the quick run "
            "below compares the two ends."
        ),
        "plots": ["curves.png"],
        "numbers": """\
for label, acc in summary["final_train_accuracy"].items():
    print(f"{label:30s} train {acc:.3f}  test {summary['test_accuracy'][label]:.3f}")""",
        "outro": (
            "Sigmoid + MSE + SGD stays near 10% accuracy; ReLU + cross-entropy + Adam "
            "learns the same data in a few epochs."
        ),
    },
    "optimizers": {
        "title": "Optimizers: batch size and update rules",
        "intro": (
            "On MNIST: full-batch gradient descent, SGD with batch 1 and mini-batch SGD, "
            "then Momentum, AdaGrad, RMSProp and Adam at batch 100. On three 2-D "
            "surfaces (a saddle, a ravine, a plateau) each update rule of "
            "`jaxdl.make_optimizer` is run for 200 steps and its path drawn over the "
            "contours."
        ),
        "plots": ["mnist_loss.png", "surfaces.png"],
        "numbers": """\
import json

print("final training loss:", json.dumps(summary["final_train_loss"], indent=1))
print("steps to target:", json.dumps(summary["steps_to_target"], indent=1))""",
        "outro": (
            "Per epoch, more updates make more progress (batch 1 beats full batch), and "
            "the adaptive rules get ahead of plain mini-batch SGD in the first epochs. "
            "Momentum rolls along the ravine that plain gradient descent crawls down; "
            "on the plateau the gradient is too small for plain gradient descent, while "
            "the adaptive rules (AdaGrad, RMSProp, Adam) normalise it away."
        ),
    },
    "seeing_inside": {
        "title": "Seeing inside: weights, activations, dead ReLUs",
        "intro": (
            "The same ReLU MLP trained at a usual (1e-3) and a high (3e-2) Adam learning "
            "rate. We look at the first layer's weights as 28×28 images, at each hidden "
            "layer's activation histogram after every epoch, and at the fraction of dead "
            "ReLUs (units never positive on 1,000 training images), which `jaxdl.fit` "
            "records per epoch as `dead_fraction/layer_i`."
        ),
        "plots": ["weights.png", "histograms.png", "dead_relu.png"],
        "numbers": """\
for label, r in summary["runs"].items():
    print(
        f"{label}: dead fraction per layer {r['final_dead_fraction']}, "
        f"test accuracy {r['test_accuracy']:.3f}"
    )""",
        "outro": (
            "At the high learning rate most first-layer units die: a large step pushes "
            "their weights negative over the whole digit area, after which they never "
            "fire again and get no gradient. At 1e-3 almost none do."
        ),
    },
    "schedules": {
        "title": "Schedules: halve on plateau, decay switched on late",
        "intro": (
            "Two schedules from the course. First, momentum SGD whose learning rate is "
            "halved once the validation loss has stopped improving for `patience` "
            "epochs, against the same run at a constant rate. Second, on 1,000 images, "
            "AdamW without weight decay, with decay from the start, and with decay "
            "switched on only after the network has had a few epochs to fit the data. "
            "Each part is one vectorised sweep: the patience, the decay and the epoch "
            "it starts at are all traced numbers."
        ),
        "plots": ["plateau.png", "weight_decay.png"],
        "numbers": """\
import json

print("plateau:", json.dumps(summary["plateau"], indent=1))
print("weight decay:", json.dumps(summary["weight_decay"], indent=1))""",
        "outro": (
            "The learning rate halves only after the validation loss has stalled, and "
            "until then the run is identical to the constant one. Delayed weight decay "
            "is exactly the undecayed run until the switch; afterwards it ends with "
            "smaller weights and a lower validation loss than no decay."
        ),
    },
    "batch_norm": {
        "title": "Batch normalisation: a sensitivity grid",
        "intro": (
            "A deep sigmoid MLP trained with plain SGD over a grid of initial weight "
            "scales and learning rates, once without and once with batch norm after "
            "every hidden layer. Each grid is one vectorised sweep (`jaxdl.sweep.sweep`): "
            "init scale and learning rate are traced numbers, so the whole grid is one "
            "compiled program."
        ),
        "plots": ["grid.png"],
        "numbers": """\
for label, d in summary["structures"].items():
    print(
        f"{label:20s} mean accuracy {d['mean_accuracy']:.3f}, worst "
        f"{d['worst_accuracy']:.3f}, members above 50%: {d['members_above_50_percent']}"
        f" of {summary['members']}"
    )""",
        "outro": (
            "Without batch norm only a few corners of the grid train at all; with it most "
            "of the grid does: normalising each layer's pre-activations makes training "
            "far less sensitive to the initial scale and the learning rate."
        ),
    },
    "cnn": {
        "title": "A CNN on MNIST",
        "intro": (
            "Two 5×5 convolutions with ReLU and 2×2 max pooling, a 512-unit dense layer "
            "with dropout, softmax output (`jaxdl.CNN(features=(32, 64), kernel_size=5, "
            "dense=(512,))`), against the course's 784-500-500-10 MLP on the same images "
            "for the same epochs. The convolutions share their weights across the image, "
            "so the CNN learns more from each image."
        ),
        "plots": ["curves.png", "filters.png"],
        "numbers": """\
for name in summary["test_accuracy"]:
    print(
        f"{name.upper()}: test error {summary['test_error_percent'][name]:.2f}%  "
        f"({summary['parameters'][name]:,} parameters, "
        f"{summary['samples_per_second'][name]:,.0f} images/s)"
    )""",
        "outro": (
            "On the same images and epochs the CNN's error is well below the MLP's. The "
            "full run (`python experiments/cnn.py`, 12 epochs on all 50,000 images) "
            "reaches the test error listed in `experiments/README.md`."
        ),
    },
    "dropout_scale": {
        "title": "Dropout at scale: 784-800-800-10 with max-norm",
        "intro": (
            "The dropout net of Hinton et al. (2012) and Srivastava et al. (2014): ReLU "
            "layers of 800 units, dropout 0.2 on the pixels and 0.5 on the hidden "
            "units, and a max-norm constraint on every unit's incoming weights, against "
            "the same net without dropout. Both are members of one vectorised sweep. "
            "The quick run below uses narrower layers and a slice of the data."
        ),
        "plots": ["curves.png"],
        "numbers": """\
for label, err in summary["test_error_percent"].items():
    print(f"{label:28s} test error {err:.2f}%  (best epoch {summary['best_epoch'][label]})")
print(f"largest unit norm {summary['largest_unit_norm']:.3f} <= {summary['max_norm']}")""",
        "outro": (
            "With dropout the training error (masks on) stays above the validation "
            "error of the deterministic net, the sign that the net is not memorising. "
            "Dropout needs many epochs to pay off: in the full run (100 epochs on "
            "50,000 images, see `experiments/README.md`) it lowers the test error; in "
            "a short run on a slice it can still be behind."
        ),
    },
    "your_own_model": {
        "title": "Your own model: a residual MLP trained, swept and seen as an ensemble",
        "intro": (
            "jaxdl trains any Flax module whose `__call__(x, *, train)` returns logits. "
            "The study defines a residual MLP with batch norm and `jaxdl.Dropout` in its "
            "script, trains it on MNIST, sweeps learning rate × dropout rate × 3 seeds "
            "as one compiled program (the dropout rate is a traced number), and measures "
            "its dropout ensemble: the Monte-Carlo average of k subnetworks against "
            "weight scaling."
        ),
        "plots": ["curves.png", "sweep.png", "k_curve.png", "subnetworks.png"],
        "numbers": """\
print(f"test accuracy {summary['test_accuracy']:.4f} after {summary['epochs']} epochs")
s = summary["sweep"]
print(f"sweep: {s['members']} members, {s['compiles']} compile(s), {s['seconds']:.1f} s")
for setting, acc in s["mean_test_accuracy"].items():
    print(f"  {setting:24s} mean test accuracy {acc:.4f}")
e = summary["ensemble"]
print(f"weight scaling: test error {e['weight_scaling_error_percent']:.2f}%")
for k, err in e["mc_error_percent"].items():
    print(f"MC average of k={k:>3s} subnetworks: test error {err:.2f}%")""",
        "outro": (
            "Nothing in the module is jaxdl's but `jaxdl.Dropout`: the same class runs "
            "under `model.apply` with Flax's `dropout` rng, and under jaxdl with traced "
            "rates and masks the library draws, which is what lets a sweep vary the rate "
            "and the ensemble view evaluate one subnetwork at a time."
        ),
    },
    "ensemble_k_curve": {
        "title": "Dropout as an ensemble: k subnetworks against weight scaling",
        "intro": (
            "A net trained with dropout holds 2^M subnetworks that share its weights. "
            "Weight scaling (the deterministic pass) is said to approximate their "
            "ensemble. `jaxdl.ensemble` measures the ensemble itself: the average of k "
            "sampled subnetworks for every k = 1…K in one compiled pass, over several "
            "independent samples (Srivastava et al. 2014, Fig. 11)."
        ),
        "plots": ["k_curve.png", "subnetworks.png"],
        "numbers": """\
print(f"weight scaling: test error {summary['weight_scaling_error_percent']:.2f}%")
for k, err in summary["mc_error_percent"].items():
    print(f"MC average of k={k:>4s} subnetworks: test error {err:.2f}%")
print("first k that stays at least as good:", summary["k_matching_weight_scaling"])
print("mean predictive entropy:", summary["mean_entropy"])""",
        "outro": (
            "One subnetwork alone is far worse than the whole net; averaging a few tens "
            "of them catches up with weight scaling. Off the training distribution "
            "(noise, rotated digits) the subnetworks disagree more and the predictive "
            "entropy rises: the Monte-Carlo dropout estimate of uncertainty."
        ),
    },
}


def build(name: str, spec: dict) -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(f"# {spec['title']}\n\n{spec['intro']}"),
        new_code_cell(SETUP.replace("@NAME@", name)),
        new_code_cell(RUN.replace("@NAME@", name)),
        new_code_cell("\n".join(f'display(Image(filename=out / "{p}"))' for p in spec["plots"])),
        new_code_cell(spec["numbers"]),
        new_markdown_cell(spec["outro"]),
    ]
    for i, cell in enumerate(cells):
        cell["id"] = f"{name}-{i}"  # stable ids: regenerating gives the same bytes
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="fail if a notebook is out of date")
    a = p.parse_args(argv)
    stale = []
    for name, spec in STUDIES.items():
        path = HERE / f"{name}.ipynb"
        text = nbformat.writes(build(name, spec)) + "\n"
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.name)
        if not a.check:
            path.write_text(text)
    if a.check and stale:
        print("out of date:", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
