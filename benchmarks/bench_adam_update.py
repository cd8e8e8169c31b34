"""Adam's parameter update alone: Optax as jaxdl runs it, against one fused pass.

The seed MLP's parameters (784-500-500-10: 650k floats), ``--steps`` updates in a
``lax.scan``, one member per CPU core at once (the serial sweep's setting):

- ``optax``: ``jaxdl.make_optimizer("adam").tx.update`` then ``optax.apply_updates``,
  compiled with jaxdl's compiler options. XLA:CPU emits three fusions per parameter
  (first moment, second moment, then the parameter, which reads both): ten passes over
  each array.
- ``fused``: ``adam_update.cc``, an XLA FFI handler that does the update in one loop
  (seven passes), aliased in place. Compiled here with ``$CXX`` (default ``g++``) and the
  jaxlib headers; skipped, saying so, when that fails.

Prints microseconds per update, the ratio, the arrays' effective bandwidth, and how far
the fused parameters end from Optax's. Usage:
``python benchmarks/bench_adam_update.py [--json] [--rounds 5] [--steps 300]``.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
from common import device_name, interleaved, parse_args  # noqa: E402

import jaxdl  # noqa: E402
from jaxdl import devices  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(784, 500), (500,), (500, 500), (500,), (500, 10), (10,)]


def build_fused() -> str | None:
    """Compiles adam_update.cc and registers it as the FFI target ``jaxdl_bench_adam``;
    returns None when it is registered, else why it could not be."""
    out = os.path.join(tempfile.mkdtemp(prefix="jaxdl-bench-"), "adam_update.so")
    cmd = [
        os.environ.get("CXX", "g++"), "-O3", "-march=native", "-fno-math-errno",
        "-ffp-contract=off", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w",
        f"-I{jax.ffi.include_dir()}", os.path.join(HERE, "adam_update.cc"), "-o", out,
    ]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        return f"could not compile adam_update.cc ({getattr(e, 'stderr', '') or e})".strip()
    lib = ctypes.cdll.LoadLibrary(out)
    jax.ffi.register_ffi_target("jaxdl_bench_adam", jax.ffi.pycapsule(lib.FusedAdam), "cpu")
    return None


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
    ks = jax.random.split(jax.random.key(0), 2 * len(SHAPES))
    params = [
        jax.random.normal(k, s) * 0.05 for k, s in zip(ks[: len(SHAPES)], SHAPES, strict=True)
    ]
    grads = [jax.random.normal(k, s) * 0.01 for k, s in zip(ks[len(SHAPES) :], SHAPES, strict=True)]
    steps = jnp.arange(a.steps, dtype=jnp.float32)

    def step_grads(grads, i, vary: bool):
        # Timed: the same gradients every step. Compared: a new gradient each step (XLA
        # hoists loop-invariant products out of the loop, which changes its roundings).
        return jax.tree.map(lambda x: x * (1 + 1e-3 * i), grads) if vary else grads

    def optax_run(params, grads, hyper, vary=False):
        def body(c, i):
            p, s = c
            u, s = opt.tx.update(step_grads(grads, i, vary), s, p)
            return (optax.apply_updates(p, u), s), None

        state = opt.tx.init(params)
        state = state._replace(hyperparams={**state.hyperparams, **hyper})
        return jax.lax.scan(body, (params, state), steps)[0][0]

    def fused_leaf(p, g, m, v, scalars):
        out = jax.ShapeDtypeStruct(p.shape, p.dtype)
        call = jax.ffi.ffi_call(
            "jaxdl_bench_adam", (out, out, out), input_output_aliases={0: 0, 2: 1, 3: 2}
        )
        return call(p, g, m, v, scalars)

    def fused_run(params, grads, h, vary=False):
        def body(c, i):
            ps, ms, vs, t = c
            g = step_grads(grads, i, vary)
            t = t + 1
            b1, b2, tf = h["b1"], h["b2"], t.astype(jnp.float32)  # as Optax: pow(b, float(t))
            scalars = jnp.stack(
                [
                    1 - b1,
                    b1,
                    1 - b2,
                    b2,
                    1 / (1 - b1**tf),
                    1 / (1 - b2**tf),
                    0.0,
                    h["eps"],
                    -h["learning_rate"],
                ]
            ).astype(jnp.float32)
            out = [fused_leaf(*leaf, scalars) for leaf in zip(ps, g, ms, vs, strict=True)]
            return (*map(list, zip(*out, strict=True)), t), None

        zeros = [jnp.zeros_like(p) for p in params]
        init = (params, zeros, zeros, jnp.int32(0))
        return jax.lax.scan(body, init, steps)[0][0]

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
    ways = {"optax": per_core(optax_run)}
    skipped = build_fused()
    if skipped is None:
        ways["fused"] = per_core(fused_run)
    else:
        print(f"fused: skipped: {skipped}", file=sys.stderr)
    calls = {
        name: (lambda run=run: jax.block_until_ready(run(*stacked, hyper)))
        for name, run in ways.items()
    }
    for call in calls.values():  # compile and warm up
        call()
    best = interleaved(calls, a.rounds)
    floats = sum(int(np.prod(s)) for s in SHAPES)
    passes = {"optax": 10, "fused": 7}
    us = {name: t / a.steps * 1e6 for name, t in best.items()}
    summary = {"device": device_name(), "cores": n, "parameters": floats, "us_per_update": us}
    summary["gb_per_s"] = {k: passes[k] * floats * 4 * n / (v * 1e3) for k, v in us.items()}
    print(f"\nAdam's update, {floats:,} parameters, one member per core on {n} cores")
    for name, v in us.items():
        print(
            f"  {name:6s} {v:8.1f} us per update  ({summary['gb_per_s'][name]:.0f} GB/s over {n} cores)"
        )
    if "fused" in ways:
        # Compared on a new gradient every step, the first core's member, array by array.
        vs = [per_core(f, vary=True)(*stacked, hyper) for f in (optax_run, fused_run)]
        pairs = [(x[0], y[0]) for x, y in zip(*map(jax.tree.leaves, vs), strict=True)]
        summary["unequal_per_array"] = [int((x != y).sum()) for x, y in pairs]
        summary["unequal_params"] = sum(summary["unequal_per_array"])
        diff = max(float(jnp.abs(x - y).max()) for x, y in pairs)
        summary["fused_vs_optax"] = us["optax"] / us["fused"]
        summary["max_abs_param_diff"] = diff
        print(
            f"  fused vs optax {summary['fused_vs_optax']:.2f}x; params after {a.steps} updates differ by ≤ {diff:.2g}"
        )
    else:
        summary["fused_skipped"] = skipped
    if a.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
