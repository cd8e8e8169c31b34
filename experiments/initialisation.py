"""Initialisation: what the first draw of the weights does to a deep MLP on MNIST.

Five conditions, each a 5-hidden-layer MLP trained for the same budget (momentum SGD):

- ``zero``: every kernel 0 (sigmoid). All hidden units of a layer compute the same
  function and get the same gradient, so they stay identical for ever (symmetry).
- ``small normal`` (σ = 0.01, tanh): each layer shrinks its input, so the deep layers'
  activations collapse towards 0 and so do their gradients.
- ``large normal`` (σ = 1, sigmoid): pre-activations are huge, sigmoid saturates at 0/1
  where its derivative is ~0, so the gradients vanish.
- ``xavier`` (Glorot normal, tanh): variance kept across layers for sigmoid/tanh.
- ``he`` (He normal, ReLU): variance kept across layers for ReLU.

Zero, small and large are one model with ``weight_init="normal"`` and a traced
``init_scale`` of 0, 0.01 and 1 per activation; measured per layer: the activations'
standard deviation and saturated fraction at initialisation (histograms) and after
training, the spread between the hidden units' weights, and the test accuracy.

Writes ``histograms.png``, ``act_std.png``, ``accuracy.png`` and ``results.json``.
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

DEPTH = 5
# label: (weight_init, activation, init_scale or None for the initialiser's own)
CONDITIONS = {
    "zero": ("normal", "sigmoid", 0.0),
    "small normal": ("normal", "tanh", 0.01),
    "large normal": ("normal", "sigmoid", 1.0),
    "xavier": ("xavier_normal", "tanh", None),
    "he": ("he_normal", "relu", None),
}


def activations(model, params, x) -> list[np.ndarray]:
    """Each hidden layer's activations (N, width) of ``model`` with ``params`` on ``x``."""
    _, inter = model.apply({"params": params}, x, mutable=["intermediates"])
    inter = inter["intermediates"]
    return [np.asarray(inter[f"act_layer_{i}"][0]) for i in range(len(model.hidden))]


def saturated(act: str, h: np.ndarray) -> float:
    """Fraction of saturated activations: sigmoid outside (0.01, 0.99), tanh |h| > 0.99."""
    if act == "sigmoid":
        return float(((h < 0.01) | (h > 0.99)).mean())
    if act == "tanh":
        return float((np.abs(h) > 0.99).mean())
    return 0.0


def unit_spread(params) -> list[float]:
    """Per hidden layer: the largest difference between any unit's incoming weights and
    unit 0's (0 when every unit of the layer is the same function)."""
    return [
        float(np.abs(k - k[:, :1]).max())
        for k in (np.asarray(params[f"layer_{i}"]["kernel"]) for i in range(DEPTH))
    ]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run on a slice (CI)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/initialisation"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = jaxdl.load("mnist")
    train, valid, test = splits.train, splits.valid, splits.test
    width, epochs = 256, 5
    if a.quick:
        train = jaxdl.data.subset(train, 2000)
        valid, test = jaxdl.data.subset(valid, 500), jaxdl.data.subset(test, 500)
        width, epochs = 64, 3
    probe = train.x[:1000]
    opt = jaxdl.make_optimizer("momentum", learning_rate=0.01, momentum=0.9)
    runs = {}
    for label, (init, act, scale) in CONDITIONS.items():
        model = jaxdl.MLP(hidden=(width,) * DEPTH, activation=act, weight_init=init)
        kw = dict(epochs=epochs, batch_size=100, init_scale=scale)
        t0 = time.perf_counter()
        setup, hp = jaxdl.prepare(jaxdl.RunConfig.of(model, opt, **kw), train, valid)
        # The initial state fit starts from (the same cached program and key).
        first = jaxdl.train.programs(setup).init(jaxdl.train.as_key(a.seed), hp)
        state, history = jaxdl.fit(model, opt, train, validation=valid, key=a.seed, **kw)
        h0 = activations(model, first.params, probe)
        h1 = activations(model, state.params, probe)
        runs[label] = {
            "weight_init": init,
            "activation": act,
            "init_scale": scale,
            "act_std_init": [float(h.std()) for h in h0],
            "act_mean_init": [float(h.mean()) for h in h0],
            "saturated_init": [saturated(act, h) for h in h0],
            "act_std_trained": [float(h.std()) for h in h1],
            "unit_spread_trained": unit_spread(state.params),
            "kernel_norm_trained": [
                float(np.linalg.norm(state.params[f"layer_{i}"]["kernel"])) for i in range(DEPTH)
            ],
            "grad_norm_first_epoch": [history[f"grad_norm/layer_{i}"][0] for i in range(DEPTH)],
            "val_accuracy": history["val_accuracy"],
            "test_accuracy": jaxdl.evaluate(model, state, test)["accuracy"],
            "seconds": time.perf_counter() - t0,
            "histograms": [np.histogram(h, bins=40)[0].tolist() for h in h0],
            "_init_acts": h0,
        }
    a.out.mkdir(parents=True, exist_ok=True)
    _plot_histograms(runs, a.out / "histograms.png")
    for r in runs.values():
        del r["_init_acts"]
    _plot_std(runs, a.out / "act_std.png")
    _plot_accuracy(runs, a.out / "accuracy.png")
    summary = {
        "test_accuracy": {k: r["test_accuracy"] for k, r in runs.items()},
        "deepest_act_std_init": {k: r["act_std_init"][-1] for k, r in runs.items()},
        "runs": runs,
        "depth": DEPTH,
        "width": width,
        "epochs": epochs,
        "train_examples": len(train.x),
        "test_examples": len(test.x),
    }
    report.write_json(a.out / "results.json", summary)
    print(json.dumps(report.to_jsonable(summary)))
    return summary


def _plot_histograms(runs, path: Path) -> None:
    fig = Figure(figsize=(2.6 * DEPTH, 2.1 * len(runs)), layout="tight")
    axes = fig.subplots(len(runs), DEPTH, squeeze=False)
    for row, (label, r) in zip(axes, runs.items(), strict=True):
        lo, hi = (0.0, 1.0) if r["activation"] == "sigmoid" else (-1.0, 1.0)
        if r["activation"] == "relu":
            lo, hi = 0.0, max(float(np.percentile(r["_init_acts"][0], 99)), 1e-3)
        for i, ax in enumerate(row):
            ax.hist(r["_init_acts"][i].ravel(), bins=40, range=(lo, hi), color=f"C{i}")
            ax.set_yticks([])
            ax.set_title(f"{label}: layer {i + 1}", fontsize="small")
            ax.set_xlabel("activation", fontsize="x-small")
            if i == 0:
                ax.set_ylabel("count", fontsize="x-small")
    fig.suptitle("Hidden activations at initialisation (1000 training images)")
    report.save_figure(fig, path)


def _plot_std(runs, path: Path) -> None:
    fig = Figure(figsize=(11, 4.2), layout="tight")
    axes = fig.subplots(1, 2)
    layers = np.arange(1, DEPTH + 1)
    for label, r in runs.items():
        axes[0].plot(layers, r["act_std_init"], marker="o", label=label)
        axes[1].plot(layers, r["grad_norm_first_epoch"], marker="o", label=label)
    axes[0].set(title="Activation std at initialisation", xlabel="hidden layer",
                ylabel="std of activations", yscale="log")  # fmt: skip
    axes[1].set(title="Gradient norm after epoch 1", xlabel="hidden layer",
                ylabel="‖∂loss/∂W‖", yscale="log")  # fmt: skip
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    report.save_figure(fig, path)


def _plot_accuracy(runs, path: Path) -> None:
    fig = Figure(figsize=(6, 4.2), layout="tight")
    ax = fig.subplots()
    for label, r in runs.items():
        acc = r["val_accuracy"]
        ax.plot(np.arange(1, len(acc) + 1), acc, marker="o", label=label)
    ax.set(title="Validation accuracy, same budget", xlabel="epoch", ylabel="accuracy")
    ax.set(ylim=(0, 1))
    ax.grid(True, alpha=0.3)
    ax.legend()
    report.save_figure(fig, path)


if __name__ == "__main__":
    main()
