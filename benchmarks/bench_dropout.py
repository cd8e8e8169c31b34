"""One epoch of the default MLP (784-500-500-10, Adam, batch 100) on MNIST with dropout
(0.2 on the input, 0.5 on each hidden layer, as in Hinton et al. and ``jaxdl ensemble``).

Ways, timed in turn in one run on the same data, after compilation:

- ``jaxdl``: ``jaxdl`` compiled epoch, masks drawn by ``jaxdl.cpu.bernoulli``'s kernel.
- ``jaxdl_jax_bernoulli``: the same with the masks drawn by ``jax.random.bernoulli``
  (the same bits, XLA's threefry; left out where jaxdl itself draws them so).
- ``jaxdl_no_dropout``: ``jaxdl`` without dropout (what dropout costs).
- ``flax_scan``: a hand-written Flax + Optax epoch fused with ``lax.scan``, with
  ``nn.Dropout`` (``jax.random.bernoulli``), as in Flax's examples.
- ``keras``: Keras 3 on the JAX backend with ``Dropout`` layers (skipped if absent).
- ``torch_eager``: PyTorch eager with ``nn.Dropout`` (skipped, saying so, if absent).

Usage: ``python benchmarks/bench_dropout.py [--json] [--rounds 5]``.
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
import optax
from flax import linen as nn
from flax.training import train_state

sys.path.insert(0, os.path.dirname(__file__))
import peers  # noqa: E402
from common import device_name, emit, interleaved, jaxdl_epoch, parse_args  # noqa: E402

import jaxdl  # noqa: E402
from jaxdl import lowering, train  # noqa: E402
from jaxdl.cpu import bernoulli  # noqa: E402

SIZES = (784, 500, 500, 10)
BATCH = 100
RATES = (0.2, 0.5, 0.5)  # input, then each hidden layer


def bench_jaxdl(ds, rates=RATES, masks: bool = True):
    """jaxdl's compiled epoch as ``fit`` runs it (``masks=False``: the masks drawn by
    ``jax.random.bernoulli`` instead of the kernel, the rest lowered alike)."""
    model = jaxdl.MLP(hidden=SIZES[1:-1], num_classes=10)
    opt = jaxdl.make_optimizer("adam", learning_rate=1e-3)
    setup, hp = train.prepare(
        jaxdl.RunConfig.of(model, opt, epochs=1000, batch_size=BATCH, dropout=rates), ds
    )
    if not masks:
        setup = dataclasses.replace(
            setup, lowering=dataclasses.replace(setup.lowering, masks=False)
        )
    return jaxdl_epoch(setup, hp, ds)


def bench_jaxdl_jax_bernoulli(ds):
    return bench_jaxdl(ds, masks=False)[0]


class FlaxDropoutMLP(nn.Module):
    sizes: tuple[int, ...]
    rates: tuple[float, ...]

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dropout(self.rates[0], deterministic=not train)(x)
        for w, r in zip(self.sizes[1:-1], self.rates[1:], strict=True):
            x = nn.Dropout(r, deterministic=not train)(nn.relu(nn.Dense(w)(x)))
        return nn.Dense(self.sizes[-1])(x)


def bench_flax_scan(ds):
    model = FlaxDropoutMLP(SIZES, RATES)
    params = model.init(jax.random.key(0), jnp.zeros((1, SIZES[0])), train=False)["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
    x, y = jnp.asarray(ds.x), jnp.asarray(ds.y)
    steps = len(ds.x) // BATCH

    def step(state, batch):
        bx, by, key = batch

        def loss_fn(p):
            logits = state.apply_fn({"params": p}, bx, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, by).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    @functools.partial(jax.jit, donate_argnums=0)
    def epoch(state, key):
        k_perm, k_drop = jax.random.split(key)
        perm = jax.random.permutation(k_perm, len(x))[: steps * BATCH].reshape(steps, BATCH)
        keys = jax.random.split(k_drop, steps)
        return jax.lax.scan(step, state, (x[perm], y[perm], keys))

    holder = {"state": state, "key": jax.random.key(1)}

    def run():
        holder["key"], k = jax.random.split(holder["key"])
        holder["state"], losses = epoch(holder["state"], k)
        losses.block_until_ready()

    run()
    return run


def bench_keras(ds):
    return peers.keras_epoch(ds, SIZES, BATCH, RATES)


def bench_torch(ds):
    return peers.torch_epoch(ds, SIZES, BATCH, RATES)


def main(argv=None):
    a = parse_args(__doc__, argv, rounds=5, unit="epoch")
    ds = jaxdl.load("mnist").train
    runs, extra = {}, {}
    t0 = time.perf_counter()
    runs["jaxdl"], extra["jaxdl_compile_seconds"] = bench_jaxdl(ds)
    extra["jaxdl_first_epoch_seconds"] = time.perf_counter() - t0
    kernel = lowering.resolve("auto").masks
    if kernel:
        runs["jaxdl_jax_bernoulli"] = bench_jaxdl_jax_bernoulli(ds)
    else:
        print(f"jaxdl_jax_bernoulli: skipped: jaxdl draws with jax.random.bernoulli here "
              f"({bernoulli.unavailable() or 'kernels off'})", file=sys.stderr)  # fmt: skip
    extra["jaxdl_bernoulli_kernel"] = kernel
    runs["jaxdl_no_dropout"] = bench_jaxdl(ds, rates=None)[0]
    runs["flax_scan"] = bench_flax_scan(ds)
    for name, fn in (("keras", bench_keras), ("torch_eager", bench_torch)):
        run = fn(ds)
        if run is not None:
            runs[name] = run
    rows = {k: len(ds.x) / t for k, t in interleaved(runs, a.rounds).items()}
    ratios = {f"jaxdl_vs_{k}": rows["jaxdl"] / v for k, v in rows.items() if k != "jaxdl"}
    extra["device"] = device_name()
    emit(
        "One epoch of 784-500-500-10 / Adam / batch 100 with dropout 0.2 (input) and 0.5 "
        "(hidden) on MNIST (50k)", rows, ratios, extra, a.json,
    )  # fmt: skip


if __name__ == "__main__":
    main()
