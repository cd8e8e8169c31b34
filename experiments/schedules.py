"""Schedules: halve the learning rate on a plateau; switch weight decay on late.

1. Learning rate halved on plateau. A 784-256-256-10 ReLU MLP trained with momentum SGD
   (learning rate 0.1) at a constant rate and with the ``plateau`` schedule: after
   ``patience`` epochs without a lower validation loss the rate is halved. Both runs
   are members of one sweep: the constant run is the plateau schedule with a patience
   it never reaches, so up to the first halving the two are the same run.
2. Weight decay after an under-fitting phase. On 1,000 images (which a network over-fits)
   AdamW without decay, with decay from the start, and with decay switched on at
   ``decay_start_epoch`` (the course's recipe: first make the model fit, then
   regularise). One sweep: decay is a traced number and so is its start epoch.

Measured: the learning rate per epoch, train/validation loss per epoch, the final
validation loss and accuracy, and the first layer's weight norm at the end.

Writes ``plateau.png``, ``weight_decay.png`` and ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

import jaxdl
from jaxdl import report

NEVER = 1e9  # a patience no run reaches: the rate stays constant


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run on a slice (CI)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/schedules"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = jaxdl.load("mnist")
    n_plateau, plateau_epochs, patience = 50000, 20, 2
    decay_epochs, decay_start, weight_decay = 40, 10, 1.0
    valid = splits.valid
    if a.quick:
        n_plateau, plateau_epochs, patience = 2000, 8, 1
        decay_epochs, decay_start = 12, 4
        valid = jaxdl.data.subset(valid, 1000)
    model = jaxdl.MLP(hidden=(256, 256))

    plateau = jaxdl.sweep.sweep(
        model,
        jaxdl.make_optimizer("momentum", schedule="plateau", learning_rate=0.1, momentum=0.9),
        jaxdl.data.subset(splits.train, n_plateau),
        [{"lr_patience": NEVER}, {"lr_patience": float(patience)}],
        seeds=[a.seed],
        epochs=plateau_epochs,
        validation=valid,
    )
    decay_configs = {
        "no decay": {"weight_decay": 0.0},
        "decay from the start": {"weight_decay": weight_decay, "decay_start_epoch": 0.0},
        f"decay from epoch {decay_start}": {
            "weight_decay": weight_decay,
            "decay_start_epoch": float(decay_start),
        },
    }
    decay = jaxdl.sweep.sweep(
        model,
        jaxdl.make_optimizer("adamw", learning_rate=1e-3),
        jaxdl.data.subset(splits.train, 1000),
        list(decay_configs.values()),
        seeds=[a.seed],
        epochs=decay_epochs,
        validation=valid,
    )
    curves = ("learning_rate", "train_loss", "val_loss", "train_accuracy", "val_accuracy")
    plateau_runs = {
        label: {k: plateau.history[k][i].tolist() for k in curves}
        for i, label in enumerate(("constant", "halved on plateau"))
    }
    kernel = np.asarray(decay.states.params["layer_0"]["kernel"])
    decay_runs = {
        label: {
            **{k: decay.history[k][i].tolist() for k in curves},
            "first_layer_norm": float(np.linalg.norm(kernel[i])),
        }
        for i, label in enumerate(decay_configs)
    }
    summary = {
        "plateau": {
            label: {
                "final_val_loss": r["val_loss"][-1],
                "final_val_accuracy": r["val_accuracy"][-1],
                "final_learning_rate": r["learning_rate"][-1],
                "halvings": int(round(np.log2(r["learning_rate"][0] / r["learning_rate"][-1]))),
            }
            for label, r in plateau_runs.items()
        },
        "weight_decay": {
            label: {
                "final_val_loss": r["val_loss"][-1],
                "final_val_accuracy": r["val_accuracy"][-1],
                "final_train_accuracy": r["train_accuracy"][-1],
                "first_layer_norm": r["first_layer_norm"],
            }
            for label, r in decay_runs.items()
        },
        "plateau_runs": plateau_runs,
        "decay_runs": decay_runs,
        "patience": patience,
        "decay_start_epoch": decay_start,
        "decay_strength": weight_decay,
        "plateau_train_examples": n_plateau,
        "decay_train_examples": 1000,
        "val_examples": len(valid.x),
        "compiles": plateau.compiles + decay.compiles,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    _plot(plateau_runs, a.out / "plateau.png", "Momentum SGD, learning rate halved on plateau",
          lr_panel=True)  # fmt: skip
    _plot(decay_runs, a.out / "weight_decay.png", "AdamW on 1,000 images", start=decay_start)
    report.write_json(a.out / "results.json", summary)
    print(json.dumps(report.to_jsonable(summary)))
    return summary


def _plot(runs, path: Path, title: str, *, lr_panel: bool = False, start: int | None = None):
    n = 3 if lr_panel else 2
    fig = Figure(figsize=(5.2 * n, 4.2), layout="tight")
    axes = fig.subplots(1, n)
    for j, (label, r) in enumerate(runs.items()):
        e = np.arange(1, len(r["val_loss"]) + 1)
        axes[0].plot(e, r["train_loss"], color=f"C{j}", ls="--", label=f"{label} (train)")
        axes[0].plot(e, r["val_loss"], color=f"C{j}", label=f"{label} (validation)")
        axes[1].plot(e, r["val_accuracy"], color=f"C{j}", marker="o", ms=3, label=label)
        if lr_panel:
            axes[2].step(e, r["learning_rate"], where="mid", color=f"C{j}", label=label)
    axes[0].set(title=f"{title}: loss", xlabel="epoch", ylabel="loss", yscale="log")
    axes[1].set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy")
    if lr_panel:
        axes[2].set(title="Learning rate", xlabel="epoch", ylabel="learning rate", yscale="log")
    for ax in axes:
        if start is not None:
            ax.axvline(start + 0.5, color="gray", ls=":", label="decay switched on")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    report.save_figure(fig, path)


if __name__ == "__main__":
    main()
