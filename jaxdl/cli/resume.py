"""Checkpoint flags, ``--resume`` (a run directory's ``config.json`` read back, with the
flags a resumed run may change) and the fault handling around a checkpointed run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from jaxdl import (
    checkpoint,
    model_source,
    processes,
    report,
    train,
    validate,
)
from jaxdl.cli.config_file import PLACEMENT
from jaxdl.cli.parser import build_parser
from jaxdl.config import Checkpointing, saved_flags
from jaxdl.report.progress import last_words, say
from jaxdl.validate import InputError


def _check_checkpoint_flags(a: argparse.Namespace) -> None:
    validate.positive_int("--checkpoint-every", a.checkpoint_every, allow_zero=True)
    validate.positive_int("--keep-checkpoints", a.keep_checkpoints)
    if a.resume is not None and not a.checkpoint_every:
        raise InputError(f"--resume: {str(a.resume)!r} was run with --checkpoint-every 0, so "
                         "it has no checkpoints to resume from")  # fmt: skip


def _checkpointer(c: Checkpointing, run_dir: Path, config) -> checkpoint.Checkpointer | None:
    if not c.every:
        return None
    return checkpoint.Checkpointer(
        run_dir / "checkpoints", config, every=c.every, max_to_keep=c.keep
    )


@contextlib.contextmanager
def _faults(
    ckpt: checkpoint.Checkpointer | None,
    run_dir: Path,
    command: str = "sweep",
    again: str = "",
    tell: bool = True,
):
    """Catches SIGINT/SIGTERM from here to the end of the command (``main`` restores the
    handlers): during training the run is saved at the end of the epoch and stops; once
    training is done it finishes writing its results. On a NaN/Inf loss writes the
    history so far and says where the last good checkpoint is. Over several processes, a
    failed collective (another process died) becomes one line (``ProcessLost``) ending
    in how to resume (``again``: what to add to ``--resume RUN``). With ``tell``, a
    signal is acknowledged in one line as soon as it arrives, not at the epoch's end."""
    told = _acknowledge if tell else None

    def now(signum: int) -> None:  # a second signal: at once, even mid-epoch
        if tell:
            last_words(f"jaxdl {command}: stopped at once; checkpoints already written are "
                       f"kept; continue with: {resume_command(command, run_dir, again)}")  # fmt: skip
        sys.stderr.flush()
        os._exit(128 + signum)

    with (
        ckpt.catch_signals(restore=False, announce=told, stop=now)
        if ckpt is not None
        else contextlib.nullcontext()
    ):
        try:
            yield
        except train.NonFiniteError as e:
            report.save_history(run_dir, e.history)
            kept = [] if ckpt is None else ckpt.epochs()
            where = (f"the last good checkpoint is epoch {kept[-1]} in {ckpt.directory}" if kept
                     else "no checkpoint was kept")  # fmt: skip
            e.args = (f"{e}; {where}; history in {run_dir}; lower --lr, add --clip-norm or "
                      "--skip-nonfinite and start a new run",)  # fmt: skip
            raise
        except checkpoint.Interrupted as e:
            e.run_dir = run_dir
            raise
        except processes.RUNTIME_ERROR as e:
            if not processes.several():
                raise
            kept = [] if ckpt is None else ckpt.saved()
            then = (f"its last checkpoint is epoch {kept[-1]}; continue with: "
                    f"{resume_command(command, run_dir, again)}" if kept
                    else "no checkpoint was kept")  # fmt: skip
            raise processes.ProcessLost(f"{processes.lost(e)}; {then}") from None


def resume_command(command: str, run_dir, again: str = "") -> str:
    """The command that continues ``run_dir`` (``again``: what the processes add)."""
    return f"jaxdl {command} --resume {run_dir}{again}"


def _acknowledge(signum: int) -> None:
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    again = " (Ctrl-C again: at once)" if signum == signal.SIGINT else ""
    say(f"jaxdl: {name}: stopping after this epoch's checkpoint{again}")  # under 80 columns


# Flags that only say how this invocation shows the run.
_SHOWN_ONLY = ("json", "no_progress", "no_plots")
# Flags a resumed run may set: they change what is shown, not what is computed.
_RESUME_MAY_SET = ("resume", "json", "no_progress", "no_plots", "data_dir", "kernels", *PLACEMENT)


def _given_flags(argv: Sequence[str]) -> dict:
    """The flags given on the command line (not their defaults), by dest."""
    p = build_parser()
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub._defaults.clear()  # set_defaults() values (e.g. ensemble's dropout rates)
                for act in sub._actions:
                    act.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


def _run_config(flag: str, run_dir: Path, command: str) -> dict:
    """The config.json of the ``command`` run in ``run_dir`` (for ``flag``'s message), as
    flag-named settings (``jaxdl.config.saved_flags``)."""
    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError:
        raise InputError(f"{flag}: expected a run directory with a config.json, got "
                         f"{str(run_dir)!r}") from None  # fmt: skip
    except ValueError as e:
        raise InputError(f"{flag}: {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("command") != command:
        raise InputError(f"{flag}: {str(run_dir)!r} is not a {command} run")
    return _same_model(flag, run_dir, saved_flags(config))


def _with_settings(a: argparse.Namespace, config: Mapping, keep: Sequence[str]) -> dict:
    """``a``'s values, with every setting of ``config`` that ``a`` has too, except ``keep``."""
    out = vars(a).copy()
    for dest, value in config.items():
        if dest in out and dest not in keep:
            if value is not None and dest in ("runs_dir", "data_dir"):
                value = Path(value)
            elif isinstance(out[dest], tuple) and isinstance(value, list):
                value = tuple(value)
            out[dest] = value
    return out


def _same_model(flag: str, run_dir: Path, config: dict) -> dict:
    """``config`` with a model from a file checked against the run's record: refused if
    the file changed since; read from the run directory's copy if it is gone."""
    record = config.get("model_source")
    if not record:
        return config
    spec = record["spec"]
    path = Path(spec.rpartition(":")[0])
    if not path.exists():
        copy = run_dir / record["copy"]
        return {**config, "model": f"{copy}:{spec.rpartition(':')[2]}"}
    _, digest = model_source.source(spec)
    if digest != record["sha256"]:
        raise InputError(f"{flag}: the model file {str(path)!r} changed since "
                         f"{str(run_dir)!r} started (sha256 {record['sha256'][:12]}… now "
                         f"{digest[:12]}…); restore it (a copy is in {record['copy']} there) or "
                         "start a new run")  # fmt: skip
    return config


def _resumed(a: argparse.Namespace, argv: Sequence[str]) -> argparse.Namespace:
    """``a`` with the settings of the run being resumed (its config.json); refuses
    flags that would change what is computed."""
    run_dir = Path(a.resume)
    config = _run_config("--resume", run_dir, a.command)
    if (run_dir / ("results.json" if a.command == "train" else "summary.json")).exists():
        raise InputError(f"--resume: {str(run_dir)!r} has finished already; nothing to resume")
    given = _given_flags(argv)
    for dest, value in given.items():
        if dest in (*_RESUME_MAY_SET, "command") or report.to_jsonable(value) == config.get(dest):
            continue
        flag = "--" + dest.replace("_", "-")
        raise InputError(f"{flag}: {str(run_dir)!r} was started with {config.get(dest)!r}, got "
                         f"{value!r}; a resumed run keeps its settings (only --json, "
                         "--no-progress, --no-plots, --data-dir, --kernels and where it runs may be "
                         "given)")  # fmt: skip
    # How this invocation shows the run is its own, given or not (--no-progress then need
    # not be repeated, nor undone).
    out = _with_settings(a, config, keep=[*given, *_SHOWN_ONLY])
    out["resume"] = run_dir
    return argparse.Namespace(**out)
