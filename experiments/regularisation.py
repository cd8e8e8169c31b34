"""Under- and over-fitting on a 1,000-image MNIST training subset, and what cures it.

A 784-256-256-10 ReLU MLP (128-wide with ``--quick``) (Adam) trained on only 1,000 images memorises them: training
accuracy reaches 100% while the validation loss turns up after a few epochs. Compared,
for the same epochs:

- ``none``: no regularisation (the over-fitting baseline);
- ``l1``, ``l2``: penalties on the kernels; ``dropout``: 0.5 on the input and hidden;
  these four are members of one vectorised sweep (one compiled program);
- ``early stopping``: no regularisation, stopped when the validation loss has not
  improved for ``patience`` epochs, the best epoch's parameters restored;
- ``more data``: no regularisation, 10× the training images (4× with ``--quick``).

Measured: train/validation loss and accuracy per epoch, the final gap between training
and validation accuracy (deterministic network), and test accuracy.

Writes ``gap_curves.png``, ``final.png`` and ``results.json`` into ``--out``.
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

SWEPT = {
    "none": {"l1": 0.0, "l2": 0.0, "dropout": 0.0},
    "l1": {"l1": 1e-3, "l2": 0.0, "dropout": 0.0},
    "l2": {"l1": 0.0, "l2": 1e-2, "dropout": 0.0},
    "dropout": {"l1": 0.0, "l2": 0.0, "dropout": 0.5},
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run on a slice (CI)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/regularisation"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patience", type=int, default=None, help="default: 5 (3 with --quick)")
    a = p.parse_args(argv)
    splits = jaxdl.load("mnist")
    n_small, n_more, epochs = 1000, 10000, 60
    valid, test = jaxdl.data.subset(splits.valid, 2000), splits.test
    if a.quick:
        n_more, epochs = 4000, 15
        valid, test = jaxdl.data.subset(splits.valid, 1000), jaxdl.data.subset(test, 1000)
    small = jaxdl.data.subset(splits.train, n_small)
    more = jaxdl.data.subset(splits.train, n_more)
    patience = a.patience or (3 if a.quick else 5)
    model = jaxdl.MLP(hidden=(128, 128) if a.quick else (256, 256))
    opt = jaxdl.make_optimizer("adam", learning_rate=1e-3)
    common = dict(epochs=epochs, batch_size=100, validation=valid)
    t0 = time.perf_counter()
    swept = jaxdl.sweep.sweep(model, opt, small, list(SWEPT.values()), seeds=[a.seed], **common)
    states = [jax.tree_util.tree_map(lambda v, i=i: v[i], swept.states) for i in range(len(SWEPT))]
    histories = {
        label: {k: v[i].tolist() for k, v in swept.history.items()} for i, label in enumerate(SWEPT)
    }
    es = jaxdl.EarlyStopping(monitor="val_loss", patience=patience, restore_best=True)
    es_state, histories["early stopping"] = jaxdl.fit(
        model, opt, small, key=a.seed, early_stopping=es, **common
    )
    more_state, histories["more data"] = jaxdl.fit(model, opt, more, key=a.seed, **common)
    seconds = time.perf_counter() - t0
    finals = {}
    for label, state in zip(
        [*SWEPT, "early stopping", "more data"], [*states, es_state, more_state], strict=True
    ):
        data = more if label == "more data" else small
        tr = jaxdl.evaluate(model, state, data)
        va = jaxdl.evaluate(model, state, valid)
        finals[label] = {
            "train_accuracy": tr["accuracy"],
            "val_accuracy": va["accuracy"],
            "val_loss": va["loss"],
            "gap": tr["accuracy"] - va["accuracy"],
            "test_accuracy": jaxdl.evaluate(model, state, test)["accuracy"],
            "epochs_run": len(histories[label]["train_loss"]),
        }
    best = jaxdl.best_epoch(es_state)
    h = histories["none"]
    summary = {
        "gap": {k: f["gap"] for k, f in finals.items()},
        "test_accuracy": {k: f["test_accuracy"] for k, f in finals.items()},
        "conditions": finals,
        "early_stopping": {
            "best_epoch": best,
            "epochs_run": finals["early stopping"]["epochs_run"],
            "patience": patience,
            "best_epoch_val_loss": histories["early stopping"]["val_loss"][best - 1],
            "restored_val_loss": finals["early stopping"]["val_loss"],
        },
        "none_min_val_loss_epoch": int(np.argmin(h["val_loss"])) + 1,
        "none_final_val_loss": h["val_loss"][-1],
        "epochs": epochs,
        "train_examples": n_small,
        "more_data_examples": n_more,
        "val_examples": len(valid.x),
        "test_examples": len(test.x),
        "sweep_compiles": swept.compiles,
        "seconds": seconds,
        "histories": {k: {m: v[m] for m in _CURVES} for k, v in histories.items()},
    }
    a.out.mkdir(parents=True, exist_ok=True)
    _plot_gaps(histories, best, a.out / "gap_curves.png")
    _plot_final(finals, a.out / "final.png")
    report.write_json(a.out / "results.json", summary)
    print(json.dumps(report.to_jsonable(summary)))
    return summary


_CURVES = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")


def _plot_gaps(histories, best, path: Path) -> None:
    n = len(histories)
    fig = Figure(figsize=(3.6 * n, 6.6), layout="tight")
    axes = fig.subplots(2, n, sharey="row", squeeze=False)
    for j, (label, h) in enumerate(histories.items()):
        e = np.arange(1, len(h["train_loss"]) + 1)
        axes[0, j].plot(e, h["train_loss"], label="train")
        axes[0, j].plot(e, h["val_loss"], label="validation")
        axes[1, j].plot(e, h["train_accuracy"], label="train")
        axes[1, j].plot(e, h["val_accuracy"], label="validation")
        axes[0, j].set(title=label, yscale="log")
        axes[1, j].set(xlabel="epoch", ylim=(0.7, 1.01))
        if label == "early stopping":
            for ax in axes[:, j]:
                ax.axvline(best, color="gray", linestyle="--", label=f"restored epoch {best}")
    axes[0, 0].set(ylabel="loss")
    axes[1, 0].set(ylabel="accuracy")
    for ax in axes.ravel():
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    report.save_figure(fig, path)


def _plot_final(finals, path: Path) -> None:
    fig = Figure(figsize=(9, 4.2), layout="tight")
    ax = fig.subplots()
    labels = list(finals)
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [finals[k]["train_accuracy"] for k in labels], 0.4, label="train")
    ax.bar(x + 0.2, [finals[k]["val_accuracy"] for k in labels], 0.4, label="validation")
    ax.set_xticks(x, labels, rotation=15)
    ax.set(title="Final accuracy (deterministic network)", ylabel="accuracy", ylim=(0.7, 1.01))
    ax.legend()
    report.save_figure(fig, path)


if __name__ == "__main__":
    main()
