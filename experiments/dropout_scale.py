"""Dropout MLP at scale: 784-800-800-10 with dropout and max-norm, against the same net
without dropout.

The setting of Hinton et al. (2012) and Srivastava et al. (2014, JMLR, Table 2): ReLU
hidden layers of 800 units, dropout 0.2 on the pixels and 0.5 on the hidden units, and a
max-norm constraint on every unit's incoming weights (radius 3.5), against the same net
with the same constraint and no dropout. Both are members of one vectorised sweep (one
compiled program): Adam 1e-3 with a warm-up-and-cosine schedule over the run, batch
100, 100 epochs on the 50,000 training images; the parameters of the best
validation-accuracy epoch are kept and tested on the 10,000 test images. For nets of
this family Hinton et al. report about 1.3% test error and Srivastava et al. 1.0-1.25%,
both after far longer training (thousands of epochs of momentum SGD).

``--quick`` trains 256-256 nets on 5,000 images for 8 epochs.

Writes ``curves.png`` (training and validation error per epoch, both members),
``results.json`` (test errors, best epochs, the largest unit norm under the constraint).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
from matplotlib.figure import Figure

import jaxdl
from jaxdl import report

RADIUS = 3.5
CONDITIONS = {
    "dropout 0.2/0.5 + max-norm": {"dropout": [0.2, 0.5, 0.5]},
    "max-norm only": {"dropout": [0.0, 0.0, 0.0]},
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run with narrow layers (CI)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/dropout_scale"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="default: 100 (quick: 8)")
    a = p.parse_args(argv)
    splits = jaxdl.load("mnist")
    train, valid, test = splits.train, splits.valid, splits.test
    hidden, epochs = (800, 800), a.epochs or 100
    if a.quick:
        train = jaxdl.data.subset(train, 5000)
        valid, test = jaxdl.data.subset(valid, 2000), jaxdl.data.subset(test, 2000)
        hidden, epochs = (256, 256), a.epochs or 8
    model = jaxdl.MLP(hidden=hidden, activation="relu", weight_init="he_normal")
    optimizer = jaxdl.make_optimizer(
        "adam", learning_rate=1e-3, schedule="warmup_cosine", warmup_epochs=1.0,
        lr_min_ratio=0.01, max_norm=RADIUS,
    )  # fmt: skip
    t0 = time.perf_counter()
    result = jaxdl.sweep.sweep(
        model,
        optimizer,
        train,
        list(CONDITIONS.values()),
        seeds=[a.seed],
        epochs=epochs,
        batch_size=100,
        validation=valid,
        test=test,
        early_stopping=jaxdl.EarlyStopping(monitor="val_accuracy", patience=None),
    )
    seconds = time.perf_counter() - t0
    kernels = {k: np.asarray(v["kernel"]) for k, v in result.states.params.items()}
    largest = max(float(np.sqrt((w**2).sum(axis=1)).max()) for w in kernels.values())
    hist = result.history
    conditions = {
        label: {
            "test_error_percent": 100 * (1 - row["test_accuracy"]),
            "test_accuracy": row["test_accuracy"],
            "best_epoch": row["best_epoch"],
            "best_val_accuracy": row["best_val_accuracy"],
            "final_train_accuracy_while_training": float(hist["train_accuracy"][i, -1]),
            "val_error_percent": (100 * (1 - hist["val_accuracy"][i])).tolist(),
            "train_error_percent": (100 * (1 - hist["train_accuracy"][i])).tolist(),
        }
        for i, (label, row) in enumerate(zip(CONDITIONS, result.rows, strict=True))
    }
    summary = {
        "test_error_percent": {k: c["test_error_percent"] for k, c in conditions.items()},
        "best_epoch": {k: c["best_epoch"] for k, c in conditions.items()},
        "conditions": conditions,
        "max_norm": RADIUS,
        "largest_unit_norm": largest,
        "hidden": list(hidden),
        "epochs": epochs,
        "train_examples": len(train.x),
        "test_examples": len(test.x),
        "compiles": result.compiles,
        "seconds": seconds,
        "model_samples_per_second": result.samples_per_second,
        "device": str(jax.devices()[0].device_kind),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    _plot(conditions, hidden, a.out / "curves.png")
    report.write_json(a.out / "results.json", summary)
    print(json.dumps(report.to_jsonable(summary)))
    return summary


def _plot(conditions: dict, hidden, path: Path) -> None:
    fig = Figure(figsize=(7, 4.4), layout="tight")
    ax = fig.subplots()
    for (label, c), color in zip(conditions.items(), ("C0", "C3"), strict=False):
        e = np.arange(1, len(c["val_error_percent"]) + 1)
        ax.plot(e, c["val_error_percent"], color=color,
                label=f"{label}: validation (test {c['test_error_percent']:.2f}%)")  # fmt: skip
        masks = " (masks on)" if "dropout" in label else ""
        ax.plot(e, c["train_error_percent"], color=color, ls="--", alpha=0.7,
                label=f"{label}: training{masks}")  # fmt: skip
    net = "-".join(map(str, (784, *hidden, 10)))
    ax.set(title=f"Error per epoch, {net} ReLU", xlabel="epoch", ylabel="error (%)",
           yscale="log")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    report.save_figure(fig, path)


if __name__ == "__main__":
    main()
