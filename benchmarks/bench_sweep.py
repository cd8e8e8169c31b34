"""Sweeps: many models in one compiled program against running them one after another.

Two scenarios, one epoch of MNIST (50k) per member, Adam, batch 100, members differing
in learning rate (and seed):

- seed MLP 784-500-500-10, 8 members: jaxdl's sweep; the hand-written Flax scan loop run
  8 times in sequence (timed as the 8 epochs, not one epoch scaled); PyTorch's
  ``torch.func`` ensembling (``stack_module_state`` + ``vmap``), if torch is installed.
- small MLP 784-64-10, 32 members: jaxdl's sweep against 32 sequential runs.

Both sweeps have one seed, so the members share the data order (``sweep``'s default
then): each minibatch is gathered once and, for the narrow first layer, fed to all
members as one GEMM. ``jaxdl_sweep_own_orders`` is the same sweep with every member
gathering its own minibatches (``data_order="own"``, what a multi-seed sweep does).

As ``jaxdl sweep`` does, the script first makes the CPU's cores devices
(``jaxdl.use_cpu_cores``), and the sweeps shard their members over them;
``jaxdl_sweep_one_device`` is the default sweep kept on one device, whose operations
split across the cores. The sequential runs and PyTorch use every core for each step, as
they would alone. ``JAX_NUM_CPU_DEVICES=1`` runs the script with one device throughout.
The roofline is the faster of the step's GEMMs split across the cores and one step's
GEMMs on every core at once; the loop roofline likewise the faster of one compiled loop
of an epoch's step GEMMs (``common.mlp_gemm_loop``, timed as a way) on one device and
one such loop on every core at once. Where jaxdl runs its own GEMM kernel
(``jaxdl.gemm``), each is measured with XLA's GEMMs and with the kernel, and the fastest
is the bound.

Reported per way: model-samples/s (training examples × members per second), ratios,
the sweep's aggregate FLOP rate against the peak-matmul rate and the step-GEMM
roofline, compile time, and device memory per member from XLA's memory analysis.
Usage: ``python benchmarks/bench_sweep.py [--json] [--rounds 3]``.

``--scaling`` measures instead how cost grows with the number of members: K = 1, 8, 32,
128, 256 members of the seed MLP and of the small MLP (one epoch of the first
``--scaling-size`` training images, default 5,000, per member), each K its own compiled
sweep: model-samples/s, compile seconds and device memory per member, written to
``--plot`` (default ``benchmarks/sweep_scaling.png``).
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
import peers  # noqa: E402
from common import (  # noqa: E402
    device_name,
    emit,
    interleaved,
    kernel_available,
    matmul_flops_per_second,
    mlp_gemm_loop,
    mlp_step_gemm_seconds,
    mlp_train_flops,
    parse_args,
)

import jaxdl  # noqa: E402
from jaxdl import devices, member_programs, sweep, train  # noqa: E402

BATCH = 100


def jaxdl_sweep(ds, sizes, members: int, shared: bool, one_device: bool = False):
    """Returns (run_one_epoch, compile_seconds, bytes_per_member). ``shared``: the
    members (one seed) share the data order, as ``sweep`` does by default; else each
    gathers its own minibatches (``data_order="own"``). The members are sharded over the
    devices ``sweep`` would use (the cores, see ``main``), or kept on the first device."""
    model = jaxdl.MLP(hidden=sizes[1:-1], num_classes=sizes[-1])
    lrs = np.geomspace(1e-4, 1e-2, members)
    configs = [{"learning_rate": float(lr)} for lr in lrs]
    setup, hp, keys, _ = sweep.prepare_sweep(
        jaxdl.RunConfig.of(model, jaxdl.make_optimizer("adam"), epochs=1000, batch_size=BATCH),
        ds,
        configs,
        seeds=[0],
    )
    where = devices.for_members(members, jax.devices()[:1] if one_device else None)
    mesh = Mesh(np.asarray(where), ("members",)) if len(where) > 1 else None
    progs = member_programs.programs(
        setup, mesh, member_programs.batch_form(setup, shared, sharded=mesh is not None)
    )
    states = progs.init(keys, hp)
    data = member_programs.share(train.to_device(ds), mesh)
    active = jax.numpy.ones((members,), bool)
    if mesh is not None:
        by_member = NamedSharding(mesh, P("members"))
        hp, active = jax.device_put((hp, active), by_member)
    jax.block_until_ready((states, data, hp, active))  # the init, not the compile
    t0 = time.perf_counter()
    exe = progs.epoch.lower(states, active, data, None, hp).compile()
    compile_s = time.perf_counter() - t0
    mem = exe.memory_analysis()
    data_bytes = data.x.nbytes + data.y.nbytes
    per_member = None
    if mem is not None:
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        # XLA's analysis is per device: its share of the members and its copy of the data
        per_member = (total - data_bytes - mem.alias_size_in_bytes) / (members / len(where))
    holder = {"s": states}

    def run():
        holder["s"], _, _, m = exe(holder["s"], active, data, None, hp)
        jax.block_until_ready(m)

    run()
    return run, compile_s, per_member


def scenario(ds, sizes, members, rounds, with_torch):
    runs, extra = {}, {}
    runs["jaxdl_sweep"], extra["compile_seconds"], extra["bytes_per_member"] = jaxdl_sweep(
        ds, sizes, members, shared=True
    )
    runs["jaxdl_sweep_own_orders"], _, _ = jaxdl_sweep(ds, sizes, members, shared=False)
    if len(jax.devices()) > 1:
        runs["jaxdl_sweep_one_device"], _, _ = jaxdl_sweep(ds, sizes, members, True, True)
    single, _ = peers.flax_scan(ds, sizes, BATCH)

    def sequential():  # the members' runs one after another (they differ only in values)
        for _ in range(members):
            single()

    runs["sequential_flax_scan"] = sequential
    if with_torch:
        t = peers.torch_func_ensemble(ds, sizes, BATCH, members)
        if t is not None:
            runs["torch_func_vmap"] = t
    where = devices.for_members(members)
    steps = len(ds.x) // BATCH
    probes, loops = {}, {}
    # XLA's GEMMs and, where jaxdl runs them, its kernel's; the fastest is the bound
    for by in ("xla", "kernel") if kernel_available() else ("xla",):
        k = by == "kernel"
        probes[f"step_gemm_{by}"] = functools.partial(mlp_step_gemm_seconds, sizes, BATCH, kernel=k)
        loops[f"gemm_loop_{by}"] = (mlp_gemm_loop(sizes, BATCH, steps, kernel=k), 1)
        if len(where) > 1:  # one step's GEMMs (one loop) on every core at once, per step
            probes[f"step_gemm_per_core_{by}"] = functools.partial(
                mlp_step_gemm_seconds, sizes, BATCH, where, kernel=k
            )
            loops[f"gemm_loop_per_core_{by}"] = (
                mlp_gemm_loop(sizes, BATCH, steps, where, kernel=k), len(where)
            )  # fmt: skip
    runs.update({k: run for k, (run, _) in loops.items()})
    best = interleaved(runs, rounds, probes)
    n = len(ds.x)
    rows = {
        "jaxdl_sweep": members * n / best["jaxdl_sweep"],
        "jaxdl_sweep_own_orders": members * n / best["jaxdl_sweep_own_orders"],
        "sequential_flax_scan": members * n / best["sequential_flax_scan"],
    }
    if "jaxdl_sweep_one_device" in best:
        rows["jaxdl_sweep_one_device"] = members * n / best["jaxdl_sweep_one_device"]
    extra["devices"] = len(where)
    if "torch_func_vmap" in best:
        rows["torch_func_vmap"] = members * n / best["torch_func_vmap"]
    flops = mlp_train_flops(sizes)
    # per member, any count; the faster of the GEMMs split over the cores or one per core
    rows["roofline"] = BATCH / min(best[p] for p in probes)
    rows["loop_roofline"] = max(k * steps * BATCH / best[name] for name, (_, k) in loops.items())
    for by in ("xla", "kernel"):  # each GEMMs' bounds, as samples/s
        mine = [p for p in probes if p.endswith(by)]
        if mine:
            extra[f"roofline_{by}_gemm"] = BATCH / min(best[p] for p in mine)
            extra[f"loop_roofline_{by}_gemm"] = max(
                k * steps * BATCH / best[n] for n, (_, k) in loops.items() if n.endswith(by)
            )
    extra["aggregate_gflops"] = rows["jaxdl_sweep"] * flops / 1e9
    return rows, extra


SCALING_K = (1, 8, 32, 128, 256)


def scaling(ds, rounds: int, plot) -> tuple[dict, dict]:
    """Model-samples/s, compile seconds and MiB per member against K (see the docstring)."""
    results, extra = {}, {}
    for label, sizes in (("seed_mlp", (784, 500, 500, 10)), ("small_mlp", (784, 64, 10))):
        for k in SCALING_K:
            run, compile_s, per_member = jaxdl_sweep(ds, sizes, k, shared=True)
            best = interleaved({"sweep": run}, rounds)["sweep"]
            results[f"{label}/K={k}"] = k * len(ds.x) / best
            extra[f"{label}/K={k}/compile_seconds"] = compile_s
            if per_member is not None:
                extra[f"{label}/K={k}/mib_per_member"] = per_member / 2**20
            del run  # the states of this K before the next
    extra["plot"] = plot_scaling(results, extra, plot)
    return results, extra


def plot_scaling(results: dict, extra: dict, plot) -> str:
    """``scaling``'s three panels against K, saved to ``plot``; returns its path."""
    from matplotlib.figure import Figure

    from jaxdl.report import save_figure

    fig = Figure(figsize=(14, 4.2), layout="tight")
    axes = fig.subplots(1, 3)
    for label in ("seed_mlp", "small_mlp"):
        ks = list(SCALING_K)
        series = (
            [results[f"{label}/K={k}"] for k in ks],
            [extra[f"{label}/K={k}/compile_seconds"] for k in ks],
            [extra.get(f"{label}/K={k}/mib_per_member", np.nan) for k in ks],
        )
        for ax, ys in zip(axes, series, strict=True):
            ax.plot(ks, ys, "o-", label=label.replace("_", " "))
    names = ("model-samples/s", "compile seconds", "MiB per member (XLA's analysis)")
    for ax, name in zip(axes, names, strict=True):
        ax.set(xscale="log", xlabel="members K", title=name, ylim=(0, None))  # flat reads flat
        ax.set_xticks(SCALING_K, [str(k) for k in SCALING_K])
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, plot)
    return str(plot)


def _scaling_flags(p) -> None:
    p.add_argument("--scaling", action="store_true", help="cost against K members instead")
    p.add_argument("--scaling-size", type=int, default=5000, help="training images per epoch")
    p.add_argument("--plot", default="benchmarks/sweep_scaling.png", help="the scaling plot")


def main(argv=None):
    a = parse_args(__doc__, argv, rounds=3, unit="epoch", extra=_scaling_flags)
    jaxdl.use_cpu_cores()  # as `jaxdl sweep` does: a CPU's cores as devices for the members
    ds = jaxdl.load("mnist").train
    if a.scaling:
        results, extra = scaling(jaxdl.data.subset(ds, a.scaling_size), a.rounds, a.plot)
        ratios = {
            f"{label}/K=256_vs_K=8": results[f"{label}/K=256"] / results[f"{label}/K=8"]
            for label in ("seed_mlp", "small_mlp")
        }
        extra["device"] = device_name()
        emit("Sweeps: cost against the number of members", results, ratios, extra, a.json)
        return
    peak = matmul_flops_per_second()
    results, ratios, extra = {}, {}, {"device": device_name(), "matmul_gflops": peak / 1e9}
    for label, sizes, members, with_torch in (
        ("seed_mlp_8", (784, 500, 500, 10), 8, True),
        ("small_mlp_32", (784, 64, 10), 32, False),
    ):
        rows, ex = scenario(ds, sizes, members, a.rounds, with_torch)
        for k, v in rows.items():
            results[f"{label}/{k}"] = v
        for peer in (
            "sequential_flax_scan", "torch_func_vmap", "jaxdl_sweep_own_orders",
            "jaxdl_sweep_one_device",
        ):  # fmt: skip
            if peer in rows:
                ratios[f"jaxdl_vs_{peer}/{label}"] = rows["jaxdl_sweep"] / rows[peer]
        extra[f"{label}/roofline_fraction"] = rows["jaxdl_sweep"] / rows["roofline"]
        extra[f"{label}/loop_roofline_fraction"] = rows["jaxdl_sweep"] / rows["loop_roofline"]
        extra[f"{label}/peak_fraction"] = ex["aggregate_gflops"] * 1e9 / peak
        extra[f"{label}/compile_seconds"] = ex["compile_seconds"]
        extra[f"{label}/devices"] = ex["devices"]
        for key in [k for k in ex if k.startswith(("roofline_", "loop_roofline_"))]:
            extra[f"{label}/{key}"] = ex[key]
            extra[f"{label}/{key}_fraction"] = rows["jaxdl_sweep"] / ex[key]
        if ex["bytes_per_member"] is not None:
            extra[f"{label}/mib_per_member"] = ex["bytes_per_member"] / 2**20
    extra["roofline_fraction"] = extra["seed_mlp_8/roofline_fraction"]
    emit("Sweeps: model-samples/s, one epoch of MNIST per member", results, ratios, extra, a.json)


if __name__ == "__main__":
    main()
