"""Vanishing gradients: 8-hidden-layer sigmoid vs ReLU vs maxout MLPs on MNIST.

The same deep MLP (same widths, Xavier initialisation, plain SGD) is trained with each
activation. Once per epoch ``fit`` records the norm of the loss gradient of every layer
on a fixed probe batch (``grad_norm/layer_i``). With sigmoid, whose derivative is at
most 1/4, the gradient shrinks on its way back to the input: the layers near the input
get gradients orders of magnitude smaller than the layers near the output, and learn
slowest. ReLU and maxout pass the gradient back with a derivative of 1 where active.

The headline number per activation is the ratio of the first hidden layer's gradient
norm to the last hidden layer's (mean over epochs), and the test accuracy.

Writes ``grad_norms.png`` (per-layer gradient norm against depth and against epoch),
``accuracy.png`` and ``results.json`` into ``--out``.
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

ACTIVATIONS = ("sigmoid", "relu", "maxout")
DEPTH = 8


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run on a slice (CI)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/vanishing_gradients"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = jaxdl.load("mnist")
    train, valid, test = splits.train, splits.valid, splits.test
    width, epochs, lr = 256, 10, 0.1
    if a.quick:
        train = jaxdl.data.subset(train, 2000)
        valid, test = jaxdl.data.subset(valid, 500), jaxdl.data.subset(test, 500)
        width, epochs = 32, 3
    runs = {}
    for act in ACTIVATIONS:
        model = jaxdl.MLP(hidden=(width,) * DEPTH, activation=act)
        t0 = time.perf_counter()
        state, history = jaxdl.fit(
            model,
            jaxdl.make_optimizer("sgd", learning_rate=lr),
            train,
            epochs=epochs,
            batch_size=100,
            key=a.seed,
            validation=valid,
        )
        norms = np.array([history[f"grad_norm/layer_{i}"] for i in range(DEPTH)])  # (L, E)
        runs[act] = {
            "grad_norm": norms.tolist(),
            "grad_norm_output": history["grad_norm/output"],
            "first_to_last_ratio": float(np.mean(norms[0] / norms[-1])),
            "val_accuracy": history["val_accuracy"],
            "train_loss": history["train_loss"],
            "test_accuracy": jaxdl.evaluate(model, state, test)["accuracy"],
            "seconds": time.perf_counter() - t0,
        }
    summary = {
        "first_to_last_ratio": {k: r["first_to_last_ratio"] for k, r in runs.items()},
        "test_accuracy": {k: r["test_accuracy"] for k, r in runs.items()},
        "runs": runs,
        "depth": DEPTH,
        "width": width,
        "epochs": epochs,
        "learning_rate": lr,
        "train_examples": len(train.x),
        "test_examples": len(test.x),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    _plot_grad_norms(runs, a.out / "grad_norms.png")
    _plot_accuracy(runs, a.out / "accuracy.png")
    report.write_json(a.out / "results.json", summary)
    print(json.dumps(report.to_jsonable(summary)))
    return summary


def _plot_grad_norms(runs, path: Path) -> None:
    fig = Figure(figsize=(5 * (1 + len(runs)), 4.2), layout="tight")
    axes = fig.subplots(1, 1 + len(runs))
    layers = np.arange(1, DEPTH + 1)
    for act, r in runs.items():
        axes[0].plot(layers, np.mean(r["grad_norm"], axis=1), marker="o", label=act)
    axes[0].set(
        title="Gradient norm by depth (mean over epochs)",
        xlabel="hidden layer (1 = next to the input)",
        ylabel="‖∂loss/∂W‖",
        yscale="log",
    )
    axes[0].legend()
    for ax, (act, r) in zip(axes[1:], runs.items(), strict=True):
        norms = np.asarray(r["grad_norm"])
        epochs = np.arange(1, norms.shape[1] + 1)
        for i in range(DEPTH):
            ax.plot(epochs, norms[i], color=f"C{i}", label=f"layer {i + 1}")
        ax.set(title=f"{act}: per layer, per epoch", xlabel="epoch", ylabel="‖∂loss/∂W‖",
               yscale="log")  # fmt: skip
        ax.legend(fontsize="x-small", ncol=2)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    report.save_figure(fig, path)


def _plot_accuracy(runs, path: Path) -> None:
    fig = Figure(figsize=(6, 4.2), layout="tight")
    ax = fig.subplots()
    for act, r in runs.items():
        acc = r["val_accuracy"]
        ax.plot(np.arange(1, len(acc) + 1), acc, marker="o", label=act)
    ax.set(title=f"Validation accuracy, {DEPTH} hidden layers, SGD", xlabel="epoch")
    ax.set(ylabel="accuracy", ylim=(0, 1))
    ax.grid(True, alpha=0.3)
    ax.legend()
    report.save_figure(fig, path)


if __name__ == "__main__":
    main()
