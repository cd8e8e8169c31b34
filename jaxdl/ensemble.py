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
masked layer (input first, see ``models.masked_widths``); probabilities (N, C).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl import lowering, models, sweep, validate
from jaxdl.data import Dataset
from jaxdl.lowering import XLA, Lowering
from jaxdl.models import Masks, Model

Variables = Mapping[str, Any]  # {"params": ..., "batch_stats": ...} as flax apply takes them
_ELEMENTS = 1 << 23  # activations one chunk may hold (32 MiB of float32)


def variables_of(state) -> dict[str, Any]:
    """The ``apply`` variables of a ``TrainState`` (or anything with params/batch_stats)."""
    stats = getattr(state, "batch_stats", None)
    return {"params": state.params, **({"batch_stats": stats} if stats else {})}


def check_rates(model: Model, rates, feature_shape: Sequence[int]) -> np.ndarray:
    """Dropout rates as a float32 host array (n_masked,), one per masked layer."""
    n = len(models.masked_widths(model, feature_shape))
    if np.ndim(rates) == 0:
        rates = [float(rates)] * n
    return np.asarray(validate.rates("dropout rates", rates, n), np.float32)


def sample_masks(
    key: jax.Array, model: Model, rates, k: int, feature_shape: Sequence[int] = (784,)
) -> Masks:
    """``k`` subnetworks: one 0/1 float32 array (k, width_i) per masked layer.

    Mask j is drawn from ``fold_in(key, j)``: the same key gives the same masks, and the
    first k of a larger sample are the k-sample. Unit u of layer i is kept with
    probability 1 - rates[i].
    """
    validate.positive_int("k", k)
    widths = models.masked_widths(model, feature_shape)
    rates = jnp.asarray(check_rates(model, rates, feature_shape))
    return _sample(key, rates, widths, k)


@functools.partial(jax.jit, static_argnames=("widths", "k"))
def _sample(key, rates, widths: tuple[int, ...], k: int) -> Masks:
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(k))
    return jax.vmap(lambda kk: models.sample_masks(kk, rates, widths))(keys)


def _apply(model: Model, variables: Variables, x, rates, masks=None, **kw) -> jax.Array:
    return model.apply(variables, x, train=False, rates=rates, masks=masks, **kw)


def subnetwork_logits(model: Model, variables: Variables, rates, x, masks: Masks) -> jax.Array:
    """Logits (k, B, C) of the k subnetworks ``masks`` on ``x`` (B, ...), weights shared."""
    return jax.vmap(lambda m: _apply(model, variables, x, rates, m))(masks)


def _chunks(n: int, size: int) -> tuple[jax.Array, jax.Array]:
    """Row indices (steps, b) covering 0…n-1 (the last chunk padded with n-1) and a
    (steps, b) float mask of the real rows."""
    b = min(size, n)
    steps = math.ceil(n / b)
    flat = jnp.arange(steps * b)
    return jnp.minimum(flat, n - 1).reshape(steps, b), (flat < n).astype(jnp.float32).reshape(
        steps, b
    )


def weight_scaling_logits(
    model: Model, variables: Variables, rates, x, *, batch_size: int = 1000, kernels: str = "auto"
) -> jax.Array:
    """Logits (N, C) of the deterministic pass (see the module docstring). ``kernels``:
    whether the CPU kernels lower the program (``jaxdl.lowering``)."""
    lowered = lowering.resolve(kernels)
    return _weight_scaling(
        model, variables, jnp.asarray(rates), jnp.asarray(x), batch_size, lowered
    )


@functools.partial(jax.jit, static_argnames=("model", "batch_size", "lowered"))
def _weight_scaling(model, variables, rates, x, batch_size, lowered: Lowering = XLA):
    idx, _ = _chunks(x.shape[0], batch_size)
    with lowered.scope():
        out = jax.lax.map(lambda i: _apply(model, variables, x[i], rates), idx)
    return out.reshape(-1, out.shape[-1])[: x.shape[0]]


def _nll_correct(logp: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example negative log-likelihood and correctness from log-probabilities (..., C)."""
    y = jnp.broadcast_to(y, logp.shape[:-1])
    nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    return nll, (logp.argmax(-1) == y).astype(jnp.float32)


def mc_stats(
    model: Model,
    variables: Variables,
    rates,
    x,
    y,
    masks: Masks,
    *,
    batch_size: int | None = None,
    kernels: str = "auto",
) -> dict[str, np.ndarray]:
    """Monte-Carlo ensembles of the first k of ``masks``, for every k = 1…K, in one program.

    Examples go through in chunks of ``batch_size`` (default: as many as fit in a 32 MiB
    activation budget), each chunk through a few subnetworks per step: one subnetwork
    over many examples keeps every GEMM large, which runs faster on a CPU than many
    subnetworks over few examples.

    Returns (numpy):
      ``arithmetic_accuracy``, ``arithmetic_nll``, ``geometric_accuracy``,
      ``geometric_nll``: (K,) ensemble of the first k subnetworks;
      ``single_accuracy``: (K,) accuracy of subnetwork j alone;
      ``probs``: (N, C) arithmetic mean over all K; ``entropy``: (N,) its entropy (nats);
      ``mutual_information``: (N,) entropy of the mean less the mean entropy;
      ``disagreement``: (N,) fraction of pairs of subnetworks that predict differently.

    ``kernels``: whether the CPU kernels lower the program (``jaxdl.lowering``).
    """
    lowered = lowering.resolve(kernels)
    x = validate.features("x", x)
    rates = check_rates(model, rates, x.shape[1:])
    y = validate.labels("y", y, model.num_classes, n=x.shape[0])
    k = _check_masks(masks, models.masked_widths(model, x.shape[1:]))
    widest = max((math.prod(x.shape[1:]), *models.masked_widths(model, x.shape[1:])))
    b = min(batch_size or max(1, _ELEMENTS // widest), x.shape[0])
    kc = max(1, min(k, _ELEMENTS // (b * widest)))
    pad = -k % kc
    masks = tuple(jnp.concatenate([m, jnp.ones((pad, m.shape[1]), m.dtype)]) for m in masks)
    valid_k = jnp.arange(k + pad) < k
    out = _mc(model, variables, jnp.asarray(rates), jnp.asarray(x), jnp.asarray(y), masks,
              valid_k, b, kc, lowered)  # fmt: skip
    per_k, per_example = jax.device_get(out)
    return {**{n: np.asarray(v[:k]) for n, v in per_k.items()},
            **{n: np.asarray(v) for n, v in per_example.items()}}  # fmt: skip


def _check_masks(masks: Masks, widths: Sequence[int]) -> int:
    if not isinstance(masks, tuple | list) or len(masks) != len(widths):
        validate.fail("masks", f"a tuple of {len(widths)} (k, width) arrays", type(masks).__name__)
    ks = {np.shape(m)[0] if np.ndim(m) == 2 else -1 for m in masks}
    shapes = [np.shape(m) for m in masks]
    if len(ks) != 1 or -1 in ks or [s[1] for s in shapes] != list(widths):
        validate.fail("masks", f"(k, width) arrays with widths {tuple(widths)}", shapes)
    return ks.pop()


@functools.partial(jax.jit, static_argnames=("model", "b", "kc", "lowered"))
def _mc(model, variables, rates, x, y, masks, valid_k, b, kc, lowered: Lowering = XLA):
    with lowered.scope():
        return _mc_body(model, variables, rates, x, y, masks, valid_k, b, kc)


def _mc_body(model, variables, rates, x, y, masks, valid_k, b, kc):
    n, c = x.shape[0], model.num_classes
    idx, real = _chunks(n, b)
    chunked = jax.tree_util.tree_map(lambda m: m.reshape(-1, kc, m.shape[-1]), masks)
    kv_chunks = valid_k.astype(jnp.float32).reshape(-1, kc)

    def examples(args):
        i, w = args
        xb, yb = x[i], y[i]

        def subnets(carry, inp):
            log_sum_p, sum_lp, counts, sum_ent, seen = carry
            m, kv = inp
            lp = jax.nn.log_softmax(subnetwork_logits(model, variables, rates, xb, m))
            p = jnp.exp(lp)
            kw = kv[:, None, None]
            # The running sum of probabilities is kept as a log-sum-exp, so a true-class
            # probability below float32's range still gives a finite NLL.
            lp_kept = jnp.where(kw > 0, lp, -jnp.inf)
            cum_log_p = jnp.logaddexp(log_sum_p, jax.lax.cumlogsumexp(lp_kept, axis=0))
            cum_lp = sum_lp + jnp.cumsum(lp * kw, axis=0)  # (kc, b, C)
            k_now = (seen + jnp.cumsum(kv))[:, None, None]
            a_nll, a_ok = _nll_correct(cum_log_p - jnp.log(k_now), yb)
            g_nll, g_ok = _nll_correct(jax.nn.log_softmax(cum_lp / k_now), yb)
            _, single = _nll_correct(lp, yb)
            per_k = {
                "arithmetic_accuracy": a_ok,
                "arithmetic_nll": a_nll,
                "geometric_accuracy": g_ok,
                "geometric_nll": g_nll,
                "single_accuracy": single,
            }
            per_k = {name: (v * w).sum(-1) for name, v in per_k.items()}  # (kc,)
            counts = counts + (jax.nn.one_hot(lp.argmax(-1), c) * kw).sum(0)
            sum_ent = sum_ent + (-(p * lp).sum(-1) * kv[:, None]).sum(0)
            return (cum_log_p[-1], cum_lp[-1], counts, sum_ent, seen + kv.sum()), per_k

        zeros = jnp.zeros((b, c))
        init = (jnp.full((b, c), -jnp.inf), zeros, zeros, jnp.zeros((b,)), jnp.zeros(()))
        (log_sum_p, _, counts, sum_ent, seen), per_k = jax.lax.scan(
            subnets, init, (chunked, kv_chunks)
        )
        mean_p = jnp.exp(log_sum_p) / seen
        entropy = -(mean_p * jnp.log(jnp.maximum(mean_p, 1e-30))).sum(-1)
        pairs = seen * (seen - 1)
        agree = jnp.where(pairs > 0, (counts * (counts - 1)).sum(-1) / jnp.maximum(pairs, 1), 1.0)
        per_example = {
            "probs": mean_p,
            "entropy": entropy,
            "mutual_information": entropy - sum_ent / seen,
            "disagreement": jnp.maximum(1.0 - agree, 0.0),  # float rounding: never < 0
        }
        return jax.tree_util.tree_map(lambda v: v.reshape(-1), per_k), per_example

    per_k, per_example = jax.lax.map(examples, (idx, real))
    per_k = {name: v.sum(0) / n for name, v in per_k.items()}  # (K,)
    per_example = {name: v.reshape(-1, *v.shape[2:])[:n] for name, v in per_example.items()}
    return per_k, per_example


def exact_units(model: Model, rates, feature_shape: Sequence[int]) -> tuple[int, ...]:
    """Indices of the masked layers with a rate above 0 (the ones exact enumeration
    enumerates)."""
    rates = check_rates(model, rates, feature_shape)
    return tuple(int(i) for i in np.flatnonzero(rates > 0))


def exact_probs(
    model: Model,
    variables: Variables,
    rates,
    x,
    *,
    max_units: int = 20,
    batch_size: int = 1000,
    kernels: str = "auto",
) -> dict[str, np.ndarray]:
    """The exact ensemble of all 2^M subnetworks, each weighted by its probability.

    M is the number of units in layers with a dropout rate above 0; more than
    ``max_units`` is refused (2^M grows fast: use ``mc_stats``). Returns (numpy)
    ``arithmetic`` (N, C), the P(m)-weighted mean of the subnetworks' probabilities;
    ``geometric`` (N, C), the softmax of their P(m)-weighted mean log-probability;
    ``log_arithmetic`` and ``log_geometric``, the logarithms of those two (accumulated
    in log space: finite where a probability underflows float32); and ``mean_logits``
    (N, C), their P(m)-weighted mean logits.

    When only the output layer's input is masked, logits are affine in the mask, so
    they are formed as one small GEMM per chunk of masks instead of running the layer.
    """
    x = validate.features("x", x)
    rates = check_rates(model, rates, x.shape[1:])
    widths = models.masked_widths(model, x.shape[1:])
    layers = exact_units(model, rates, x.shape[1:])
    units = sum(widths[i] for i in layers)
    validate.positive_int("max_units", max_units)
    validate.positive_int("batch_size", batch_size)
    if units > max_units:
        validate.fail(
            "exact enumeration",
            f"at most {max_units} masked units (2^{max_units} subnetworks); layers "
            f"{list(layers)} mask {units} units: use Monte-Carlo averaging or mask fewer units",
            units,
        )
    if not layers:  # no dropout: a single network
        logits = weight_scaling_logits(model, variables, rates, x, kernels=kernels)
        lp = np.asarray(jax.nn.log_softmax(logits))
        return {"arithmetic": np.exp(lp), "geometric": np.exp(lp), "log_arithmetic": lp,
                "log_geometric": lp, "mean_logits": np.asarray(logits)}  # fmt: skip
    out = _exact(*exact_program_args(model, variables, rates, x, batch_size, kernels))
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def exact_program_args(
    model: Model, variables: Variables, rates, x, batch_size: int = 1000, kernels: str = "auto"
):
    """The arguments ``exact_probs`` passes to its compiled program ``_exact`` (for
    lowering it elsewhere, e.g. to read XLA's memory estimate): examples go through
    ``batch_size`` at a time, masks in chunks of a power of two that keeps one chunk's
    activations within the 32 MiB budget."""
    rates = check_rates(model, rates, x.shape[1:])
    widths = models.masked_widths(model, x.shape[1:])
    layers = exact_units(model, rates, x.shape[1:])
    units = sum(widths[i] for i in layers)
    b = min(batch_size, x.shape[0])
    after = max(widths[layers[0] :])
    chunk = 1 << max(0, min(units, int(math.log2(max(1, _ELEMENTS // (b * after))))))
    lowered = lowering.resolve(kernels)
    return model, variables, jnp.asarray(rates), jnp.asarray(x), layers, widths, b, chunk, lowered


@functools.partial(jax.jit, static_argnames=("model", "layers", "widths", "b", "chunk", "lowered"))
def _exact(model, variables, rates, x, layers, widths, b, chunk, lowered: Lowering = XLA):
    with lowered.scope():
        return _exact_body(model, variables, rates, x, layers, widths, b, chunk)


def _exact_body(model, variables, rates, x, layers, widths, b, chunk):
    first = layers[0]
    sizes = [widths[i] for i in layers]
    units = sum(sizes)
    keep = jnp.concatenate(
        [jnp.full((w,), 1.0 - rates[i]) for i, w in zip(layers, sizes, strict=False)]
    )
    bit = jnp.arange(units, dtype=jnp.uint32)
    ids = jnp.arange(2**units, dtype=jnp.uint32).reshape(-1, chunk)
    idx, _ = _chunks(x.shape[0], b)

    affine = first == len(widths) - 1  # only the output layer's input is masked

    def examples(i):
        h = _apply(model, variables, x[i], rates, stop=first)  # computed once per example

        def rest(bits):  # (chunk, units) -> logits (chunk, b, C) through the rest of the net
            parts = jnp.split(bits, np.cumsum(sizes)[:-1], axis=1)
            masks = [None] * len(widths)
            for layer, part in zip(layers, parts, strict=False):
                masks[layer] = part
            return jax.vmap(lambda m: _apply(model, variables, h, rates, m, start=first))(
                tuple(masks)
            )

        if affine:  # logits = base + Σ_j m_j a_j: one (chunk, units) x (units, b·C) GEMM
            base = rest(jnp.zeros((1, units)))[0]
            slopes = rest(jnp.eye(units)) - base  # (units, b, C)

        def enumerate_masks(carry, ids):
            log_arith, geo, mean_logits = carry
            bits = ((ids[:, None] >> bit) & 1).astype(jnp.float32)  # (chunk, units)
            log_w = (bits * jnp.log(keep) + (1 - bits) * jnp.log1p(-keep)).sum(-1)
            weight = jnp.exp(log_w)
            logits = base + jnp.tensordot(bits, slopes, axes=1) if affine else rest(bits)
            lp = jax.nn.log_softmax(logits)
            chunk_log = jax.nn.logsumexp(log_w[:, None, None] + lp, axis=0)
            log_arith = jnp.logaddexp(log_arith, chunk_log)
            geo = geo + jnp.einsum("m,mbc->bc", weight, lp)
            mean_logits = mean_logits + jnp.einsum("m,mbc->bc", weight, logits)
            return (log_arith, geo, mean_logits), None

        zeros = jnp.zeros((b, model.num_classes))
        init = (jnp.full_like(zeros, -jnp.inf), zeros, zeros)
        (log_arith, geo, mean_logits), _ = jax.lax.scan(enumerate_masks, init, ids)
        log_geo = jax.nn.log_softmax(geo)
        return {"arithmetic": jnp.exp(log_arith), "geometric": jnp.exp(log_geo),
                "log_arithmetic": log_arith, "log_geometric": log_geo,
                "mean_logits": mean_logits}  # fmt: skip

    out = jax.lax.map(examples, idx)
    return {k: v.reshape(-1, v.shape[-1])[: x.shape[0]] for k, v in out.items()}


def accuracy_nll(log_probs, y) -> dict[str, float]:
    """Accuracy and mean negative log-likelihood of log-probabilities (N, C) on labels
    (N,). Log-probabilities, not probabilities: a confidently wrong prediction whose
    true-class probability underflows float32 still counts with its real NLL."""
    log_probs = np.asarray(log_probs, np.float64)
    y = np.asarray(y)
    return {
        "accuracy": float((log_probs.argmax(-1) == y).mean()),
        "nll": float(-log_probs[np.arange(len(y)), y].mean()),
    }


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
    widths = models.masked_widths(model, feature_shape)
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
    y = validate.labels("y", y, model.num_classes, n=x.shape[0])
    n_masked = len(models.masked_widths(model, x.shape[1:]))
    zero = jnp.zeros((n_masked,), jnp.float32)

    def member(params, stats, m):
        variables = {"params": params, **({"batch_stats": stats} if stats else {})}
        idx, _ = _chunks(x.shape[0], batch_size)
        rates = None if m is None else zero
        with lowered.scope():
            out = jax.lax.map(lambda i: _apply(model, variables, xd[i], rates, m), idx)
        return jax.nn.log_softmax(out.reshape(-1, out.shape[-1])[: x.shape[0]])

    xd = jnp.asarray(x)
    lp = np.asarray(jax.jit(jax.vmap(member))(states.params, states.batch_stats, masks), np.float64)
    n = np.arange(1, len(lp) + 1)[:, None, None]
    cum = np.logaddexp.accumulate(lp, axis=0) - np.log(n)  # log of the mean of the first j
    rows = np.arange(len(y))
    return {
        "accuracy": (cum.argmax(-1) == y).mean(-1),
        "nll": -cum[:, rows, y].mean(-1),
        "single_accuracy": (lp.argmax(-1) == y).mean(-1),
    }


def train_explicit(
    model: Model,
    optimizer,
    train_data: Dataset,
    *,
    n: int,
    rates,
    key: jax.Array,
    epochs: int,
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Explicit ensembles to set beside one dropout-trained net, trained vmapped:

    - ``independent``: n nets without dropout, seeds ``seed…seed+n-1``;
    - ``bagging``: n fixed-mask subnetworks ("dropout bagging"), each with its own weights
      and one mask drawn with ``rates`` from ``key``, used at every step.

    ``config``: the numbers every member shares (``sweep.sweep``'s configuration keys:
    ``learning_rate``, ``l2``, ``input_noise``, …); its ``dropout`` is ignored. ``kwargs``
    go to ``sweep.sweep`` (batch_size, validation, test, early_stopping, …).
    Returns ``{"independent": SweepResult, "bagging": SweepResult, "masks": Masks}``.
    """
    validate.positive_int("n", n)
    seeds = list(range(seed, seed + n))
    masks = sample_masks(key, model, rates, n, train_data.x.shape[1:])
    configs = [{**(config or {}), "dropout": 0.0}]
    common = dict(seeds=seeds, epochs=epochs, **kwargs)
    return {
        "independent": sweep.sweep(model, optimizer, train_data, configs, **common),
        "bagging": sweep.sweep(model, optimizer, train_data, configs, masks=masks, **common),
        "masks": masks,
    }
