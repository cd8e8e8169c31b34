"""The default MLP's eight GEMMs per training step, by each library's CPU GEMM.

784-500-500-10 at batch 100: forward x·W (3), weight gradients xᵀ·δ (3), input gradients
δ·Wᵀ (2). Each GEMM is run ``--calls`` times back to back and timed per call, the
libraries in turn for ``--rounds`` rounds, each library's GEMMs after a pause that lets
the previous library's threads go idle (best kept):

- ``xla``: ``lax.dot_general`` inside a compiled ``lax.scan``, as an epoch runs it (what
  the hand-written loops and Keras on JAX get);
- ``jaxdl``: as jaxdl's dense layers run them: ``jaxdl.gemm``'s kernel in the same loop,
  and for the 10-wide output layer (narrower than ``gemm.MIN_WIDTH``) XLA's GEMMs but
  the kernel for its weight gradient, as (δᵀ·x)ᵀ; where the kernel is available (a CPU
  with AVX-512 and a C++ compiler);
- ``torch``: PyTorch's ``matmul`` in eager mode (MKL/oneDNN), if PyTorch is installed;
- ``numpy``: NumPy's ``matmul`` (its bundled OpenBLAS).

Each uses all cores (PyTorch and OpenBLAS their own thread pools). Prints GFLOP/s per
GEMM and the step's GEMM time per library. A step cannot take less than its GEMMs, so
this says which bounds each library's GEMMs set: ``bench_train.py``'s ≥ 2× PyTorch
eager needs a step in half of PyTorch's, which is below XLA's GEMM time on CPUs where
MKL's GEMMs are much faster (benchmarks/README.md).
Usage: ``python benchmarks/bench_gemm.py [--json] [--rounds 5] [--calls 50]``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    best_of,
    device_name,
    gemm_fn,
    kernel_available,
    mlp_train_flops,
    parse_args,
)
from peers import torch_available  # noqa: E402

SIZES = (784, 500, 500, 10)
BATCH = 100


def step_gemms(sizes=SIZES, batch=BATCH) -> list[tuple[str, tuple, tuple, str]]:
    """(name, lhs shape, rhs shape, form) of one step's GEMMs; form ``nn``: a·b, ``tn``:
    aᵀ·b, ``nt``: a·bᵀ. The layer's width is the last dimension of ``nn``'s and ``tn``'s
    right operand and of ``nt``'s left one."""
    out = []
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        out.append((f"x·W {batch}x{k}·{k}x{n}", (batch, k), (k, n), "nn"))
        out.append((f"xT·d {k}x{batch}·{batch}x{n}", (batch, k), (batch, n), "tn"))
        if i > 0:
            out.append((f"d·WT {batch}x{n}·{n}x{k}", (batch, n), (k, n), "nt"))
    return out


def flops(lhs, rhs, form) -> int:
    m, k = (lhs[1], lhs[0]) if form == "tn" else lhs
    n = rhs[0] if form == "nt" else rhs[1]
    return 2 * m * k * n


def compiled_way(a, b, form, calls: int, kernel: bool, width: int | None = None):
    """``calls`` GEMMs in one compiled scan, by XLA or by jaxdl's kernel; the carry feeds
    each into the next call's operand so that XLA can neither hoist nor drop them."""
    fn = gemm_fn(form, kernel, width)

    def loop(a, b):
        def body(c, _):
            out = fn(a + c, b)
            return c + 0 * out[0, 0], None

        return jax.lax.scan(body, jnp.float32(0), None, length=calls)[0]

    run = jax.jit(loop)
    a, b = jnp.asarray(a), jnp.asarray(b)
    run(a, b).block_until_ready()
    return lambda: run(a, b).block_until_ready()


def eager_way(a, b, form, calls: int):
    fn = gemm_fn(form, kernel=False)  # the same operators work on NumPy and PyTorch arrays

    def run():
        for _ in range(calls):
            fn(a, b)

    run()
    return run


def main(argv=None) -> dict:
    args = parse_args(
        __doc__, argv, rounds=5, unit="batch of calls",
        extra=lambda p: p.add_argument("--calls", type=int, default=50,
                                       help="GEMMs per timed batch"),
    )  # fmt: skip
    torch = torch_available()
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    gemms = step_gemms()
    # the same FLOPs as bench_train's roofline counts
    assert sum(flops(ls, rs, f) for _, ls, rs, f in gemms) == mlp_train_flops(SIZES) * BATCH
    kernel = kernel_available()
    if not kernel:
        print("  jaxdl: its GEMM kernel is not available here; skipped")
    libs = ["xla", *(["jaxdl"] if kernel else []), *(["torch"] if torch is not None else []),
            "numpy"]  # fmt: skip
    runs = {}
    for name, ls, rs, form in gemms:
        a, b = rng.standard_normal(ls, np.float32), rng.standard_normal(rs, np.float32)
        runs[f"xla|{name}"] = compiled_way(a, b, form, args.calls, kernel=False)
        if kernel:
            width = ls[1] if form == "nt" else rs[1]
            runs[f"jaxdl|{name}"] = compiled_way(a, b, form, args.calls, True, width)
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            runs[f"torch|{name}"] = eager_way(ta, tb, form, args.calls)
        runs[f"numpy|{name}"] = eager_way(a, b, form, args.calls)
    t0 = time.perf_counter()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.rounds):
        for lib in libs:
            # Each library's idle threads spin for a while after its last call; on a
            # 2-core machine they would slow the next library's GEMMs.
            time.sleep(0.5)
            for way, run in runs.items():
                if way.startswith(lib + "|"):
                    best[way] = min(best[way], best_of(run, 3))
    seconds = {way: t / args.calls for way, t in best.items()}
    print(f"\nThe step's GEMMs of {'-'.join(map(str, SIZES))} at batch {BATCH}, GFLOP/s")
    print(f"  {'GEMM':<24}" + "".join(f"{lib:>9}" for lib in libs))
    gflops = {}
    for name, ls, rs, form in gemms:
        row = {lib: flops(ls, rs, form) / seconds[f"{lib}|{name}"] / 1e9 for lib in libs}
        gflops[name] = row
        print(f"  {name:<24}" + "".join(f"{row[lib]:9.1f}" for lib in libs))
    step_ms = {lib: 1e3 * sum(seconds[f"{lib}|{g[0]}"] for g in gemms) for lib in libs}
    print(f"  {'step (ms)':<24}" + "".join(f"{step_ms[lib]:9.3f}" for lib in libs))
    # how much faster than XLA's GEMMs each library's are (above 1: faster)
    ratios = {f"{lib}_vs_xla": step_ms["xla"] / step_ms[lib] for lib in libs if lib != "xla"}
    for name, r in ratios.items():
        print(f"  {name}: {r:.2f}x")
    print(f"  ({time.perf_counter() - t0:.1f} s; {device_name()})")
    out = {"gflops": gflops, "step_ms": step_ms, "ratios": ratios, "device": device_name()}
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
