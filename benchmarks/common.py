"""Helpers shared by the benchmark scripts: timing, the f32 matmul roofline, output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdl import compiled, devices, lowering, step, train
from jaxdl.cpu import gemm
from jaxdl.devices import compiler_options


def jaxdl_epoch(setup: step.Setup, hp: step.HParams, ds) -> tuple[Callable[[], None], float]:
    """``fit``'s compiled epoch on ``ds`` from a fresh state, run once (warm): a function
    that runs one more epoch, and the compile time in seconds."""
    state = compiled.programs(setup).init(jax.random.key(0), hp)
    data = train.to_device(ds)
    exe, compile_s = compiled.compile_epoch(setup, state, data, None, hp)
    holder = {"state": state}

    def epoch():
        holder["state"], m = exe(holder["state"], data, None, hp)
        jax.block_until_ready(m)

    epoch()
    return epoch, compile_s


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls (each call must block until done)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved(
    runs: dict[str, Callable[[], object]],
    rounds: int,
    probes: dict[str, Callable[[], float]] | None = None,
) -> dict[str, float]:
    """Best wall time per way, timing the ways in turn ``rounds`` times.

    Interleaving spreads slow phases of a shared machine over every way instead of
    penalising whichever way ran during them. ``probes`` (name -> a function that
    measures and returns seconds, e.g. the roofline's GEMMs) are run once per round too,
    and their smallest result is kept: a bound measured in a fast phase only.
    """
    probes = probes or {}
    best = dict.fromkeys([*runs, *probes], float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
        for name, probe in probes.items():
            best[name] = min(best[name], probe())
    return best


def matmul_flops_per_second(sizes=(512, 1024, 2048), repeats: int = 10) -> float:
    """The f32 matmul roofline: the best FLOP rate of square ``jnp.dot`` on the default
    device over a few sizes (the peak a training step's matmuls could run at)."""
    best = 0.0
    mm = jax.jit(jnp.dot)
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        mm(a, b).block_until_ready()
        best = max(best, 2 * n**3 / best_of(lambda a=a, b=b: mm(a, b).block_until_ready(), repeats))
    return best


def _dispatch_seconds(repeats: int = 200) -> float:
    """Round-trip time of a trivial jitted call: the overhead inside every timed call."""
    f = jax.jit(lambda x: x + 1)
    x = jnp.zeros((1,), jnp.float32)
    f(x).block_until_ready()
    return best_of(lambda: f(x).block_until_ready(), repeats)


def _by_device(devices) -> NamedSharding:
    """Arrays whose leading axis runs over ``devices``, one slice on each."""
    return NamedSharding(Mesh(np.asarray(devices), ("d",)), P("d"))


def kernel_available() -> bool:
    """Whether jaxdl's programs run their dense layers' GEMMs by the CPU kernel here."""
    return lowering.resolve("auto").gemm


def gemm_fn(form: str, kernel: bool, width: int | None = None) -> Callable:
    """``(a, b) -> a·b`` (``nn``), ``aᵀ·b`` (``tn``) or ``a·bᵀ`` (``nt``), by XLA or, with
    ``kernel``, as jaxdl's dense layers run them for a layer ``width`` wide: by
    ``jaxdl.cpu.gemm``'s kernel, or for a layer narrower than ``gemm.MIN_WIDTH`` by XLA but
    for the weight gradient aᵀ·b, which the kernel takes as (bᵀ·a)ᵀ (``gemm.narrow``)."""
    xla = {"nn": lambda a, b: a @ b, "tn": lambda a, b: a.T @ b, "nt": lambda a, b: a @ b.T}
    if not kernel:
        return xla[form]
    if width is not None and width < gemm.MIN_WIDTH:
        return (lambda a, b: gemm.matmul(b, a, ta=True).T) if form == "tn" else xla[form]
    return lambda a, b: gemm.matmul(a, b, ta=form == "tn", tb=form == "nt")


def _gemm_seconds(lhs_shape, rhs_shape, form, repeats: int = 200, devices=None,
                  kernel=False, width=None) -> float:  # fmt: skip
    """Seconds one GEMM (``form`` as in ``gemm_fn``) of these operand shapes takes: best
    of ``repeats`` blocking calls, less the dispatch round trip. (Calls queued back to
    back overlap on the CPU's threads and measure contention instead.) With several
    ``devices``, one such GEMM runs on each at once, and the time is per GEMM (the
    call's / the count)."""
    n = 1 if devices is None else len(devices)
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, lhs_shape, jnp.float32)
    b = jax.random.normal(k2, rhs_shape, jnp.float32)
    dot = jax.jit(gemm_fn(form, kernel, width))
    if n > 1:  # a leading axis over the devices: one GEMM on each
        by_device = _by_device(devices)
        a, b = jax.device_put((jnp.stack([a] * n), jnp.stack([b] * n)), by_device)
        dot = jax.jit(jax.vmap(dot), out_shardings=by_device)
    dot(a, b).block_until_ready()
    return (best_of(lambda: dot(a, b).block_until_ready(), repeats) - _dispatch_seconds()) / n


def mlp_step_gemm_seconds(sizes: tuple[int, ...], batch: int, devices=None,
                          kernel: bool = False) -> float:  # fmt: skip
    """Time the GEMMs of one training step of a dense net take on their own, at their
    own shapes and operand layouts: forward x·W, weight gradient xᵀ·δ, and input
    gradient δ·Wᵀ for every layer but the first. The ceiling a step could reach. With
    several ``devices`` (CPU cores as devices, say), each runs one step's GEMMs at once
    and the time is per step. ``kernel``: as jaxdl's dense layers run them with
    ``jaxdl.cpu.gemm``'s kernel (see ``gemm_fn`` for narrow layers)."""
    total = 0.0
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        kw = {"devices": devices, "kernel": kernel, "width": n}
        total += _gemm_seconds((batch, k), (k, n), "nn", **kw)  # x W
        total += _gemm_seconds((batch, k), (batch, n), "tn", **kw)  # xᵀ δ
        if i > 0:
            total += _gemm_seconds((batch, n), (k, n), "nt", **kw)  # δ Wᵀ
    return total


def mlp_gemm_loop(sizes: tuple[int, ...], batch: int, steps: int, devices=None,
                  kernel: bool = False) -> Callable:  # fmt: skip
    """A compiled loop of ``steps`` training steps' GEMMs and nothing else: the same eight
    GEMMs as ``mlp_step_gemm_seconds`` (forward, weight and input gradients, on a new
    input each step), chained as in backprop but without activations, loss or update.
    Returns a blocking call that runs the loop once; time it like an epoch. With several
    ``devices``, each runs its own loop at once (one step per device per iteration).

    Unlike the per-GEMM probe, this bound is measured as the training programs are: one
    long compiled loop whose steps each read a new input from memory, timed whole, so its
    ratio to an epoch does not rest on the hot-cache, best-of-200 timing of single calls.
    ``kernel``: the GEMMs as jaxdl's dense layers run them with ``jaxdl.cpu.gemm``'s kernel."""
    n = 1 if devices is None else len(devices)
    shapes = list(zip(sizes[:-1], sizes[1:], strict=True))
    keys = jax.random.split(jax.random.key(0), len(shapes) + 1)
    ws = [jax.random.normal(k, (n, a, b), jnp.float32) / np.sqrt(a) for k, (a, b) in
          zip(keys, shapes, strict=False)]  # fmt: skip
    xs = jax.random.uniform(keys[-1], (n, steps, batch, sizes[0]), jnp.float32)
    forms = [{f: gemm_fn(f, kernel, b) for f in ("nn", "tn", "nt")} for _, b in shapes]

    def loop(ws, xs):
        def body(_, x):
            hs = [x]
            for w, f in zip(ws, forms, strict=True):
                hs.append(f["nn"](hs[-1], w))
            d, grads = hs[-1], []
            for i in reversed(range(len(ws))):
                grads.append(forms[i]["tn"](hs[i], d))
                if i > 0:
                    d = forms[i]["nt"](d, ws[i])
            return tuple(grads), None

        zeros = tuple(jnp.zeros_like(w) for w in reversed(ws))
        return jax.lax.scan(body, zeros, xs)[0]

    if n == 1:
        args = ([w[0] for w in ws], xs[0])
        fn = jax.jit(loop)
    else:  # each device runs the plain program on its own slice
        by_device = _by_device(devices)
        args = jax.device_put((ws, xs), by_device)
        local = lambda ws, xs: [g[None] for g in loop([w[0] for w in ws], xs[0])]  # noqa: E731
        # check_vma=False: an FFI call (jaxdl.gemm) does not mark its results per device
        fn = jax.jit(jax.shard_map(local, mesh=by_device.mesh, in_specs=P("d"), out_specs=P("d"),
                                   check_vma=False))  # fmt: skip
    exe = fn.lower(*args).compile(compiler_options=compiler_options())

    def run():
        jax.block_until_ready(exe(*args))

    run()
    return run


def mlp_train_flops(sizes: tuple[int, ...]) -> int:
    """FLOPs per training example of a dense net: forward 2·MACs, backward 2·MACs for the
    weight gradients and 2·MACs for the input gradients of every layer but the first."""
    macs = [a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    return 6 * sum(macs) - 2 * macs[0]


def device_name() -> str:
    d = jax.devices()[0]
    # The machines these benchmarks run on differ from day to day, and so do the ratios.
    cpu = devices.cpu_info("model name") or platform.processor() or platform.machine()
    return f"{d.platform}:{getattr(d, 'device_kind', '')} ({cpu}, {os.cpu_count()} cores)"


def emit(title: str, rows: dict[str, float], ratios: dict[str, float], extra: dict, as_json: bool):
    """Prints a table of samples/s and ratios; with ``as_json`` one JSON line last."""
    print(f"\n{title}")
    width = max(map(len, rows)) + 2
    for way, sps in rows.items():
        print(f"  {way:<{width}} {sps:>12,.0f} samples/s")
    for name, r in ratios.items():
        print(f"  {name:<{width + 8}} {r:6.2f}x")
    for k, v in extra.items():
        if not isinstance(v, dict):
            print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    if as_json:
        out = {"results": rows, "ratios": ratios, **extra}
        print(json.dumps(out, default=lambda o: float(np.asarray(o))))


def parse_args(
    doc: str,
    argv,
    rounds: int,
    unit: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The flags every benchmark takes: ``--json`` and ``--rounds`` (interleaved, best
    kept); ``unit`` names what one timed round runs (an epoch, a call); ``extra`` adds a
    script's own flags."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--rounds", type=int, default=rounds,
                   help=f"timed {unit}s per way, interleaved (best kept)")  # fmt: skip
    if extra is not None:
        extra(p)
    return p.parse_args(argv)
