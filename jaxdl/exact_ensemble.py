"""The exact ensemble of every subnetwork, each weighted by its probability P(m), when
the masked units M are few (2^M subnetworks). The network up to the first masked layer
is computed once; masks are enumerated in chunks through the rest, so 2^M full forward
passes never exist.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl import compiled, contract, lowering, validate
from jaxdl.lowering import XLA
from jaxdl.models import Model
from jaxdl.subnetworks import (
    ELEMENTS,
    Variables,
    apply_net,
    check_rates,
    example_chunks,
    traces,
    weight_scaling_logits,
)


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
    widths = contract.masked_widths(model, x.shape[1:])
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
    out = exact_program(*exact_program_args(model, variables, rates, x, batch_size, kernels))
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def exact_program_args(
    model: Model, variables: Variables, rates, x, batch_size: int = 1000, kernels: str = "auto"
):
    """The arguments ``exact_probs`` passes to its compiled program ``exact_program`` (for
    lowering it elsewhere, e.g. to read XLA's memory estimate): examples go through
    ``batch_size`` at a time, masks in chunks of a power of two that keeps one chunk's
    activations within the 32 MiB budget."""
    rates = check_rates(model, rates, x.shape[1:])
    widths = contract.masked_widths(model, x.shape[1:])
    layers = exact_units(model, rates, x.shape[1:])
    units = sum(widths[i] for i in layers)
    b = min(batch_size, x.shape[0])
    after = max(widths[layers[0] :])
    chunk = 1 << max(0, min(units, int(math.log2(max(1, ELEMENTS // (b * after))))))
    lowered = lowering.resolve(kernels)
    return model, variables, jnp.asarray(rates), jnp.asarray(x), layers, widths, b, chunk, lowered


def _exact_lowered(model, variables, rates, x, layers, widths, b, chunk, lowered=XLA):
    with lowered.scope():
        return _exact_body(model, variables, rates, x, layers, widths, b, chunk)


exact_program = jax.jit(
    compiled.counted(traces, "exact", _exact_lowered),
    static_argnames=("model", "layers", "widths", "b", "chunk", "lowered"),
)


def _exact_body(model, variables, rates, x, layers, widths, b, chunk):
    first = layers[0]
    sizes = [widths[i] for i in layers]
    units = sum(sizes)
    keep = jnp.concatenate(
        [jnp.full((w,), 1.0 - rates[i]) for i, w in zip(layers, sizes, strict=False)]
    )
    bit = jnp.arange(units, dtype=jnp.uint32)
    ids = jnp.arange(2**units, dtype=jnp.uint32).reshape(-1, chunk)
    idx, _ = example_chunks(x.shape[0], b)

    # Only the output layer's input is masked (a Net's; another module's last Dropout
    # need not feed its output linearly).
    affine = contract.is_net(model) and first == len(widths) - 1

    def examples(i):
        h = apply_net(model, variables, x[i], rates, stop=first)  # computed once per example

        def rest(bits):  # (chunk, units) -> logits (chunk, b, C) through the rest of the net
            parts = jnp.split(bits, np.cumsum(sizes)[:-1], axis=1)
            masks = [None] * len(widths)
            for layer, part in zip(layers, parts, strict=False):
                masks[layer] = part
            return jax.vmap(lambda m: apply_net(model, variables, h, rates, m, start=first))(
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

        zeros = jnp.zeros((b, contract.classes(model, x.shape[1:])))
        init = (jnp.full_like(zeros, -jnp.inf), zeros, zeros)
        (log_arith, geo, mean_logits), _ = jax.lax.scan(enumerate_masks, init, ids)
        log_geo = jax.nn.log_softmax(geo)
        return {"arithmetic": jnp.exp(log_arith), "geometric": jnp.exp(log_geo),
                "log_arithmetic": log_arith, "log_geometric": log_geo,
                "mean_logits": mean_logits}  # fmt: skip

    out = jax.lax.map(examples, idx)
    return {k: v.reshape(-1, v.shape[-1])[: x.shape[0]] for k, v in out.items()}
