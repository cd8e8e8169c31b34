"""``jaxdl sweep`` over several processes: joining them (``--coordinator``), and starting
N local ones (``--processes N``), each the same command joined through jax.distributed.

The local start is no protocol of its own: process ``i`` is ``jaxdl sweep <the same
flags> --coordinator 127.0.0.1:PORT --num-processes N --process-id I``, exactly what a
user types on N hosts. This process only watches them: when one ends in failure, it says
which, stops the others at once (JAX would end them after its heartbeat timeout) and
says how to resume.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jaxdl import devices, processes, report, validate
from jaxdl.cli.resume import resume_command
from jaxdl.validate import InputError

_POLL_SECONDS = 0.2


def join(a: argparse.Namespace) -> int:
    """Joins the processes named by ``--coordinator`` (before JAX starts); returns their
    number (1 without ``--coordinator``). In a joined process, what native libraries
    print on stdout (Gloo's connection lines) is dropped, so stdout holds only the
    command's output (``--json``: one line)."""
    if a.coordinator is None:
        if a.num_processes is not None or a.process_id is not None:
            raise InputError("--num-processes/--process-id need --coordinator HOST:PORT")
        return 1
    n = processes.join(a.coordinator, a.num_processes, a.process_id)
    if n > 1:
        _quiet_native_stdout()
    return n


def _quiet_native_stdout() -> None:
    """Python's ``sys.stdout`` keeps the real stdout; file descriptor 1, where C++ code
    writes, goes to /dev/null."""
    sys.stdout.flush()
    real = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    sys.stdout = open(real, "w", buffering=1, closefd=True)  # noqa: SIM115 (lives with the process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _how(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:  # a real-time signal has no name
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def check_flags(a: argparse.Namespace) -> int:
    """``--processes N`` (checked, without ``--coordinator``); returns N."""
    n = validate.positive_int("--processes", a.processes)
    joins = (a.coordinator, a.num_processes, a.process_id)
    if n > 1 and any(v is not None for v in joins):
        raise InputError("--processes N starts the processes itself; give it without "
                         "--coordinator/--num-processes/--process-id (or start each "
                         "process with them)")  # fmt: skip
    return n


def again(a: argparse.Namespace) -> str:
    """What to add to ``jaxdl sweep --resume RUN`` to continue with these processes."""
    n = processes.count()
    if n == 1:
        return ""
    if a.launched:
        return f" --processes {n}"
    return (
        f" in each of the {n} processes, with its --coordinator, --num-processes and --process-id"
    )


def launch(a: argparse.Namespace, argv: Sequence[str], run_dir: Path, resumable: bool) -> int:
    """Runs ``jaxdl sweep argv`` as ``a.processes`` local processes joined through
    jax.distributed, in ``run_dir`` (made by the caller; resumed if ``a.resume``). Process
    0 shows progress and prints the results; the status is its status, or 1 (with one
    line saying which process failed and how to go on) when another one failed."""
    n = check_flags(a)
    address = f"127.0.0.1:{_free_port()}"
    cpu = a.cpu_devices if a.cpu_devices != "auto" else max(1, devices.cores() // n)
    base = [sys.executable, "-m", "jaxdl.cli", *argv, "--processes", "1", "--launched"]
    base += ["--cpu-devices", str(cpu)]
    if a.resume is None:  # the directory made here, which process 0 fills
        base += ["--name", run_dir.name, "--runs-dir", str(run_dir.parent)]
    # On this machine's CPU, also where it has accelerators: one process per host is how
    # JAX shares a host's GPUs (or TPU) between members, with --coordinator.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    children: list[subprocess.Popen] = []
    # Ctrl-C reaches every process of the terminal's group: the sweep processes stop
    # together after their current epoch; this one waits for them. SIGTERM (a
    # scheduler's, a timeout's) is passed on to them, and they stop the same way.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    term = signal.signal(signal.SIGTERM, lambda *_: _signal_all(children, signal.SIGTERM))
    try:
        for i in range(n):
            extra = ["--coordinator", address, "--num-processes", str(n), "--process-id", str(i)]
            quiet = ["--no-progress"] if i else []
            out = None if i == 0 else subprocess.DEVNULL  # one results table, process 0's
            children.append(subprocess.Popen([*base, *extra, *quiet], stdout=out, env=env))
        return _watch(children, n, run_dir, resumable)
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, term)
        _signal_all(children, signal.SIGKILL)


def _signal_all(children: list[subprocess.Popen], sig: int) -> None:
    for c in children:
        if c.poll() is None:
            c.send_signal(sig)


def _watch(children: list[subprocess.Popen], n: int, run_dir: Path, resumable: bool) -> int:
    while True:
        codes = [c.poll() for c in children]
        # A process killed by a signal first: the others' errors follow from its death.
        failed = sorted((rc >= 0, i, rc) for i, rc in enumerate(codes) if rc not in (None, 0))
        failed = [(i, rc) for _, i, rc in failed]
        if failed and failed[0][1] not in (2, 128 + signal.SIGINT, 128 + signal.SIGTERM):
            i, rc = failed[0]
            _signal_all(children, signal.SIGKILL)
            where = _last_checkpoint(run_dir / "checkpoints") if resumable else None
            then = (f"continue from the run's last checkpoint ({where}) with: "
                    f"{resume_command('sweep', run_dir, f' --processes {n}')}" if where
                    else "no checkpoint was written: run it again")  # fmt: skip
            # On a new line: process 0's live bar may have been cut mid-line.
            start = "\n" if sys.stderr.isatty() else ""
            print(f"{start}jaxdl sweep: process {i} of {n} {_how(rc)}; stopped the others; "
                  f"{then}", file=sys.stderr)  # fmt: skip
            return 1
        if failed:  # bad input (process 0 said which) or an interrupt every process saw
            deadline = time.monotonic() + processes.HEARTBEAT_SECONDS
            while any(c.poll() is None for c in children) and time.monotonic() < deadline:
                time.sleep(_POLL_SECONDS)
            first = children[0].poll()  # now, not before the wait
            return first if first not in (None, 0) else failed[0][1]
        if all(rc == 0 for rc in codes):
            return 0
        time.sleep(_POLL_SECONDS)


def _last_checkpoint(directory: Path) -> str | None:
    """Where a sweep's checkpoints have got to: ``epoch E``, or ``chunk-C, epoch E`` for
    the last chunk that has one when the sweep runs in chunks (one after another)."""
    saved: dict[int, int] = {}
    for d in directory.glob("chunk-*/[0-9]*"):
        chunk = d.parent.name.removeprefix("chunk-")
        if d.name.isdigit() and chunk.isdigit():
            saved[int(chunk)] = max(saved.get(int(chunk), 0), int(d.name))
    if not saved:
        return None
    last = max(saved)
    return f"epoch {saved[last]}" if last == 0 else f"chunk-{last}, epoch {saved[last]}"


def new_run_dir(a: argparse.Namespace) -> Path:
    """The run directory the local processes fill (made now, empty)."""
    return report.make_run_dir(a.runs_dir, a.name, prefix="sweep")
