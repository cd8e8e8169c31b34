"""The ensemble view: dropout as an ensemble of 2^M subnetworks with shared weights.

A network trained with dropout on M units holds 2^M subnetworks, one per keep-mask m,
drawn with probability P(m) = Π keep^m (1-keep)^(1-m). Scaling the weights by the keep
rate at test time (the deterministic pass) is said to approximate their ensemble; this
module measures the ensemble itself. Every predictor is ``vmap`` over masks with the
weights shared, on top of the models' explicit ``masks=`` argument:

- weight scaling: the deterministic pass. Under the classic convention units are scaled
  by (1-p); under the inverted one the pass is the identity, the kept units having been
  scaled by 1/(1-p) during training (the same network up to reparametrisation).
- Monte-Carlo: k sampled subnetworks, averaged as probabilities (arithmetic mean) or as
  log-probabilities renormalised (normalised geometric mean). ``mc_stats`` gives the
  whole curve k = 1…K in one pass, since mask j is drawn from ``fold_in(key, j)``: the
  first k masks of a K-sample are a k-sample.
- exact: every subnetwork, weighted by P(m), when M ≤ ``max_units``. The network up to
  the first masked layer is computed once; masks are enumerated in chunks through the
  rest, so 2^M full forward passes never exist.

Shapes: ``x`` (N, *feature_shape); ``masks`` a tuple with one (k, width_i) array per
masked layer (input first, see ``contract.masked_widths``); probabilities (N, C).

The programs live in ``jaxdl.subnetworks`` (masks, weight scaling, Monte-Carlo) and
``jaxdl.exact_ensemble``; this module holds the study built on them (``analyse``, the
explicit ensembles) and makes their functions reachable as ``ensemble.mc_stats`` etc.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl import contract, lowering, sweep, train, validate
from jaxdl.config import RunConfig
from jaxdl.data import Dataset

# The ensemble view's programs, reachable from here as ensemble.mc_stats and so on.
from jaxdl.exact_ensemble import exact_probs as exact_probs
from jaxdl.exact_ensemble import exact_program as exact_program
from jaxdl.exact_ensemble import exact_program_args as exact_program_args
from jaxdl.exact_ensemble import exact_units as exact_units
from jaxdl.models import Masks, Model
from jaxdl.subnetworks import Variables, apply_net, example_chunks
from jaxdl.subnetworks import accuracy_nll as accuracy_nll
from jaxdl.subnetworks import check_rates as check_rates
from jaxdl.subnetworks import mc_stats as mc_stats
from jaxdl.subnetworks import sample_masks as sample_masks
from jaxdl.subnetworks import subnetwork_logits as subnetwork_logits
from jaxdl.subnetworks import traces as traces
from jaxdl.subnetworks import variables_of as variables_of
from jaxdl.subnetworks import weight_scaling_logits as weight_scaling_logits


def ood_inputs(x: np.ndarray, seed: int = 0, image_shape=(28, 28)) -> dict[str, np.ndarray]:
    """Out-of-distribution versions of ``x`` (N, F): Gaussian noise with the per-feature
    mean and σ of ``x``, and (when F is an image of ``image_shape``) the images rotated
    by 90°."""
    x = np.asarray(x, np.float32)
    flat = x.reshape(len(x), -1)
    rng = np.random.default_rng(seed)
    noise = flat.mean(0) + flat.std(0) * rng.standard_normal(flat.shape).astype(np.float32)
    out = {"noise": noise.reshape(x.shape).astype(np.float32)}
    if flat.shape[1] == math.prod(image_shape):
        rotated = np.rot90(flat.reshape(len(x), *image_shape), k=1, axes=(1, 2))
        out["rotated"] = np.ascontiguousarray(rotated).reshape(x.shape)
    return out


def analyse(
    model: Model,
    variables: Variables,
    rates,
    test: Dataset,
    *,
    key: jax.Array,
    k: int = 100,
    repeats: int = 5,
    exact: bool | None = None,
    max_units: int = 20,
    ood_size: int = 1000,
    kernels: str = "auto",
) -> dict[str, Any]:
    """Everything the ensemble view reports for one trained dropout network on ``test``.

    ``repeats`` independent k-samples give the spread of the Monte-Carlo curves;
    ``exact`` enumerates all subnetworks (None: when they number at most 2^max_units).
    Returns a dict of floats and numpy arrays (see the keys in the code's ``out``).
    ``kernels``: whether the CPU kernels lower the programs (``jaxdl.lowering``).
    """
    lowering.resolve(kernels)  # an impossible "on" is refused before any work
    feature_shape = test.x.shape[1:]
    rates = check_rates(model, rates, feature_shape)
    validate.positive_int("repeats", repeats)
    ws = weight_scaling_logits(model, variables, rates, test.x, kernels=kernels)
    ws = jax.nn.log_softmax(ws)
    out: dict[str, Any] = {"rates": rates.tolist(), "k": k, "repeats": repeats}
    out["weight_scaling"] = accuracy_nll(ws, test.y)
    curves = []
    for r in range(repeats):
        masks = sample_masks(jax.random.fold_in(key, r), model, rates, k, feature_shape)
        curves.append(mc_stats(model, variables, rates, test.x, test.y, masks, kernels=kernels))
    for name in ("arithmetic_accuracy", "arithmetic_nll", "geometric_accuracy", "geometric_nll"):
        out[name] = np.stack([c[name] for c in curves])  # (repeats, k)
    out["single_accuracy"] = np.concatenate([c["single_accuracy"] for c in curves])
    first = curves[0]
    out["disagreement"] = float(first["disagreement"].mean())
    out["entropy"] = {"test": first["entropy"]}
    out["mutual_information"] = {"test": first["mutual_information"]}
    m = min(ood_size, len(test.x))
    masks = sample_masks(jax.random.fold_in(key, repeats), model, rates, k, feature_shape)
    for name, xo in ood_inputs(test.x[:m]).items():
        s = mc_stats(model, variables, rates, xo, np.zeros(m, np.int32), masks, kernels=kernels)
        out["entropy"][name] = s["entropy"]
        out["mutual_information"][name] = s["mutual_information"]
    widths = contract.masked_widths(model, feature_shape)
    units = sum(widths[i] for i in exact_units(model, rates, feature_shape))
    if exact or (exact is None and units <= max_units):
        ex = exact_probs(model, variables, rates, test.x, max_units=max_units, kernels=kernels)
        logs = {"arithmetic": ex["log_arithmetic"], "geometric": ex["log_geometric"],
                "mean_logits": jax.nn.log_softmax(ex["mean_logits"])}  # fmt: skip
        out["exact"] = {name: accuracy_nll(lp, test.y) for name, lp in logs.items()}
        out["exact_units"] = units
    return out


def summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON summary of ``analyse``: accuracies at a few k (mean over repeats)."""
    k = result["k"]
    ks = sorted({j for j in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if j <= k} | {k})
    acc = np.asarray(result["arithmetic_accuracy"]).mean(0)
    out = {
        "weight_scaling_accuracy": result["weight_scaling"]["accuracy"],
        "weight_scaling_nll": result["weight_scaling"]["nll"],
        "mc_accuracy": {str(j): float(acc[j - 1]) for j in ks},
        "mc_nll": {str(j): float(np.asarray(result["arithmetic_nll"]).mean(0)[j - 1]) for j in ks},
        "geometric_accuracy": float(np.asarray(result["geometric_accuracy"]).mean(0)[-1]),
        "single_subnetwork_accuracy": {
            "mean": float(np.mean(result["single_accuracy"])),
            "min": float(np.min(result["single_accuracy"])),
            "max": float(np.max(result["single_accuracy"])),
        },
        "disagreement": result["disagreement"],
        "mean_entropy": {n: float(np.mean(v)) for n, v in result["entropy"].items()},
        "k_matching_weight_scaling": k_matching(result),
    }
    if "exact" in result:
        out["exact_accuracy"] = result["exact"]["arithmetic"]["accuracy"]
        out["exact_nll"] = result["exact"]["arithmetic"]["nll"]
        out["exact_geometric_accuracy"] = result["exact"]["geometric"]["accuracy"]
        out["exact_units"] = result["exact_units"]
    return out


def k_matching(result: Mapping[str, Any]) -> int | None:
    """The smallest k from which the mean Monte-Carlo accuracy stays at or above weight
    scaling's (None if it never gets there within the sampled k)."""
    acc = np.asarray(result["arithmetic_accuracy"]).mean(0)
    below = np.flatnonzero(acc < result["weight_scaling"]["accuracy"])
    if len(below) == 0:
        return 1
    return int(below[-1]) + 2 if below[-1] + 1 < len(acc) else None


def member_stats(
    model: Model,
    states,
    x,
    y,
    *,
    masks: Masks | None = None,
    batch_size: int = 1000,
    kernels: str = "auto",
) -> dict[str, np.ndarray]:
    """Explicit ensembles of n separately trained members (``states``: a ``TrainState``
    with a leading member axis, e.g. ``SweepResult.states``), each evaluated as itself
    (with its own fixed mask from ``masks``, (n, width_i) per layer, if given).

    Returns (numpy) ``accuracy`` and ``nll``: (n,) of the mean probabilities of the first
    j members, j = 1…n; ``single_accuracy``: (n,) each member alone. ``kernels``: whether
    the CPU kernels lower the program (``jaxdl.lowering``).
    """
    lowered = lowering.resolve(kernels)
    x = validate.features("x", x)
    y = validate.labels("y", y, contract.classes(model, x.shape[1:]), n=x.shape[0])
    n_masked = len(contract.masked_widths(model, x.shape[1:]))
    zero = jnp.zeros((n_masked,), jnp.float32)

    def member(state, m):
        variables = variables_of(state)
        idx, _ = example_chunks(x.shape[0], batch_size)
        rates = None if m is None else zero
        with lowered.scope():
            out = jax.lax.map(lambda i: apply_net(model, variables, xd[i], rates, m), idx)
        return jax.nn.log_softmax(out.reshape(-1, out.shape[-1])[: x.shape[0]])

    xd = jnp.asarray(x)
    lp = np.asarray(jax.jit(jax.vmap(member))(states, masks), np.float64)
    n = np.arange(1, len(lp) + 1)[:, None, None]
    cum = np.logaddexp.accumulate(lp, axis=0) - np.log(n)  # log of the mean of the first j
    rows = np.arange(len(y))
    return {
        "accuracy": (cum.argmax(-1) == y).mean(-1),
        "nll": -cum[:, rows, y].mean(-1),
        "single_accuracy": (lp.argmax(-1) == y).mean(-1),
    }


def train_explicit(
    config: RunConfig,
    train_data: Dataset,
    *,
    n: int,
    rates,
    key: jax.Array,
    **options: Any,
) -> dict[str, Any]:
    """Explicit ensembles to set beside one dropout-trained net, trained vmapped:

    - ``independent``: n nets of ``config`` without dropout, seeds ``seed…seed+n-1``
      (``seed``: ``config.training.seed``);
    - ``bagging``: n fixed-mask subnetworks ("dropout bagging"), each with its own weights
      and one mask drawn with ``rates`` from ``key``, used at every step.

    ``options`` go to ``sweep.run`` (validation, test, devices, …).
    Returns ``{"independent": SweepResult, "bagging": SweepResult, "masks": Masks}``.
    """
    validate.positive_int("n", n)
    seed = config.training.seed
    model = config.model.build(train.num_classes(train_data))
    masks = sample_masks(key, model, rates, n, train_data.x.shape[1:])
    configs = [{"dropout": 0.0, "dropout_input": None}]
    common = dict(seeds=list(range(seed, seed + n)), **options)
    return {
        "independent": sweep.run(config, train_data, configs, **common),
        "bagging": sweep.run(config, train_data, configs, masks=masks, **common),
        "masks": masks,
    }
