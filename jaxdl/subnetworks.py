"""A trained dropout network's subnetworks, by mask: sampling masks, one subnetwork's
logits, the weight-scaling pass, and ``mc_stats`` (Monte-Carlo ensembles of the first k
sampled subnetworks for every k, in one compiled program).

Shapes: ``x`` (N, *feature_shape); ``masks`` a tuple with one (k, width_i) array per
masked layer (input first, see ``contract.masked_widths``); probabilities (N, C).
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl import compiled, contract, lowering, models, step, validate
from jaxdl.lowering import XLA, Lowering
from jaxdl.models import Masks, Model

Variables = Mapping[str, Any]  # {"params": ..., "batch_stats": ...} as flax apply takes them


ELEMENTS = 1 << 23  # activations one chunk may hold (32 MiB of float32)


def variables_of(state) -> dict[str, Any]:
    """The ``apply`` variables of a ``TrainState`` (or anything with params and maybe
    batch_stats and numbers): what ``model.apply`` takes."""
    return step.apply_variables(
        state.params, getattr(state, "batch_stats", None), getattr(state, "numbers", None)
    )


def check_rates(model: Model, rates, feature_shape: Sequence[int]) -> np.ndarray:
    """Dropout rates as a float32 host array (n_masked,), one per masked layer."""
    n = len(contract.masked_widths(model, feature_shape))
    if n == 0:
        raise validate.InputError(
            f"model {type(model).__name__}: the ensemble view needs its dropout masks, and it "
            "has no jaxdl.Dropout layer (Flax's nn.Dropout draws its own); use "
            "jaxdl.Dropout(rate) for the layers to study"
        )
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
    widths = contract.masked_widths(model, feature_shape)
    rates = jnp.asarray(check_rates(model, rates, feature_shape))
    return _sample(key, rates, widths, k)


@functools.partial(jax.jit, static_argnames=("widths", "k"))
def _sample(key, rates, widths: tuple[int, ...], k: int) -> Masks:
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(k))
    return jax.vmap(lambda kk: models.sample_masks(kk, rates, widths))(keys)


def apply_net(model: Model, variables: Variables, x, rates, masks=None, **kw) -> jax.Array:
    return contract.call(model, variables, x, rates=rates, masks=masks, **kw)


def subnetwork_logits(model: Model, variables: Variables, rates, x, masks: Masks) -> jax.Array:
    """Logits (k, B, C) of the k subnetworks ``masks`` on ``x`` (B, ...), weights shared."""
    return jax.vmap(lambda m: apply_net(model, variables, x, rates, m))(masks)


def example_chunks(n: int, size: int) -> tuple[jax.Array, jax.Array]:
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
    idx, _ = example_chunks(x.shape[0], batch_size)
    with lowered.scope():
        out = jax.lax.map(lambda i: apply_net(model, variables, x[i], rates), idx)
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
    y = validate.labels("y", y, contract.classes(model, x.shape[1:]), n=x.shape[0])
    k = _check_masks(masks, contract.masked_widths(model, x.shape[1:]))
    widest = max((math.prod(x.shape[1:]), *contract.masked_widths(model, x.shape[1:])))
    b = min(batch_size or max(1, ELEMENTS // widest), x.shape[0])
    kc = max(1, min(k, ELEMENTS // (b * widest)))
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


# How often each program was traced: ``traces["mc"]`` (``mc_stats``) and ``traces["exact"]``
# (``exact_probs``), once per model, chunking and lowering, whatever the values.
traces: collections.Counter = collections.Counter()


def _mc_lowered(model, variables, rates, x, y, masks, valid_k, b, kc, lowered: Lowering = XLA):
    with lowered.scope():
        return _mc_body(model, variables, rates, x, y, masks, valid_k, b, kc)


_mc = jax.jit(
    compiled.counted(traces, "mc", _mc_lowered), static_argnames=("model", "b", "kc", "lowered")
)


def _mc_body(model, variables, rates, x, y, masks, valid_k, b, kc):
    n, c = x.shape[0], contract.classes(model, x.shape[1:])
    idx, real = example_chunks(n, b)
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
