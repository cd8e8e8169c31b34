"""The course's sanity check: a network must be able to memorise 100 training images.

Before a long run, train on a tiny slice (100 MNIST images) with no regularisation: the
training accuracy must reach 100% (if it does not, something is broken). Then show what
stops it from getting there: an L2 penalty or dropout, swept over their strengths. All
conditions are members of one vectorised sweep (one compiled program).

Reported per condition: the training accuracy while training (with dropout masks, as
Keras shows it), the accuracy of the deterministic network on the 100 training images,
and its accuracy on held-out validation images (memorising 100 images generalises poorly).

Writes ``train_accuracy.png``, ``final_accuracy.png`` and ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

import jaxdl
from jaxdl import report

# (label, member settings): no regularisation first.
CONDITIONS = [
    ("none", {"l2": 0.0, "dropout": [0.0, 0.0, 0.0]}),
    ("l2=1e-3", {"l2": 1e-3, "dropout": [0.0, 0.0, 0.0]}),
    ("l2=1e-2", {"l2": 1e-2, "dropout": [0.0, 0.0, 0.0]}),
    ("l2=1e-1", {"l2": 1e-1, "dropout": [0.0, 0.0, 0.0]}),
    ("dropout 0.2/0.5", {"l2": 0.0, "dropout": [0.2, 0.5, 0.5]}),
    ("dropout 0.5/0.8", {"l2": 0.0, "dropout": [0.5, 0.8, 0.8]}),
]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run with narrow layers (CI)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/sanity_check"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = jaxdl.load("mnist")
    train = jaxdl.data.subset(splits.train, 100)
    valid = jaxdl.data.subset(splits.valid, 1000 if a.quick else 10000)
    hidden, epochs = ((256, 256), 30) if a.quick else ((500, 500), 50)
    model = jaxdl.MLP(hidden=hidden)
    t0 = time.perf_counter()
    result = jaxdl.sweep.sweep(
        model,
        jaxdl.make_optimizer("adam", learning_rate=1e-3),
        train,
        [cfg for _, cfg in CONDITIONS],
        seeds=[a.seed],
        epochs=epochs,
        batch_size=10,
        validation=valid,
        test=train,  # the deterministic network's accuracy on the 100 training images
    )
    seconds = time.perf_counter() - t0
    labels = [label for label, _ in CONDITIONS]
    hist = result.history
    conditions = {
        label: {
            "settings": cfg,
            "train_accuracy_while_training": float(hist["train_accuracy"][i, -1]),
            "train_accuracy": row["test_accuracy"],
            "val_accuracy": float(hist["val_accuracy"][i, -1]),
            "train_loss": float(hist["train_loss"][i, -1]),
        }
        for i, ((label, cfg), row) in enumerate(zip(CONDITIONS, result.rows, strict=True))
    }
    summary = {
        "memorised": conditions["none"]["train_accuracy"] == 1.0,
        "conditions": conditions,
        "hidden": list(hidden),
        "epochs": epochs,
        "train_examples": len(train.x),
        "val_examples": len(valid.x),
        "compiles": result.compiles,
        "seconds": seconds,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    _plot_curves(hist, labels, a.out / "train_accuracy.png")
    _plot_final(conditions, a.out / "final_accuracy.png")
    report.write_json(a.out / "results.json", summary)
    print(json.dumps(report.to_jsonable(summary)))
    return summary


def _plot_curves(hist, labels, path: Path) -> None:
    fig = Figure(figsize=(11, 4.2), layout="tight")
    axes = fig.subplots(1, 2)
    epochs = np.arange(1, hist["train_accuracy"].shape[1] + 1)
    for i, label in enumerate(labels):
        axes[0].plot(epochs, hist["train_accuracy"][i], label=label)
        axes[1].plot(epochs, hist["train_loss"][i], label=label)
    axes[0].set(title="Training accuracy on 100 images", xlabel="epoch", ylabel="accuracy")
    axes[1].set(title="Training loss (data term)", xlabel="epoch", ylabel="loss", yscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    report.save_figure(fig, path)


def _plot_final(conditions, path: Path) -> None:
    fig = Figure(figsize=(8, 4.2), layout="tight")
    ax = fig.subplots()
    labels = list(conditions)
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [conditions[k]["train_accuracy"] for k in labels], 0.4, label="train (100)")
    ax.bar(x + 0.2, [conditions[k]["val_accuracy"] for k in labels], 0.4, label="validation")
    ax.set_xticks(x, labels, rotation=20)
    ax.set(title="Final accuracy of the deterministic network", ylabel="accuracy", ylim=(0, 1.05))
    ax.axhline(1.0, color="gray", linestyle="--")
    ax.legend()
    report.save_figure(fig, path)


if __name__ == "__main__":
    main()
