"""Loss choice: the course's Keras demo that stalls, and the changes that fix it.

The demo: 10,000 MNIST images, a 784-689-689-689-10 sigmoid MLP, softmax outputs trained
with mean squared error and plain SGD (learning rate 0.1, batch 100, 20 epochs). It
stalls near chance (about 11% training accuracy): with MSE on softmax outputs the
gradient is tiny when the output is confidently wrong, and with sigmoid hidden layers it
shrinks further on its way back. Changing one thing at a time:

1. ``sigmoid + mse + sgd`` (the demo);
2. ``sigmoid + cross-entropy + sgd``: the loss alone makes it learn;
3. ``relu + cross-entropy + sgd``;
4. ``relu + cross-entropy + adam`` (learning rate 1e-3): the course's working recipe.

``--quick`` trains 2,000 images for 5 epochs, 128 wide, and only conditions 1 and 4.

Writes ``curves.png`` (training loss and accuracy per epoch), ``results.json``.
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

# label: (activation, loss, optimizer, learning rate)
CONDITIONS = {
    "sigmoid + mse + sgd": ("sigmoid", "mse", "sgd", 0.1),
    "sigmoid + cross-entropy + sgd": ("sigmoid", "cross_entropy", "sgd", 0.1),
    "relu + cross-entropy + sgd": ("relu", "cross_entropy", "sgd", 0.1),
    "relu + cross-entropy + adam": ("relu", "cross_entropy", "adam", 1e-3),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run with narrow layers (CI)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/loss_choice"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = jaxdl.load("mnist")
    n_train, width, epochs, test = 10000, 689, 20, splits.test
    if a.quick:
        n_train, width, epochs, test = 2000, 128, 5, jaxdl.data.subset(test, 1000)
    train = jaxdl.data.subset(splits.train, n_train)
    # --quick keeps the two ends of the ladder (the demo and the working recipe).
    labels = [*CONDITIONS][:: len(CONDITIONS) - 1] if a.quick else [*CONDITIONS]
    runs = {}
    for label in labels:
        act, loss, opt, lr = CONDITIONS[label]
        model = jaxdl.MLP(hidden=(width,) * 3, activation=act)
        t0 = time.perf_counter()
        state, history = jaxdl.fit(
            model,
            jaxdl.make_optimizer(opt, learning_rate=lr),
            train,
            epochs=epochs,
            batch_size=100,
            key=a.seed,
            loss=loss,
        )
        runs[label] = {
            "train_accuracy": history["train_accuracy"],
            "train_loss": history["train_loss"],
            "final_train_accuracy": history["train_accuracy"][-1],
            "test_accuracy": jaxdl.evaluate(model, state, test)["accuracy"],
            "seconds": time.perf_counter() - t0,
        }
    summary = {
        "final_train_accuracy": {k: r["final_train_accuracy"] for k, r in runs.items()},
        "test_accuracy": {k: r["test_accuracy"] for k, r in runs.items()},
        "runs": runs,
        "train_examples": n_train,
        "test_examples": len(test.x),
        "hidden": [width] * 3,
        "epochs": epochs,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    _plot(runs, a.out / "curves.png")
    report.write_json(a.out / "results.json", summary)
    print(json.dumps(report.to_jsonable(summary)))
    return summary


def _plot(runs, path: Path) -> None:
    fig = Figure(figsize=(11, 4.2), layout="tight")
    axes = fig.subplots(1, 2)
    for label, r in runs.items():
        e = np.arange(1, len(r["train_loss"]) + 1)
        axes[0].plot(e, r["train_loss"], marker="o", ms=3, label=label)
        axes[1].plot(e, r["train_accuracy"], marker="o", ms=3, label=label)
    axes[0].set(title="Training loss (each run's own loss)", xlabel="epoch", ylabel="loss",
                yscale="log")  # fmt: skip
    axes[1].set(title="Training accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    report.save_figure(fig, path)


if __name__ == "__main__":
    main()
