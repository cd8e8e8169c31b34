"""One epoch of the default MLP (784-500-500-10, Adam, batch 100) on MNIST, six ways.

Ways, timed in one run on the same data, after compilation:

- ``jaxdl``: ``jaxdl`` compiled epoch (shuffling, per-layer gradient norms, activation
  statistics on a probe batch; no validation pass, like the others).
- ``jaxdl_optax_update``: the same with Optax's Adam update instead of jaxdl's fused
  one (``jaxdl.fused``; this way is left out where jaxdl itself runs Optax's).
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
square-matmul rate of the device).
Usage: ``python benchmarks/bench_train.py [--json] [--rounds 5]``.
"""

from __future__ import annotations

import dataclasses
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
    matmul_flops_per_second,
    mlp_gemm_loop,
    mlp_step_gemm_seconds,
    mlp_train_flops,
    parse_args,
)

import jaxdl  # noqa: E402
from jaxdl import fused, train  # noqa: E402

SIZES = (784, 500, 500, 10)
BATCH = 100


def _default():
    return jaxdl.MLP(hidden=SIZES[1:-1], num_classes=10), jaxdl.make_optimizer(
        "adam", learning_rate=1e-3
    )


def bench_jaxdl(ds, fused_adam: bool | None = None):
    """``fused_adam``: None keeps what ``prepare`` chose; False: Optax's update."""
    setup, hp = train.prepare(*_default(), ds, epochs=1000, batch_size=BATCH)
    if fused_adam is not None:
        setup = dataclasses.replace(setup, fused_adam=fused_adam)
    state = train.programs(setup).init(jax.random.key(0), hp)
    data = train.to_device(ds)
    t0 = time.perf_counter()
    exe, compile_s = train.compile_epoch(setup, state, data, None, hp)
    holder = {"state": state}

    def epoch():
        holder["state"], m = exe(holder["state"], data, None, hp)
        jax.block_until_ready(m)

    epoch()
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
    try:
        import keras
    except ImportError:
        print("  keras: not installed (pip install -e '.[bench]'); skipped")
        return None
    if keras.backend.backend() != "jax":
        print(f"  keras: backend is {keras.backend.backend()}, not jax; skipped")
        return None
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((SIZES[0],))]
        + [keras.layers.Dense(w, activation="relu") for w in SIZES[1:-1]]
        + [keras.layers.Dense(SIZES[-1])]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    def run():
        model.fit(ds.x, ds.y, batch_size=BATCH, epochs=1, shuffle=True, verbose=0)

    run()
    return run


def bench_torch(ds):
    torch = peers.torch_available()
    if torch is None:
        return None
    torch.manual_seed(0)
    net = peers.torch_mlp(torch, SIZES)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.from_numpy(ds.x), torch.from_numpy(ds.y.astype(np.int64))
    lossf = torch.nn.CrossEntropyLoss()

    def run():
        perm = torch.randperm(len(x))
        for i in range(len(x) // BATCH):
            idx = perm[i * BATCH : (i + 1) * BATCH]
            opt.zero_grad()
            loss = lossf(net(x[idx]), y[idx])
            loss.backward()
            opt.step()

    run()
    return run


def main(argv=None):
    a = parse_args(__doc__, argv, rounds=5, unit="epoch")
    ds = jaxdl.load("mnist").train
    runs, extra = {}, {}
    runs["jaxdl"], extra["jaxdl_compile_seconds"], extra["jaxdl_first_epoch_seconds"] = bench_jaxdl(
        ds
    )
    if fused.unavailable(_default()[1]) is None:
        runs["jaxdl_optax_update"] = bench_jaxdl(ds, fused_adam=False)[0]
    else:
        print("jaxdl_optax_update: skipped: jaxdl itself runs Optax's update here", file=sys.stderr)
    extra["jaxdl_fused_adam"] = "jaxdl_optax_update" in runs
    runs["flax_scan"], extra["flax_scan_first_epoch_seconds"] = bench_flax_scan(ds)
    runs["flax_jit_per_batch"] = bench_flax_per_batch(ds)
    for name, fn in (("keras", bench_keras), ("torch_eager", bench_torch)):
        run = fn(ds)
        if run is not None:
            runs[name] = run
    steps = len(ds.x) // BATCH
    runs["gemm_loop"] = mlp_gemm_loop(SIZES, BATCH, steps)
    best = interleaved(runs, a.rounds, {"step_gemm": lambda: mlp_step_gemm_seconds(SIZES, BATCH)})
    step_gemm = best.pop("step_gemm")
    loop_roofline = steps * BATCH / best.pop("gemm_loop")
    rows = {k: len(ds.x) / t for k, t in best.items()}
    flops = mlp_train_flops(SIZES)
    peak = matmul_flops_per_second()
    rows["roofline"] = BATCH / step_gemm
    rows["loop_roofline"] = loop_roofline
    rows["peak_matmul_bound"] = peak / flops
    ratios = {
        f"jaxdl_vs_{k}": rows["jaxdl"] / v
        for k, v in rows.items()
        if k not in ("jaxdl", "roofline", "loop_roofline", "peak_matmul_bound")
    }
    extra.update(
        roofline_fraction=rows["jaxdl"] / rows["roofline"],
        loop_roofline_fraction=rows["jaxdl"] / rows["loop_roofline"],
        peak_fraction=rows["jaxdl"] / rows["peak_matmul_bound"],
        step_gemm_gflops=flops * BATCH / step_gemm / 1e9,
        matmul_gflops=peak / 1e9,
        train_mflops_per_sample=flops / 1e6,
        device=device_name(),
    )
    emit(
        "One epoch of 784-500-500-10 / Adam / batch 100 on MNIST (50k)", rows, ratios, extra, a.json
    )


if __name__ == "__main__":
    main()
