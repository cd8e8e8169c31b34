"""Adam's parameter update alone: Optax as jaxdl runs it, against jaxdl's fused update.

The seed MLP's parameters (784-500-500-10: 650k floats), ``--steps`` updates in a
``lax.scan``, in two settings: one member per CPU core at once (the serial sweep's), and
one member on one device whose operations split over the cores (``fit``'s):

- ``optax``: ``jaxdl.make_optimizer("adam").tx.update`` then ``optax.apply_updates``,
  compiled with jaxdl's compiler options. XLA:CPU emits three fusions per parameter
  (first moment, second moment, then the parameter, which reads both): ten passes over
  each array.
- ``fused``: ``jaxdl.cpu.adam.step``, an XLA FFI handler (``jaxdl/cpu/adam.cc``) that does the
  update in one loop (seven passes), aliased in place, its chunks spread over XLA's
  thread pool. Skipped, saying so, where it cannot be built.

Prints microseconds per update, the ratios, the arrays' effective bandwidth, and how far
the fused parameters end from Optax's. Usage:
``python benchmarks/bench_adam_update.py [--json] [--rounds 5] [--steps 300]``.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
from common import device_name, interleaved, parse_args  # noqa: E402

import jaxdl  # noqa: E402
from jaxdl import devices, optim  # noqa: E402
from jaxdl.cpu import adam as fused  # noqa: E402

SIZES = (784, 500, 500, 10)


def main(argv=None):
    a = parse_args(
        __doc__, argv, rounds=5, unit="call",
        extra=lambda p: p.add_argument("--steps", type=int, default=300, help="updates per call"),
    )  # fmt: skip
    jaxdl.use_cpu_cores()  # before JAX's first computation: one member per core
    opt = jaxdl.make_optimizer("adam", learning_rate=1e-3)
    # Arguments of the programs, as the optimizer state's values are in training (XLA
    # would fold constants and change its roundings).
    hyper = {k: jnp.float32(opt.hyperparams[k]) for k in ("learning_rate", "b1", "b2", "eps")}
    names = [f"layer_{i}" for i in range(len(SIZES) - 2)] + ["output"]
    shapes = {
        name: {"kernel": (i, o), "bias": (o,)}
        for name, i, o in zip(names, SIZES[:-1], SIZES[1:], strict=True)
    }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    ks = jax.random.split(jax.random.key(0), 2 * len(leaves))
    params, grads = (
        treedef.unflatten(
            [jax.random.normal(k, s) * scale for k, s in zip(half, leaves, strict=True)]
        )
        for half, scale in ((ks[: len(leaves)], 0.05), (ks[len(leaves) :], 0.01))
    )
    steps = jnp.arange(a.steps, dtype=jnp.float32)

    def step_grads(grads, i, vary: bool):
        # Timed: the same gradients every step. Compared: a new gradient each step (XLA
        # hoists loop-invariant products out of the loop, which changes its roundings).
        return jax.tree.map(lambda x: x * (1 + 1e-3 * i), grads) if vary else grads

    def make_run(use_fused: bool):
        def run(params, grads, hyper, vary=False):
            def body(c, i):
                p, s = c
                g = step_grads(grads, i, vary)
                if use_fused:
                    return fused.step(opt, g, s, p), None
                u, s = opt.tx.update(g, s, p)
                return (optax.apply_updates(p, u), s), None

            state = optim.set_hyperparams(opt.init(params), hyper)
            return jax.lax.scan(body, (params, state), steps)[0][0]

        return run

    optax_run, fused_run = make_run(False), make_run(True)

    mesh = Mesh(np.asarray(jax.devices()), ("core",))

    def per_core(run, vary=False):  # one member on every core at once
        def one(p, g, hyper):
            first = lambda t: jax.tree.map(lambda x: x[0], t)  # noqa: E731
            return jax.tree.map(lambda x: x[None], run(first(p), first(g), hyper, vary))

        mapped = jax.shard_map(
            one, mesh=mesh, in_specs=(P("core"), P("core"), P()), out_specs=P("core"),
            check_vma=False,
        )  # fmt: skip
        return jax.jit(mapped, compiler_options=devices.compiler_options())

    n = len(jax.devices())
    stacked = jax.device_put(
        jax.tree.map(lambda x: jnp.stack([x] * n), (params, grads)), NamedSharding(mesh, P("core"))
    )
    one = jax.jit(optax_run, compiler_options=devices.compiler_options())
    ways = {"optax": per_core(optax_run), "optax_one_device": one}
    skipped = fused.unavailable()
    if skipped is None:
        ways["fused"] = per_core(fused_run)
        ways["fused_one_device"] = jax.jit(fused_run, compiler_options=devices.compiler_options())
    else:
        print(f"fused: skipped: {skipped}", file=sys.stderr)
    args = {k: ((params, grads) if k.endswith("one_device") else stacked) for k in ways}
    calls = {
        name: (lambda run=run, x=args[name]: jax.block_until_ready(run(*x, hyper)))
        for name, run in ways.items()
    }
    for call in calls.values():  # compile and warm up
        call()
    best = interleaved(calls, a.rounds)
    floats = sum(int(np.prod(s)) for s in leaves)
    us = {name: t / a.steps * 1e6 for name, t in best.items()}
    summary = {"device": device_name(), "cores": n, "parameters": floats, "us_per_update": us}
    members = {k: 1 if k.endswith("one_device") else n for k in us}  # updated at once
    summary["gb_per_s"] = {
        k: (7 if k.startswith("fused") else 10) * floats * 4 * members[k] / (v * 1e3)
        for k, v in us.items()
    }
    print(f"\nAdam's update, {floats:,} parameters: one member per core on {n} cores")
    print("(*_one_device: one member on one device, its operations split over the cores)")
    for name, v in us.items():
        print(f"  {name:17s} {v:8.1f} us per update  ({summary['gb_per_s'][name]:.0f} GB/s)")
    if "fused" in ways:
        # Compared on a new gradient every step, the first core's member, array by array.
        vs = [per_core(f, vary=True)(*stacked, hyper) for f in (optax_run, fused_run)]
        pairs = [(x[0], y[0]) for x, y in zip(*map(jax.tree.leaves, vs), strict=True)]
        summary["unequal_per_array"] = [int((x != y).sum()) for x, y in pairs]
        summary["unequal_params"] = sum(summary["unequal_per_array"])
        diff = max(float(jnp.abs(x - y).max()) for x, y in pairs)
        summary["fused_vs_optax"] = us["optax"] / us["fused"]
        summary["fused_vs_optax_one_device"] = us["optax_one_device"] / us["fused_one_device"]
        summary["max_abs_param_diff"] = diff
        print(
            f"  fused vs optax {summary['fused_vs_optax']:.2f}x per core, "
            f"{summary['fused_vs_optax_one_device']:.2f}x on one device; params after "
            f"{a.steps} updates differ by ≤ {diff:.2g}"
        )
    else:
        summary["fused_skipped"] = skipped
    if a.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
