"""Your own model: a residual MLP defined here, trained, swept and its dropout ensemble
analysed, with nothing of jaxdl's own but ``jaxdl.Dropout``.

The model is a plain Flax module (``__call__(x, *, train)`` returning logits): a dense
stem, then residual blocks ``h + Dropout(relu(BatchNorm(Dense(h))))``, then the output
layer. It is

1. trained on MNIST with ``jaxdl.fit`` (batch norm, jaxdl's masks for its dropout);
2. swept over learning rate × dropout rate × 3 seeds, every member in one compiled
   program (the dropout rate of its ``jaxdl.Dropout`` layers is a traced number);
3. analysed as a dropout ensemble: the Monte-Carlo average of k subnetworks, k = 1…K,
   against weight scaling (the deterministic pass), as ``ensemble_k_curve.py`` does for
   ``jaxdl.MLP``.

Writes ``curves.png``, ``sweep.png``, ``k_curve.png``, ``subnetworks.png`` and
``results.json`` into ``--out``. ``--quick`` trains briefly on a slice (for CI); the full
run takes a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

import jaxdl
from jaxdl import ensemble, report, sweep


class ResMLP(nn.Module):
    """A residual MLP: (B, 784) -> logits (B, num_classes)."""

    width: int = 256
    blocks: int = 2
    num_classes: int = 10
    rate: float = 0.3  # each block's dropout (jaxdl traces it: a sweep may set it)

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
        for _ in range(self.blocks):
            r = nn.Dense(self.width, use_bias=False)(h)  # batch norm's bias is its bias
            r = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(r))
            h = h + jaxdl.Dropout(self.rate)(r, train=train)
        return nn.Dense(self.num_classes)(h)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run on a slice (CI)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/your_own_model"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = jaxdl.load("mnist")
    train, valid, test = splits.train, splits.valid, splits.test
    epochs, sweep_epochs, k, repeats = 15, 10, 200, 3
    if a.quick:
        train, valid = jaxdl.data.subset(train, 5000), jaxdl.data.subset(valid, 1000)
        test = jaxdl.data.subset(test, 1000)
        epochs, sweep_epochs, k, repeats = 3, 2, 20, 2
    model = ResMLP()
    adam = jaxdl.make_optimizer("adam", learning_rate=1e-3)
    a.out.mkdir(parents=True, exist_ok=True)

    # 1. One run, the module's own dropout rate.
    t0 = time.perf_counter()
    state, history = jaxdl.fit(model, adam, train, epochs=epochs, validation=valid, key=a.seed)
    train_seconds = time.perf_counter() - t0
    scores = jaxdl.evaluate(model, state, test)
    report.plot_curves(history, a.out / "curves.png", title="ResMLP 256×2, dropout 0.3")

    # 2. Learning rate × dropout × 3 seeds: one program for all members.
    grid = sweep.grid(learning_rate=[3e-4, 1e-3, 3e-3], dropout=[0.1, 0.3, 0.5])
    seeds = [a.seed, a.seed + 1, a.seed + 2]
    res = sweep.sweep(model, adam, train, grid, seeds=seeds, epochs=sweep_epochs,
                      validation=valid, test=test)  # fmt: skip
    report.plot_sweep(res.rows, ["learning_rate", "dropout"], res.history, a.out,
                      title="ResMLP 256×2")  # fmt: skip
    best = res.best()

    # 3. The trained module as a dropout ensemble.
    t1 = time.perf_counter()
    view = ensemble.analyse(model, ensemble.variables_of(state), model.rate, test,
                            key=jax.random.key(a.seed + 1), k=k, repeats=repeats)  # fmt: skip
    report.plot_ensemble(view, a.out, title="ResMLP 256×2, dropout 0.3")
    ens = ensemble.summary(view)
    by_setting: dict[str, list[float]] = {}
    for r in res.rows:
        by_setting.setdefault(f"lr={r['learning_rate']:g} dropout={r['dropout']:g}", []).append(
            r["test_accuracy"]
        )
    summary = {
        "epochs": epochs,
        "train_examples": len(train.x),
        "test_examples": len(test.x),
        "test_accuracy": scores["accuracy"],
        "test_loss": scores["loss"],
        "train_seconds": train_seconds,
        "sweep": {
            "members": len(res.rows),
            "epochs": sweep_epochs,
            "compiles": res.compiles,
            "seconds": res.seconds,
            "best": {
                key: best[key]
                for key in (
                    "learning_rate",
                    "dropout",
                    "seed",
                    "best_val_accuracy",
                    "test_accuracy",
                )
            },
            "mean_test_accuracy": {s: float(np.mean(v)) for s, v in by_setting.items()},
        },  # fmt: skip
        "ensemble": {
            "k": k,
            "repeats": repeats,
            "weight_scaling_error_percent": 100 * (1 - ens["weight_scaling_accuracy"]),
            "weight_scaling_nll": ens["weight_scaling_nll"],
            "mc_error_percent": {
                str(j): float(100 * (1 - view["arithmetic_accuracy"][:, j - 1].mean()))
                for j in (1, 2, 5, 10, 20, 50, 100, 200)
                if j <= k
            },
            "mc_nll": ens["mc_nll"],
            "single_error_percent": float(100 * (1 - view["single_accuracy"].mean())),
            "k_matching_weight_scaling": ens["k_matching_weight_scaling"],
            "mean_entropy": ens["mean_entropy"],
            "seconds": time.perf_counter() - t1,
        },
    }
    report.write_json(a.out / "results.json", summary)
    print(json.dumps(report.to_jsonable(summary)))
    return summary


if __name__ == "__main__":
    main()
