"""``jaxdl sweep``: many members in one program, their results table and plots."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax

from jaxdl import (
    checkpoint,
    devices,
    pbt,
    processes,
    report,
    runs,
    search,
    sweep,
    tracking,
    validate,
)
from jaxdl.cli.build import check_numbers, load_data, run_config, saved_config, write_config
from jaxdl.cli.parser import SWEEPABLE
from jaxdl.cli.processes import again
from jaxdl.cli.resume import _check_checkpoint_flags, _checkpointer, _faults
from jaxdl.config import RunConfig
from jaxdl.report.progress import number_text
from jaxdl.validate import InputError

_ROW_RESULTS = ("best_val_accuracy", "best_epoch", "test_accuracy", "test_loss", "epochs_run",
                "diverged", "stopped")  # fmt: skip


class Plan(NamedTuple):
    """A sweep's settings, checked: what every process computes alike."""

    config: RunConfig
    splits: Any  # the data's splits (train, valid, test)
    train: Any  # the training set
    configs: list[dict]
    lists: dict[str, list]  # the swept flags and their values
    axes: dict[str, list]  # the swept settings, by their library names
    description: dict  # the sweep's identity (checkpoint.describe)


def plan(a: argparse.Namespace) -> Plan:
    """Checks every flag and value of a sweep and loads its data, on the host."""
    validate.positive_int("--seeds", a.seeds)
    check_numbers(a)  # every value of each list, under its flag's name
    lists = {d: getattr(a, d) for d in SWEEPABLE if isinstance(getattr(a, d), list)}
    first = argparse.Namespace(**{**vars(a), **{d: v[0] for d, v in lists.items()}})
    try:  # this host's files: one host without them must stop every process
        config, splits, tr = load_data(first, run_config(first))
        failed = None
    except InputError as e:
        failed = e
    if processes.any_process(failed is not None):
        raise failed or InputError("another process could not load its data (it says why)")
    axes = {SWEEPABLE[d]: v for d, v in lists.items()}
    drop_in = axes.pop("dropout_input", [config.regularisation.dropout_input])
    drop_hid = axes.pop("dropout_hidden", [config.regularisation.dropout])
    configs = sweep.grid(**axes, dropout_input=drop_in, dropout=drop_hid)
    setup, hp, _, members = sweep.prepare_sweep(  # checks every member
        config, tr, configs, seeds=a.seeds, validation=splits.valid
    )
    search.check_search(a.search, a.epochs, a.eta, a.min_epochs, ("--eta", "--min-epochs"))
    validate.positive_int("--ready-every", a.ready_every)
    if a.search != "grid" and a.resume is not None:
        raise InputError(f"--resume: a --search {a.search} sweep keeps no checkpoints; run it "
                         "again")  # fmt: skip
    if a.search != "grid":
        a.checkpoint_every = 0  # its rungs and populations are not checkpointed
    _check_checkpoint_flags(a)
    desc = checkpoint.describe(setup, hp, tr.x, tr.y, members=members)
    return Plan(config, splits, tr, configs, lists, axes, desc)


def _run_dir(a: argparse.Namespace, p: Plan) -> Path:
    """The run's directory: the resumed one, or a new one that process 0 makes (with its
    config.json) and every process then uses."""
    if a.resume is not None:
        return Path(a.resume)
    made, failed = "", None
    if processes.leader():
        try:
            run_dir = report.make_run_dir(a.runs_dir, a.name, prefix="sweep")
            space = {d: getattr(a, d) for d in SWEEPABLE}
            write_config(run_dir, saved_config(a, p.config, space=space, run_dir=str(run_dir)))
            made = str(run_dir)
        except InputError as e:  # said after the others know, so none waits for it
            failed = e
    made = processes.from_leader(made)
    if not made:
        raise failed or InputError("process 0 could not make the run directory (it says why)")
    return Path(made)


def cmd_sweep(a: argparse.Namespace) -> tuple[dict | None, str]:
    """Runs the sweep; returns its summary (``--json``) and what the terminal shows: the
    best members as a table, then one line. Over several processes, process 0 writes and
    returns the results; the others return (None, "")."""
    p = plan(a)
    config, splits, tr = p.config, p.splits, p.train
    configs, lists, axes = p.configs, p.lists, p.axes
    run_dir = _run_dir(a, p)
    ckpt = _checkpointer(config.checkpointing, run_dir, p.description)
    options = dict(seeds=a.seeds, validation=splits.valid)
    n = len(configs) * a.seeds
    with report.Progress(a.epochs, enabled=not a.no_progress, stream=sys.stderr) as prog:
        with _faults(ckpt, run_dir, again=again(a), tell=not a.no_progress):
            show = {"on_epoch": lambda e, m: prog.update(e, m, text=report.sweep_text(m)),
                    "data_order": a.data_order, "verbose": False, "test": splits.test}  # fmt: skip
            if a.search == "halving":
                res = search.halving(config, tr, configs, eta=a.eta, min_epochs=a.min_epochs,
                                     **show, **options)  # fmt: skip
            elif a.search == "pbt":
                res = pbt.pbt(config, tr, configs, ready_every=a.ready_every, explore=a.explore,
                              key=a.seed, **show, **options)  # fmt: skip
            else:
                res = sweep.run(config, tr, configs, checkpointer=ckpt, **show, **options)
        prog.finish()
    if not processes.leader():
        return None, ""
    rows = []
    for row in res.rows:  # the dropout rates under their flags' names, where swept
        given = {"dropout_input": row.pop("dropout_input"), "dropout_hidden": row.pop("dropout")}
        rows.append({**{k: v for k, v in given.items() if k in lists}, **row})
    swept = [k for k in rows[0] if k in lists or k in axes]
    swept = [k for k in swept if len({r[k] for r in rows}) > 1]  # axes that vary
    report.write_csv(run_dir / "results.csv", rows)
    report.write_json(run_dir / "results.json", rows)
    report.write_json(run_dir / "history.json", {k: v.tolist() for k, v in res.history.items()})
    title = f"{run_dir.name}: {runs.describe_model(config.as_flags())}, {config.optimizer.name}"
    if not a.no_plots:
        report.plot_sweep(rows, swept, res.history, run_dir, title=title)
    if res.lineage is not None:
        report.write_json(run_dir / "lineage.json", res.lineage)
        if not a.no_plots:
            report.plot_lineage(res.lineage, run_dir / "lineage.png", title=title)
    if a.tensorboard:
        result_keys = [k for k in rows[0] if k in _ROW_RESULTS or k.startswith("best_")]
        tracking.write_sweep(
            run_dir, rows, res.history, params=res.states.params, results=result_keys,
            settings=[k for k in rows[0] if k not in result_keys],
        )  # fmt: skip
    best = max(
        (r for r in rows if not r["diverged"]),
        key=lambda r: r["best_val_accuracy"],
        default=rows[0],
    )
    summary = {
        "members": n,
        "compiles": res.compiles,
        "best": best,
        "results_path": str(run_dir / "results.csv"),
        "model_samples_per_second": res.samples_per_second,
        "devices": res.devices,
        "processes": jax.process_count(),
        "compile_seconds": res.compile_seconds,
        "train_seconds": res.seconds,
        "diverged": sum(r["diverged"] for r in rows),
        "search": res.search,
        "model_epochs": sum(r["epochs_run"] for r in rows),
        "run_dir": str(run_dir),
        "kernels": res.kernels,
    }
    report.write_json(run_dir / "summary.json", summary)
    return summary, _text(summary, rows, swept)


_TABLE_ROWS = 10
# The member table's shorter headers (80 columns; results.csv keeps the full names).
_HEADERS = {"best_val_accuracy": "val_acc", "test_accuracy": "test_acc", "epochs_run": "epochs"}


def _text(summary: dict, rows: list[dict], swept: list[str]) -> str:
    """The members with the best validation accuracy as a table (all of them when few),
    then the sweep's one-line summary."""
    ranked = sorted(rows, key=lambda r: (r["diverged"], -_finite(r["best_val_accuracy"])))
    # the settings as typed (0.001, not 0.0010), to 4 digits (the summary has them all)
    shown = [
        {**r, **{k: number_text(r[k], short=True) for k in swept}} for r in ranked[:_TABLE_ROWS]
    ]
    columns = [*swept, "seed", "best_val_accuracy", "best_epoch", "test_accuracy", "epochs_run"]
    if "rung" in rows[0]:  # halving: the rung says how far a member went (80 columns)
        columns[columns.index("best_epoch")] = "rung"
    columns += [k for k in ("stopped", "diverged") if any(r[k] for r in rows)]
    table = report.format_table(shown, columns, _HEADERS)
    if len(rows) > len(shown):
        table += f"\n(the best {len(shown)} of {len(rows)} by val_acc; all in results.csv)"
    b = summary["best"]
    settings = ", ".join(f"{k}={number_text(b[k])}" for k in [*swept, "seed"]) or "its settings"
    spent = (f" (halving: {summary['model_epochs']} member-epochs)"
             if summary["search"] == "halving" else "")  # fmt: skip
    # Three lines, not one: an 80-column terminal would cut one mid-word.
    line = (f"{summary['members']} members{spent}, {summary['compiles']} compile(s), "
            f"{summary['diverged']} diverged\nbest: {settings}: val accuracy "
            f"{b['best_val_accuracy']:.4f}, test {b['test_accuracy']:.4f}\n"
            f"results {summary['results_path']}")  # fmt: skip
    return f"{table}\n{line}"


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _use_cpu_devices(n: str | int) -> None:
    """Before JAX starts: the host's cores as devices, so the members run side by side.
    ``auto`` keeps what a caller that already started JAX (in-process use) has."""
    if n != "auto":
        try:
            devices.use_cpu_cores(n)
        except InputError as e:
            raise InputError(f"--cpu-devices: {e}") from None
        return
    if devices.user_set_count():  # kept (asking JAX for it would start JAX)
        return
    with contextlib.suppress(InputError):
        devices.use_cpu_cores()
