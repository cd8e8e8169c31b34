"""One epoch of the default MLP (784-500-500-10, Adam, batch 100) on MNIST, seven ways.

Ways, timed in one run on the same data, after compilation:

- ``jaxdl``: ``jaxdl`` compiled epoch (shuffling, per-layer gradient norms, activation
  statistics on a probe batch; no validation pass, like the others).
- ``jaxdl_kernels_off``: the same with ``kernels="off"``: XLA alone, the path every
  GPU/TPU user runs (``jaxdl_kernels_off_vs_flax_scan``: what the library adds to a
  hand-written Flax + Optax scan on that path).
- ``jaxdl_optax_update``: the CPU kernels but Optax's Adam update instead of the fused
  one (``jaxdl.cpu.adam``; left out where the kernels cannot run).
- ``jaxdl_xla_gemm``: the CPU kernels but XLA's GEMMs instead of the GEMM kernel
  (``jaxdl.cpu.gemm``; left out where the kernels cannot run).
- ``flax_scan``: a hand-written Flax + Optax loop fused with ``lax.scan`` (shuffled copy
  of the data each epoch), as in Flax's examples.
- ``flax_jit_per_batch``: a hand-written ``jax.jit`` train step called once per batch.
- ``keras``: Keras 3 on the JAX backend, ``model.fit`` (skipped if Keras is absent).
- ``torch_eager``: PyTorch eager (skipped, saying so, if torch is not installed).

Also measured, as samples/s: the roofline (the step's own GEMMs, at their shapes and
layouts, timed alone: what a step could reach if everything else were free; measured in
every round, between the ways, and the fastest kept); the loop roofline (the same
GEMMs as one compiled loop over an epoch's steps with nothing else in it, timed as a way:
``common.mlp_gemm_loop``); and the peak-matmul bound (the step's FLOPs at the best
square-matmul rate of the device). Where jaxdl runs its own GEMM kernel, both rooflines
are measured with XLA's GEMMs and with the kernel, and the faster of each pair is the
bound (``roofline_by``: which it was).
Usage: ``python benchmarks/bench_train.py [--json] [--rounds 5]``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import peers  # noqa: E402
from common import (  # noqa: E402
    device_name,
    emit,
    interleaved,
    jaxdl_epoch,
    matmul_flops_per_second,
    mlp_gemm_loop,
    mlp_step_gemm_seconds,
    mlp_train_flops,
    parse_args,
)

import jaxdl  # noqa: E402
from jaxdl import lowering, train  # noqa: E402
from jaxdl.cpu import gemm  # noqa: E402

SIZES = (784, 500, 500, 10)
BATCH = 100


def _default():
    return jaxdl.MLP(hidden=SIZES[1:-1], num_classes=10), jaxdl.make_optimizer(
        "adam", learning_rate=1e-3
    )


def bench_jaxdl(ds, kernels="auto", **choices):
    """``kernels`` for ``prepare``; ``choices`` (``adam``, ``gemm``) override fields of the
    ``Lowering`` it resolved."""
    setup, hp = train.prepare(
        jaxdl.RunConfig.of(*_default(), epochs=1000, batch_size=BATCH, kernels=kernels), ds
    )
    setup = dataclasses.replace(setup, lowering=dataclasses.replace(setup.lowering, **choices))
    t0 = time.perf_counter()
    epoch, compile_s = jaxdl_epoch(setup, hp, ds)
    return epoch, compile_s, time.perf_counter() - t0


def bench_flax_scan(ds):
    return peers.flax_scan(ds, SIZES, BATCH)


def bench_flax_per_batch(ds):
    x, y = jnp.asarray(ds.x), jnp.asarray(ds.y)
    steps = len(ds.x) // BATCH
    step = jax.jit(peers.flax_step, donate_argnums=0)
    holder = {"state": peers.flax_state(SIZES), "rng": np.random.default_rng(0)}

    def run():
        perm = holder["rng"].permutation(len(ds.x))
        s = holder["state"]
        for i in range(steps):
            idx = perm[i * BATCH : (i + 1) * BATCH]
            s, loss = step(s, x[idx], y[idx])
        loss.block_until_ready()
        holder["state"] = s

    run()
    return run


def bench_keras(ds):
    return peers.keras_epoch(ds, SIZES, BATCH)


def bench_torch(ds):
    return peers.torch_epoch(ds, SIZES, BATCH)


def main(argv=None):
    a = parse_args(__doc__, argv, rounds=5, unit="epoch")
    ds = jaxdl.load("mnist").train
    runs, extra = {}, {}
    runs["jaxdl"], extra["jaxdl_compile_seconds"], extra["jaxdl_first_epoch_seconds"] = bench_jaxdl(
        ds
    )
    runs["jaxdl_kernels_off"] = bench_jaxdl(ds, kernels="off")[0]
    kernel = lowering.resolve("auto").kernels == "on"
    if kernel:
        runs["jaxdl_optax_update"] = bench_jaxdl(ds, adam=False)[0]
        runs["jaxdl_xla_gemm"] = bench_jaxdl(ds, gemm=False)[0]
    else:
        print("jaxdl_optax_update, jaxdl_xla_gemm: skipped: jaxdl runs XLA alone here "
              f"({gemm.unavailable() or 'kernels off'})", file=sys.stderr)  # fmt: skip
    extra["kernels"] = "on" if kernel else "off"
    runs["flax_scan"], extra["flax_scan_first_epoch_seconds"] = bench_flax_scan(ds)
    runs["flax_jit_per_batch"] = bench_flax_per_batch(ds)
    for name, fn in (("keras", bench_keras), ("torch_eager", bench_torch)):
        run = fn(ds)
        if run is not None:
            runs[name] = run
    steps = len(ds.x) // BATCH
    bys = ("xla", "kernel") if kernel else ("xla",)
    probes = {}
    for by in bys:
        k = by == "kernel"
        runs[f"gemm_loop_{by}"] = mlp_gemm_loop(SIZES, BATCH, steps, kernel=k)
        probes[f"step_gemm_{by}"] = functools.partial(mlp_step_gemm_seconds, SIZES, BATCH, kernel=k)
    best = interleaved(runs, a.rounds, probes)
    step_gemm = {by: best.pop(f"step_gemm_{by}") for by in bys}
    loop = {by: steps * BATCH / best.pop(f"gemm_loop_{by}") for by in bys}
    rows = {k: len(ds.x) / t for k, t in best.items()}
    flops = mlp_train_flops(SIZES)
    peak = matmul_flops_per_second()
    by = min(step_gemm, key=step_gemm.get)  # the faster GEMMs bound the step
    rows["roofline"] = BATCH / step_gemm[by]
    rows["loop_roofline"] = max(loop.values())
    rows["peak_matmul_bound"] = peak / flops
    extra["roofline_by"] = by
    extra["loop_roofline_by"] = max(loop, key=loop.get)
    for b in bys:
        extra[f"roofline_{b}_gemm"] = BATCH / step_gemm[b]
        extra[f"loop_roofline_{b}_gemm"] = loop[b]
    ratios = {
        f"jaxdl_vs_{k}": rows["jaxdl"] / v
        for k, v in rows.items()
        if k not in ("jaxdl", "roofline", "loop_roofline", "peak_matmul_bound")
    }
    ratios["jaxdl_kernels_off_vs_flax_scan"] = rows["jaxdl_kernels_off"] / rows["flax_scan"]
    extra.update(
        roofline_fraction=rows["jaxdl"] / rows["roofline"],
        loop_roofline_fraction=rows["jaxdl"] / rows["loop_roofline"],
        peak_fraction=rows["jaxdl"] / rows["peak_matmul_bound"],
        step_gemm_gflops=flops * BATCH / step_gemm[by] / 1e9,
        matmul_gflops=peak / 1e9,
        train_mflops_per_sample=flops / 1e6,
        device=device_name(),
    )
    emit(
        "One epoch of 784-500-500-10 / Adam / batch 100 on MNIST (50k)", rows, ratios, extra, a.json
    )


if __name__ == "__main__":
    main()
