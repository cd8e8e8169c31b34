"""Seeing inside a network: first-layer weights, activation histograms, dead ReLUs.

A 784-256-256-10 ReLU MLP is trained on MNIST with Adam twice: at the usual learning
rate (1e-3) and at a high one (3e-2); the two runs share one compiled program (the
learning rate is a traced number). Shown:

- the first layer's weights as 28×28 images (one per hidden unit), at initialisation and
  after training: strokes appear over the initial noise, and at the high rate most
  units turn negative over the whole digit area (they are dead);
- each hidden layer's activation histogram after every epoch (1,000 training images);
- the fraction of dead ReLUs (never positive on those images) per layer and epoch, from
  the ``dead_fraction/layer_i`` history keys: large steps kill many more units.

Writes ``weights.png``, ``histograms.png``, ``dead_relu.png`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

import jaxdl
from jaxdl import report

RATES = {"lr 1e-3": 1e-3, "lr 3e-2": 3e-2}
BINS = np.linspace(0.0, 4.0, 41)  # ReLU outputs; values above 4 go into the last bin
TILES = 64  # first-layer units drawn


def hidden_activations(model, params, x) -> list[np.ndarray]:
    _, inter = model.apply({"params": params}, x, mutable=["intermediates"])
    inter = inter["intermediates"]
    return [np.asarray(inter[f"act_layer_{i}"][0]) for i in range(len(model.hidden))]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run on a slice (CI)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/seeing_inside"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = jaxdl.load("mnist")
    train, test, epochs = splits.train, splits.test, 10
    if a.quick:
        train, test, epochs = jaxdl.data.subset(train, 5000), jaxdl.data.subset(test, 1000), 4
    model = jaxdl.MLP(hidden=(256, 256))
    probe = train.x[:1000]
    runs, weights = {}, {}
    for label, lr in RATES.items():
        opt = jaxdl.make_optimizer("adam", learning_rate=lr)
        setup, hp = jaxdl.prepare(
            jaxdl.RunConfig.of(model, opt, epochs=epochs, batch_size=100), train
        )
        state = jaxdl.train.programs(setup).init(jaxdl.train.as_key(a.seed), hp)
        first = np.asarray(state.params["layer_0"]["kernel"])
        hists: list[list[list[int]]] = []  # epoch → layer → counts

        def on_state(epoch, st, hists=hists):
            acts = hidden_activations(model, st.params, probe)
            hists.append([np.histogram(np.minimum(h, BINS[-1]), BINS)[0].tolist() for h in acts])

        state, history = jaxdl.train.fit_state(setup, state, hp, train, on_state=on_state)
        weights[label] = (first, np.asarray(state.params["layer_0"]["kernel"]))
        dead = {f"layer_{i}": history[f"dead_fraction/layer_{i}"] for i in range(len(model.hidden))}
        runs[label] = {
            "learning_rate": lr,
            "dead_fraction": dead,
            "final_dead_fraction": {k: v[-1] for k, v in dead.items()},
            "near_zero_fraction": [h[0] / sum(h) for h in hists[-1]],  # activations < 0.1
            "histograms": hists,
            "train_accuracy": history["train_accuracy"],
            "test_accuracy": jaxdl.evaluate(model, state, test)["accuracy"],
            "first_layer_change": float(
                np.linalg.norm(weights[label][1] - first) / np.linalg.norm(first)
            ),
        }
    summary = {
        "final_dead_fraction": {k: r["final_dead_fraction"] for k, r in runs.items()},
        "test_accuracy": {k: r["test_accuracy"] for k, r in runs.items()},
        "runs": runs,
        "bins": BINS.tolist(),
        "epochs": epochs,
        "train_examples": len(train.x),
        "test_examples": len(test.x),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    _plot_weights(weights, a.out / "weights.png")
    _plot_histograms(runs, a.out / "histograms.png")
    _plot_dead(runs, a.out / "dead_relu.png")
    report.write_json(a.out / "results.json", summary)
    print(json.dumps(report.to_jsonable(summary)))
    return summary


def _tile(kernel: np.ndarray) -> np.ndarray:
    """The first ``TILES`` units' incoming weights as one 8×8 mosaic of 28×28 images."""
    side = int(np.sqrt(TILES))
    w = kernel[:, :TILES].T.reshape(side, side, 28, 28)
    w = w / (np.abs(w).max(axis=(2, 3), keepdims=True) + 1e-12)  # each unit on its own scale
    w = np.pad(w, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=np.nan)
    return w.transpose(0, 2, 1, 3).reshape(side * 30, side * 30)


def _plot_weights(weights, path: Path) -> None:
    first_label = next(iter(weights))
    panels = [("initialisation", weights[first_label][0])]
    panels += [(f"trained, {label}", w[1]) for label, w in weights.items()]
    fig = Figure(figsize=(4.5 * len(panels), 4.8), layout="tight")
    for ax, (title, k) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        ax.imshow(_tile(k), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set(title=f"First-layer weights: {title}", xticks=[], yticks=[])
    report.save_figure(fig, path)


def _plot_histograms(runs, path: Path) -> None:
    layers = len(next(iter(runs.values()))["histograms"][0])
    fig = Figure(figsize=(5.2 * layers, 3.8 * len(runs)), layout="tight")
    axes = fig.subplots(len(runs), layers, squeeze=False)
    centers = (BINS[:-1] + BINS[1:]) / 2
    for row, (label, r) in zip(axes, runs.items(), strict=True):
        epochs = len(r["histograms"])
        for i, ax in enumerate(row):
            for e, h in enumerate(r["histograms"]):
                color = (e + 1) / epochs
                ax.step(
                    centers,
                    h[i],
                    where="mid",
                    color=(color, 0.2, 1 - color),
                    label=f"epoch {e + 1}",
                )
            ax.set(title=f"{label}: hidden layer {i + 1}", xlabel="activation",
                   ylabel="count", yscale="log")  # fmt: skip
            ax.legend(fontsize="x-small")
    report.save_figure(fig, path)


def _plot_dead(runs, path: Path) -> None:
    fig = Figure(figsize=(6.5, 4.2), layout="tight")
    ax = fig.subplots()
    for j, (label, r) in enumerate(runs.items()):
        for i, (layer, v) in enumerate(r["dead_fraction"].items()):
            ax.plot(np.arange(1, len(v) + 1), v, color=f"C{j}", ls=("-", "--", ":")[i % 3],
                    marker="o", ms=3, label=f"{label}, {layer}")  # fmt: skip
    ax.set(title="Dead ReLU fraction (never positive on 1,000 images)", xlabel="epoch")
    ax.set(ylabel="fraction of units")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    report.save_figure(fig, path)


if __name__ == "__main__":
    main()
