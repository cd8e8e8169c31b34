"""Helpers shared by the benchmark scripts: timing, the f32 matmul roofline, output."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls (each call must block until done)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_flops_per_second(n: int = 2048, repeats: int = 5) -> float:
    """Measured f32 matmul throughput of the default JAX device (FLOP/s): the roofline."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.dot)
    mm(a, b).block_until_ready()
    return 2 * n**3 / best_of(lambda: mm(a, b).block_until_ready(), repeats)


def mlp_train_flops(sizes: tuple[int, ...]) -> int:
    """FLOPs per training example of a dense net: forward 2·MACs, backward 2·MACs for the
    weight gradients and 2·MACs for the input gradients of every layer but the first."""
    macs = [a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    return 6 * sum(macs) - 2 * macs[0]


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} ({platform.processor() or platform.machine()})"


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
