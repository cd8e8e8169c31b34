"""Optimizers: batch size and update rule, on MNIST and on 2-D test surfaces.

MNIST (a 784-100-10 ReLU MLP): full-batch gradient descent (one update per epoch), SGD
with batch 1 (one update per image) and mini-batch SGD (batch 100), then with batch 100
Momentum, AdaGrad, RMSProp and Adam. Training loss per epoch and per update, seconds
per epoch, test accuracy. ``--quick`` runs them all on 1,000 images for 3 epochs.

2-D surfaces: each optimizer of ``jaxdl.make_optimizer`` (its Optax transformation)
descends three functions of (x, y) for a fixed number of steps, drawn over contour plots;
measured: the value reached and the steps taken to reach a target value (``TARGETS``):

- ``saddle``: f = x² + y⁴/4 − y²/2, started next to the saddle point at the origin;
- ``ravine``: f = 0.01·x² + y², a long narrow valley (condition number 100);
- ``plateau``: f = 1 − exp(−(x² + y²)), started where the surface is almost flat.

Writes ``mnist_loss.png``, ``surfaces.png`` and ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure

import jaxdl
from jaxdl import report

SURFACES = {
    "saddle": (lambda p: p[0] ** 2 + p[1] ** 4 / 4 - p[1] ** 2 / 2, (0.5, 1e-3), (-2, 2, -2, 2)),
    "ravine": (lambda p: 0.01 * p[0] ** 2 + p[1] ** 2, (-9.0, 1.0), (-10, 2, -1.5, 1.5)),
    "plateau": (lambda p: 1 - jnp.exp(-(p[0] ** 2 + p[1] ** 2)), (2.0, 1.5), (-2.5, 2.5, -2, 2)),
}
# Reaching this value counts as done: off the saddle (the minima are at -0.25), at the
# valley floor, off the plateau.
TARGETS = {"saddle": -0.2, "ravine": 0.01, "plateau": 0.5}
# One learning rate per rule, the same on every surface.
SURFACE_OPTIMIZERS = {
    "sgd": {"learning_rate": 0.1},
    "momentum": {"learning_rate": 0.1, "momentum": 0.9},
    "adagrad": {"learning_rate": 0.5},
    "rmsprop": {"learning_rate": 0.02},
    "adam": {"learning_rate": 0.05},
}
# label: (optimizer, hyperparameters, batch size; None = the whole training set)
MNIST_RUNS = {
    "gd (full batch)": ("sgd", {"learning_rate": 0.5}, None),
    "sgd (batch 1)": ("sgd", {"learning_rate": 0.01}, 1),
    "mini-batch sgd (100)": ("sgd", {"learning_rate": 0.1}, 100),
    "momentum": ("momentum", {"learning_rate": 0.01, "momentum": 0.9}, 100),
    "adagrad": ("adagrad", {"learning_rate": 0.05}, 100),
    "rmsprop": ("rmsprop", {"learning_rate": 1e-3}, 100),
    "adam": ("adam", {"learning_rate": 1e-3}, 100),
}


@functools.partial(jax.jit, static_argnames=("f", "tx", "steps"))
def trajectory(f, tx: optax.GradientTransformation, start: jax.Array, steps: int) -> jax.Array:
    """Points (steps + 1, 2) visited by ``tx`` descending ``f`` from ``start``."""

    def body(carry, _):
        p, s = carry
        u, s = tx.update(jax.grad(f)(p), s, p)
        p = optax.apply_updates(p, u)
        return (p, s), p

    _, path = jax.lax.scan(body, (start, tx.init(start)), None, length=steps)
    return jnp.concatenate([start[None], path])


def run_surfaces(steps: int) -> dict:
    out = {}
    for surface, (f, start, _) in SURFACES.items():
        out[surface] = {}
        for name, hp in SURFACE_OPTIMIZERS.items():
            tx = jaxdl.make_optimizer(name, **hp).tx
            path = np.asarray(trajectory(f, tx, jnp.asarray(start, jnp.float32), steps))
            values = np.asarray(jax.vmap(f)(jnp.asarray(path)))
            out[surface][name] = {"path": path.tolist(), "f": values.tolist()}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run on a slice (CI)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/optimizers"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = jaxdl.load("mnist")
    n_train, epochs, test, steps = 10000, 10, splits.test, 200
    if a.quick:
        n_train, epochs, test = 1000, 3, jaxdl.data.subset(test, 1000)
    train = jaxdl.data.subset(splits.train, n_train)
    model = jaxdl.MLP(hidden=(100,))
    runs = {}
    for label in MNIST_RUNS:
        name, hp, batch = MNIST_RUNS[label]
        batch = batch or n_train
        info = jaxdl.FitInfo()
        state, history = jaxdl.fit(
            model,
            jaxdl.make_optimizer(name, **hp),
            train,
            epochs=epochs,
            batch_size=batch,
            key=a.seed,
            info=info,
        )
        runs[label] = {
            "optimizer": name,
            "hyperparams": hp,
            "batch_size": batch,
            "updates_per_epoch": -(-n_train // batch),
            "train_loss": history["train_loss"],
            "final_train_loss": history["train_loss"][-1],
            "test_accuracy": jaxdl.evaluate(model, state, test)["accuracy"],
            "seconds_per_epoch": info.train_seconds / epochs,
        }
    t0 = time.perf_counter()
    surfaces = run_surfaces(steps)
    final = {s: {n: r["f"][-1] for n, r in rs.items()} for s, rs in surfaces.items()}
    summary = {
        "final_train_loss": {k: r["final_train_loss"] for k, r in runs.items()},
        "test_accuracy": {k: r["test_accuracy"] for k, r in runs.items()},
        "surface_final_value": final,
        "steps_to_target": {  # first step with f below TARGETS[surface]; None: never
            s: {n: _first_below(r["f"], TARGETS[s]) for n, r in rs.items()}
            for s, rs in surfaces.items()
        },
        "runs": runs,
        "surfaces": surfaces,
        "surface_steps": steps,
        "surface_seconds": time.perf_counter() - t0,
        "train_examples": n_train,
        "test_examples": len(test.x),
        "epochs": epochs,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    _plot_mnist(runs, a.out / "mnist_loss.png")
    _plot_surfaces(surfaces, a.out / "surfaces.png")
    report.write_json(a.out / "results.json", summary)
    print(json.dumps(report.to_jsonable(summary)))
    return summary


def _first_below(values, level) -> int | None:
    hits = np.flatnonzero(np.asarray(values) < level)
    return int(hits[0]) if hits.size else None


def _plot_mnist(runs, path: Path) -> None:
    fig = Figure(figsize=(11, 4.2), layout="tight")
    axes = fig.subplots(1, 2)
    for label, r in runs.items():
        loss = r["train_loss"]
        e = np.arange(1, len(loss) + 1)
        axes[0].plot(e, loss, marker="o", ms=3, label=label)
        axes[1].plot(e * r["updates_per_epoch"], loss, marker="o", ms=3, label=label)
    axes[0].set(title="Training loss per epoch", xlabel="epoch", ylabel="loss", yscale="log")
    axes[1].set(title="Training loss per update", xlabel="updates", ylabel="loss", xscale="log",
                yscale="log")  # fmt: skip
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    report.save_figure(fig, path)


def _plot_surfaces(surfaces, path: Path) -> None:
    fig = Figure(figsize=(5.2 * len(surfaces), 4.6), layout="tight")
    axes = fig.subplots(1, len(surfaces))
    for ax, (surface, rs) in zip(axes, surfaces.items(), strict=True):
        f, _, (x0, x1, y0, y1) = SURFACES[surface]
        gx, gy = np.meshgrid(np.linspace(x0, x1, 200), np.linspace(y0, y1, 200))
        gz = np.asarray(f(jnp.stack([jnp.asarray(gx), jnp.asarray(gy)])))
        ax.contour(gx, gy, gz, levels=30, cmap="Greys", linewidths=0.6)
        for i, (name, r) in enumerate(rs.items()):
            pts = np.clip(np.asarray(r["path"]), [x0, y0], [x1, y1])
            ax.plot(pts[:, 0], pts[:, 1], color=f"C{i}", lw=1.2, label=name)
            ax.plot(pts[-1, 0], pts[-1, 1], "o", color=f"C{i}", ms=4)
        ax.plot(*pts[0], "k*", ms=10)
        ax.set(title=f"{surface} ({len(pts) - 1} steps)", xlim=(x0, x1), ylim=(y0, y1),
               xlabel="x", ylabel="y")  # fmt: skip
        ax.legend(fontsize="small")
    report.save_figure(fig, path)


if __name__ == "__main__":
    main()
