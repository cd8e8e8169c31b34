"""The ``jaxdl`` argument parser: one subcommand per command."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxdl import member_programs
from jaxdl.cli.flags import (
    _add_checkpoint_flags,
    _add_train_flags,
    _cpu_devices,
    _Parser,
    _values,
)
from jaxdl.config import OPTIMIZER_FLAGS

# Sweepable flags (dest) and the setting each sets.
SWEEPABLE = {"lr": "learning_rate", **{k: k for k in OPTIMIZER_FLAGS},
             **{k: k for k in ("l1", "l2", "input_noise", "init_scale", "dropout_input",
                               "dropout_hidden")}}  # fmt: skip


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join("  " + line for line in lines)


def _command(sub, name: str, summary: str, description: str, *examples: str) -> _Parser:
    """A subcommand: ``summary`` in ``jaxdl --help``; ``description`` and ``examples`` in
    its own ``--help`` (formatted by ``_Help``, the parser class's default)."""
    return sub.add_parser(name, help=summary, description=description, epilog=_examples(*examples))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jaxdl",
        description="Compiled JAX training for studying deep networks.",
        epilog=_examples("jaxdl train", "jaxdl sweep --lr 1e-4,1e-3,1e-2 --seeds 3",
                         "jaxdl train --help"),
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = _command(
        sub, "train", "train one model",
        "Train one model. With no flags: the course's Keras example (784-500-500-10 ReLU, "
        "cross-entropy, Adam 1e-3, batch 100, 20 epochs) on MNIST.",
        "jaxdl train                      # the default MLP on MNIST",
        "jaxdl train --hidden 1024,1024 --dropout-hidden 0.5 --epochs 50",
        "jaxdl train --model cnn --epochs 5 --dropout-hidden 0.5",
        "jaxdl train --optimizer momentum --lr 0.05 --momentum 0.9",
        "jaxdl train --config runs/NAME/config.json   # rerun a run",
        "jaxdl train --resume runs/NAME   # continue from its checkpoint",
    )  # fmt: skip
    _add_train_flags(t)
    _add_checkpoint_flags(t)
    w = _command(
        sub, "sweep", "train many models at once (one compiled program per structure)",
        "Train every combination of the given values × seeds as one vmapped program. "
        "Sweepable flags take lists: --lr 1e-4,3e-4,1e-3 or logspace:1e-4:1e-1:16 or "
        "linspace:0:0.5:6. The sweepable flags: "
        + ", ".join("--" + f.replace("_", "-") for f in SWEEPABLE)
        + "; the others (model, optimizer family, epochs, batch size) are one value.",
        "jaxdl sweep --lr logspace:1e-4:1e-2:8 --epochs 10",
        "jaxdl sweep --lr 1e-3,1e-2 --dropout-hidden 0,0.5 --seeds 3 --hidden 256",
        "jaxdl sweep --lr logspace:1e-4:1e-1:27 --epochs 27 --search halving --eta 3",
        "jaxdl sweep --lr 1e-3,3e-3,1e-2 --seeds 4 --processes 2",
        "jaxdl sweep --resume runs/NAME",
    )  # fmt: skip
    _add_train_flags(w, number=_values)
    _add_checkpoint_flags(w, skip=False)
    w.add_argument("--seeds", type=int, default=1, help="seeds per configuration (0..N-1)")
    w.add_argument(
        "--search", choices=("grid", "halving", "pbt"), default="grid",
        help="grid: every member to the last epoch; halving: successive halving, the best "
        "1/eta of the members going on at each rung, the rest compacted away; pbt: "
        "population-based training (halving and pbt keep no checkpoints)",
    )  # fmt: skip
    w.add_argument(
        "--ready-every", type=int, default=2,
        help="pbt: every E epochs the bottom quarter copies a top member and perturbs "
        "its --explore numbers by x0.8 or x1.25",
    )  # fmt: skip
    w.add_argument(
        "--explore", type=lambda s: tuple(s.split(",")), default=("learning_rate",),
        metavar="NAMES", help="pbt: the numbers to perturb, e.g. learning_rate,l2",
    )  # fmt: skip
    w.add_argument("--eta", type=int, default=3, help="halving: 1/eta of the members go on")
    w.add_argument("--min-epochs", type=int, default=1, help="halving: the first rung's epochs")
    w.add_argument(
        "--data-order", choices=member_programs.DATA_ORDERS, default="auto",
        help="own: each member shuffles with its seed; shared: all use the first member's "
        "order (faster: one minibatch per step for all); auto: shared when one seed",
    )  # fmt: skip
    w.add_argument(
        "--cpu-devices", type=_cpu_devices, default="auto", metavar="auto|N",
        help="on a CPU, run the members on N devices of the host's cores (auto: one per "
        "core, unless XLA_FLAGS or JAX_NUM_CPU_DEVICES set a count); GPUs are unaffected",
    )  # fmt: skip
    _add_process_flags(w)
    _add_view_commands(sub)
    e = _add_ensemble_command(sub)
    p.commands = {"train": t, "sweep": w, "ensemble": e}  # for --config: set a command's defaults
    d = _command(
        sub, "data", "data sets",
        "Fetch a data set into the cache ahead of a run (a run fetches what it needs by itself).",
        "jaxdl data fetch mnist", "jaxdl data fetch mnist --data-dir /tmp/d",
    )  # fmt: skip
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    f = dsub.add_parser("fetch", help="download and verify a data set into the cache")
    f.add_argument("name", choices=("mnist",), help="data set")
    f.add_argument("--data-dir", type=Path, default=None, help="cache directory")
    f.add_argument("--force", action="store_true", help="fetch again even if cached")
    return p


def _add_process_flags(w: argparse.ArgumentParser) -> None:
    """Where a sweep runs beyond one process (jax.distributed); none of it changes the rows."""
    g = w.add_argument_group(
        "processes", "the members over every device of several processes (jax.distributed)"
    )
    g.add_argument(
        "--processes", type=int, default=1, metavar="N",
        help="start N local processes on this machine's CPU (auto --cpu-devices split "
        "the cores); on GPU or TPU hosts, one process per host with --coordinator",
    )  # fmt: skip
    g.add_argument("--launched", action="store_true", help=argparse.SUPPRESS)  # by --processes
    g.add_argument(
        "--coordinator", default=None, metavar="HOST:PORT",
        help="process 0's address, the same in every process started by hand or by a "
        "scheduler; auto: what jax.distributed detects (SLURM, Open MPI, Kubernetes, "
        "TPU pods)",
    )  # fmt: skip
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="with --coordinator: how many processes")  # fmt: skip
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="with --coordinator: this process (0 writes the results)")  # fmt: skip


def _add_ensemble_command(sub) -> argparse.ArgumentParser:
    e = _command(
        sub, "ensemble", "train a dropout net and measure it as an ensemble of subnetworks",
        "Train a dropout net (the train flags; dropout 0.2 on the input and 0.5 on hidden "
        "layers by default), then compare weight scaling with Monte-Carlo averages of k "
        "sampled subnetworks (arithmetic and geometric), the exact ensemble of all "
        "subnetworks when they are few, and optionally explicit ensembles.",
        "jaxdl ensemble --hidden 100 --epochs 5     # MC against weight scaling",
        "jaxdl ensemble --hidden 12 --dropout-input 0 --epochs 5   # exact too",
        "jaxdl ensemble --from runs/NAME            # a finished train run's net",
    )  # fmt: skip
    _add_train_flags(e)
    e.set_defaults(dropout_input=0.2, dropout_hidden=0.5)
    g = e.add_argument_group("ensemble")
    g.add_argument("--k", type=int, default=100, help="subnetworks sampled (curve for k=1..K)")
    g.add_argument("--repeats", type=int, default=5, help="independent k-samples (spread)")
    g.add_argument(
        "--exact",
        choices=("auto", "on", "off"),
        default="auto",
        help="enumerate all 2^M subnetworks (auto: when M <= --max-units)",
    )
    g.add_argument("--max-units", type=int, default=20, help="most masked units to enumerate")
    g.add_argument(
        "--explicit",
        type=int,
        default=0,
        metavar="N",
        help="also train N independent nets and N fixed-mask subnetworks (0: skip)",
    )
    g.add_argument(
        "--from",
        dest="from_run",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="analyse the net a finished 'jaxdl train' run in RUN_DIR trained (its final "
        "parameters, from its checkpoints) instead of training one; the train flags are "
        "then the run's own",
    )
    g.add_argument("--test-size", type=int, default=None, help="use the first N test examples")
    g.add_argument(
        "--ood-size", type=int, default=1000, help="test images turned out-of-distribution"
    )
    return e


def _add_view_commands(sub) -> None:
    """``runs``, ``compare`` and ``report``: read run directories, train nothing."""
    r = _command(
        sub, "runs", "list run directories, newest first",
        "List the run directories under RUNS_DIR, newest first: kind, model, optimizer, "
        "epochs, validation and test accuracy, finished or not.",
        "jaxdl runs", "jaxdl runs --limit 5",
    )  # fmt: skip
    r.add_argument("runs_dir", nargs="?", type=Path, default=Path("runs"), help="where runs are")
    r.add_argument("--limit", type=int, default=0, help="show only the N newest (0: all)")
    c = _command(
        sub, "compare", "print the settings and results that differ",
        "Print, side by side, the settings and results in which two or more runs differ "
        "(those they share are left out).",
        "jaxdl compare runs/A runs/B",
    )  # fmt: skip
    c.add_argument("paths", nargs="+", type=Path, metavar="RUN_DIR", help="two or more runs")
    h = _command(
        sub, "report", "write one self-contained HTML page about runs",
        "Write one self-contained HTML page (plots inlined, sortable tables) about the given "
        "runs, or every run in the given directories.",
        "jaxdl report runs --out report.html", "jaxdl report runs/A runs/B --out ab.html --force",
    )  # fmt: skip
    h.add_argument(
        "paths", nargs="+", type=Path, metavar="RUN_DIR", help="runs, or directories of runs"
    )
    h.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML file")
    h.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    h.add_argument("--title", default="jaxdl report", help="page title")
    for q in (r, c, h):
        q.add_argument(
            "--json", action="store_true", help="print a JSON summary as the last line of stdout"
        )
