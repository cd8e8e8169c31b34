"""What progress inside an epoch costs: one epoch of the default MLP (784-500-500-10,
Adam, batch 100) on MNIST, compiled without ticks (``Setup.ticks=0``: what runs with
``--no-progress``, off a terminal, or from ``fit`` by default in a script) and with the
20 ticks per epoch a live bar asks for (``jaxdl.ticks``: a ``jax.debug.callback`` every
25 of the 500 steps, heard by a listener on the host). Timed in turn, interleaved.

Usage: ``python benchmarks/bench_ticks.py [--json] [--rounds 5]``.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import device_name, emit, interleaved, jaxdl_epoch, parse_args  # noqa: E402

import jaxdl  # noqa: E402
from jaxdl import ticks, train  # noqa: E402


def main(argv=None) -> dict:
    a = parse_args(__doc__, argv, rounds=5, unit="epoch")
    ds = jaxdl.load("mnist").train
    config = jaxdl.RunConfig.of(
        jaxdl.MLP(hidden=(500, 500)), jaxdl.make_optimizer("adam"), epochs=1000
    )
    setup, hp = train.prepare(config, ds)
    heard = []
    runs = {}
    for n in (0, 20):
        runs[f"ticks_{n}"], _ = jaxdl_epoch(dataclasses.replace(setup, ticks=n), hp, ds)
    with ticks.listen(lambda done, total: heard.append(done)):
        best = interleaved(runs, a.rounds)
    rows = {k: len(ds.x) / s for k, s in best.items()}
    ratios = {"ticks_20_vs_none": rows["ticks_20"] / rows["ticks_0"]}
    per_epoch = len(heard) / a.rounds  # heard only while timed: 19 (the 20th ends the epoch)
    extra = {"device": device_name(), "ticks_heard_per_epoch": per_epoch}
    emit("progress inside an epoch (default MLP, MNIST)", rows, ratios, extra, a.json)
    return {"rows": rows, "ratios": ratios, **extra}


if __name__ == "__main__":
    main(sys.argv[1:])
