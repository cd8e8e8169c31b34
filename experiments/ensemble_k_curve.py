"""Dropout as an ensemble: Monte-Carlo averaging of k subnetworks against weight scaling.

Reproduces Srivastava et al. 2014 (JMLR), Fig. 11, on MNIST: a 784-500-500-10 ReLU
MLP trained with dropout (0.2 on the input, 0.5 on the hidden layers); its test error
with weight scaling (the deterministic pass) against the error of the average of k
sampled subnetworks, k = 1…K, over several independent samples. The paper finds the
Monte-Carlo average matches weight scaling at about k = 50. The full run samples
K = 1,000 subnetworks three times over.

The exact ensemble of all 2^M subnetworks needs few masked units, so a second net,
784-500-500-16-10 with dropout 0.5 on its 16-unit layer only, is trained the same way and
its exact ensemble (all 65,536 subnetworks) set beside weight scaling and the k-curve.

Writes ``k_curve.png``, ``subnetworks.png``, ``exact_16_units/k_curve.png`` and
``results.json`` into ``--out``.
``--quick`` trains briefly on a slice (for CI); the full run takes a few minutes on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

import jaxdl
from jaxdl import ensemble, report

RATES = [0.2, 0.5, 0.5]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run on a slice (CI)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/ensemble_k_curve"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = jaxdl.load("mnist")
    train, test = splits.train, splits.test
    epochs, k, repeats = 30, 1000, 3
    if a.quick:
        train, test = jaxdl.data.subset(train, 5000), jaxdl.data.subset(test, 1000)
        epochs, k, repeats = 2, 20, 2
    model = jaxdl.MLP(hidden=(500, 500))
    t0 = time.perf_counter()
    state, history = jaxdl.fit(
        model,
        jaxdl.make_optimizer("adam", learning_rate=1e-3),
        train,
        epochs=epochs,
        batch_size=100,
        key=a.seed,
        dropout=RATES,
    )
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = ensemble.analyse(
        model, ensemble.variables_of(state), RATES, test, key=jax.random.key(a.seed + 1),
        k=k, repeats=repeats,
    )  # fmt: skip
    summary = {
        **ensemble.summary(result),
        "epochs": epochs,
        "train_examples": len(train.x),
        "test_examples": len(test.x),
        "train_seconds": train_seconds,
        "analysis_seconds": time.perf_counter() - t0,
        "k": k,
        "repeats": repeats,
        "weight_scaling_error_percent": 100 * (1 - result["weight_scaling"]["accuracy"]),
        "mc_error_percent": {
            str(j): float(100 * (1 - result["arithmetic_accuracy"][:, j - 1].mean()))
            for j in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
            if j <= k
        },
    }
    # The exact ensemble needs few masked units: a net whose only dropout is on a 16-unit
    # layer before the output has 2^16 subnetworks, all enumerated.
    small = jaxdl.MLP(hidden=(500, 500, 16))
    small_rates = [0.0, 0.0, 0.0, 0.5]
    small_state, _ = jaxdl.fit(
        small, jaxdl.make_optimizer("adam", learning_rate=1e-3), train, epochs=epochs,
        batch_size=100, key=a.seed, dropout=small_rates,
    )  # fmt: skip
    t1 = time.perf_counter()
    exact = ensemble.analyse(
        small, ensemble.variables_of(small_state), small_rates, test,
        key=jax.random.key(a.seed + 2), k=k, repeats=repeats, exact=True,
    )  # fmt: skip
    ex = ensemble.summary(exact)
    summary["exact_16_units"] = {
        **{key: ex[key] for key in ("weight_scaling_accuracy", "weight_scaling_nll",
                                     "exact_accuracy", "exact_nll", "exact_geometric_accuracy",
                                     "mc_accuracy", "mc_nll", "k_matching_weight_scaling")},
        "exact_minus_weight_scaling_error_percent": 100 * (
            ex["weight_scaling_accuracy"] - ex["exact_accuracy"]
        ),
        "exact_minus_weight_scaling_nll": ex["exact_nll"] - ex["weight_scaling_nll"],
        "seconds": time.perf_counter() - t1,
    }  # fmt: skip
    (a.out / "exact_16_units").mkdir(parents=True, exist_ok=True)
    report.plot_ensemble(result, a.out)
    report.plot_ensemble(exact, a.out / "exact_16_units")
    report.write_json(a.out / "results.json", summary)
    print(json.dumps(report.to_jsonable(summary)))
    return summary


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
