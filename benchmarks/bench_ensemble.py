"""The ensemble view: Monte-Carlo dropout prediction and exact enumeration, timed.

1. MC prediction, seed MLP 784-500-500-10 (dropout 0.2 input, 0.5 hidden), k = 100
   subnetworks on the 10k MNIST test images:
   - ``jaxdl_mc``: ``ensemble.mc_stats``, one compiled program that also returns the whole
     accuracy/NLL curve for k = 1…100, disagreement, entropy and mutual information;
   - ``jax_loop``: a Python loop over the k masks calling a jitted forward pass (what a
     user writes first);
   - ``torch_func_vmap``: ``torch.func.vmap`` of a masked forward pass over chunks of
     masks with shared weights, averaging probabilities (if torch is installed).
   Reported as subnetwork-examples per second (k × 10k / time) and as a fraction of the
   f32 matmul roofline (the forward GEMM FLOPs at the best square-``jnp.dot`` rate).
2. Exact enumeration of M = 16 masked units (784-500-500-16-10, dropout on the 16
   units feeding the output layer only), 10k test images: ``ensemble.exact_probs``
   against 2^16 full forward passes (vectorised, timed on 128 masks and scaled), with
   absolute times and XLA's memory estimate of the exact program.

Usage: ``python benchmarks/bench_ensemble.py [--json] [--rounds 3]``.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import peers  # noqa: E402
from common import device_name, emit, interleaved, matmul_flops_per_second, parse_args  # noqa: E402

import jaxdl  # noqa: E402
from jaxdl import ensemble  # noqa: E402

K = 100
RATES = (0.2, 0.5, 0.5)


def _forward_flops(sizes) -> int:
    return 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def jax_loop(model, variables, x, masks, rates):
    """One jitted forward pass per subnetwork, probabilities averaged on the device."""
    fwd = jax.jit(lambda v, m: jax.nn.softmax(model.apply(v, x, masks=m, rates=rates)))
    k = masks[0].shape[0]

    def run():
        total = 0.0
        for j in range(k):
            total = total + fwd(variables, tuple(m[j] for m in masks))
        (total / k).block_until_ready()

    return run


def torch_mc(variables, x, masks, rates, chunk: int = 10):
    torch = peers.torch_available()
    if torch is None:
        return None
    from torch.func import vmap

    p = variables["params"]
    names = ("layer_0", "layer_1", "output")
    w = [torch.from_numpy(np.asarray(p[n]["kernel"])) for n in names]
    b = [torch.from_numpy(np.asarray(p[n]["bias"])) for n in names]
    keep = [1.0 - r for r in rates]
    xt = torch.from_numpy(np.asarray(x))
    mt = [torch.from_numpy(np.asarray(m)) for m in masks]

    def forward(m0, m1, m2, xb):  # inverted dropout: kept units scaled by 1/keep
        h = torch.relu((xb * m0 / keep[0]) @ w[0] + b[0])
        h = torch.relu((h * m1 / keep[1]) @ w[1] + b[1])
        return torch.softmax((h * m2 / keep[2]) @ w[2] + b[2], dim=-1)

    batched = vmap(forward, in_dims=(0, 0, 0, None))
    k = mt[0].shape[0]

    def run():
        with torch.no_grad():
            total = torch.zeros(xt.shape[0], w[2].shape[1])
            for s in range(0, k, chunk):
                total += batched(*(m[s : s + chunk] for m in mt), xt).sum(0)
            return total / k

    return run


def mc_scenario(x, y, rounds):
    sizes = (784, 500, 500, 10)
    model = jaxdl.MLP(hidden=sizes[1:-1])
    variables = model.init(jax.random.key(0), x[:1])
    masks = ensemble.sample_masks(jax.random.key(1), model, RATES, K, (784,))
    rates = jnp.asarray(RATES)
    t0 = time.perf_counter()
    ensemble.mc_stats(model, variables, RATES, x, y, masks)
    first = time.perf_counter() - t0
    runs = {
        "jaxdl_mc": lambda: ensemble.mc_stats(model, variables, RATES, x, y, masks),
        "jax_loop": jax_loop(model, variables, jnp.asarray(x), masks, rates),
    }
    runs["jax_loop"]()  # compile
    t = torch_mc(variables, x, masks, RATES)
    if t is not None:
        t()
        runs["torch_func_vmap"] = t
    best = interleaved(runs, rounds)
    compiles = ensemble.traces["mc"]
    rows = {way: K * len(x) / s for way, s in best.items()}
    flops = K * len(x) * _forward_flops(sizes)
    return rows, best, {"mc_first_call_seconds": first, "mc_programs": compiles,
                        "mc_gflops": flops / best["jaxdl_mc"] / 1e9}  # fmt: skip


def exact_scenario(x, rounds):
    sizes = (784, 500, 500, 16, 10)
    model = jaxdl.MLP(hidden=sizes[1:-1])
    variables = model.init(jax.random.key(0), x[:1])
    rates = (0.0, 0.0, 0.0, 0.5)
    t0 = time.perf_counter()
    ensemble.exact_probs(model, variables, rates, x)
    first = time.perf_counter() - t0
    sample = 128  # the time of 2^16 passes is linear in the count: timed on 128, scaled
    masks = ensemble.sample_masks(jax.random.key(1), model, rates, sample, (784,))
    xd, rd = jnp.asarray(x), jnp.asarray(rates)

    @jax.jit
    def full(v, m):  # every subnetwork through the whole network, 8 at a time
        chunks = jax.tree_util.tree_map(lambda a: a.reshape(-1, 8, a.shape[-1]), m)

        def probs(mm):
            return jax.nn.softmax(ensemble.subnetwork_logits(model, v, rd, xd, mm))

        return jax.lax.map(lambda mm: probs(mm).sum(0), chunks).sum(0)

    jax.block_until_ready(full(variables, masks))
    best = interleaved(
        {
            "exact": lambda: ensemble.exact_probs(model, variables, rates, x),
            "full_passes_sample": lambda: jax.block_until_ready(full(variables, masks)),
        },
        rounds,
    )
    full_all = best["full_passes_sample"] * 2**16 / sample
    lowered = ensemble.exact_program.lower(*ensemble.exact_program_args(model, variables, rates, x))
    mem = lowered.compile().memory_analysis()
    temp = None if mem is None else mem.temp_size_in_bytes / 2**20
    return {
        "exact_seconds": best["exact"],
        "exact_first_call_seconds": first,
        "full_passes_seconds_extrapolated": full_all,
        "exact_speedup_vs_full_passes": full_all / best["exact"],
        "exact_temp_mib": temp,
        "full_passes_logits_gib": 2**16 * len(x) * 10 * 4 / 2**30,
    }


def main(argv=None):
    a = parse_args(__doc__, argv, rounds=3, unit="call")
    test = jaxdl.load("mnist").test
    x, y = np.asarray(test.x), np.asarray(test.y)
    peak = matmul_flops_per_second()
    rows, best, extra = mc_scenario(x, y, a.rounds)
    ratios = {f"jaxdl_vs_{w}": rows["jaxdl_mc"] / rows[w] for w in rows if w != "jaxdl_mc"}
    extra = {"device": device_name(), "matmul_gflops": peak / 1e9, **extra}
    extra["roofline_fraction"] = extra["mc_gflops"] * 1e9 / peak
    extra["mc_seconds"] = best["jaxdl_mc"]
    extra.update(exact_scenario(x, a.rounds))
    ratios["exact_vs_full_passes"] = extra["exact_speedup_vs_full_passes"]
    emit(f"MC dropout, k={K} subnetworks x 10k MNIST test images (subnetwork-examples/s)",
         rows, ratios, extra, a.json)  # fmt: skip


if __name__ == "__main__":
    main()
