"""Command line: ``jaxdl train | sweep | ensemble | runs | compare | report | data fetch``.

Thin by design: parses flags, calls the library, prints. Bad input exits with status 2
and one line naming the flag and what was expected, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

import jax

from jaxdl import tracking
from jaxdl.checkpoint import Interrupted

# Names, not modules, from jaxdl.train and the like: this package's submodules
# (jaxdl.cli.train, .sweep, ...) become its attributes and would shadow them.
from jaxdl.cli import config_file as run_config
from jaxdl.cli import processes
from jaxdl.cli.build import check_paths
from jaxdl.cli.ensemble import cmd_ensemble
from jaxdl.cli.parser import build_parser
from jaxdl.cli.resume import _resumed, resume_command
from jaxdl.cli.sweep import _use_cpu_devices, cmd_sweep, plan
from jaxdl.cli.train import cmd_train
from jaxdl.cli.views import _VIEWS, cmd_fetch
from jaxdl.processes import RUNTIME_ERROR, ProcessLost, lost
from jaxdl.report import to_jsonable
from jaxdl.report.progress import say
from jaxdl.train import NonFiniteError
from jaxdl.validate import InputError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parser.parse_args(argv)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    chatty = not getattr(a, "no_progress", True)  # what the slow first steps are doing
    talk = _Talk() if chatty else contextlib.nullcontext()
    joined = False  # one of several processes
    try:
        talk.__enter__()
        check_paths(a)
        if getattr(a, "config", None) is not None:
            a = run_config.reparse(parser, parser.commands[a.command], argv, a)
        if getattr(a, "tensorboard", False):
            tracking.require()  # before anything is written
        if getattr(a, "resume", None) is not None:
            a = _resumed(a, argv)
        if a.command == "sweep" and processes.check_flags(a) > 1:  # N local ones, joined
            jax.config.update("jax_platforms", "cpu")  # as they run (launch); only checks here
            plan(a)  # bad input: one line here, not one per process
            run_dir = a.resume or processes.new_run_dir(a)
            resumable = a.search == "grid" and a.checkpoint_every > 0
            return processes.launch(a, argv, run_dir, resumable)
        if a.command == "sweep":
            _use_cpu_devices(a.cpu_devices)  # before joining: JAX then fixes the count
            joined = processes.join(a) > 1
            results, summary = cmd_sweep(a)
            if results is None:  # a process other than 0: process 0 prints the results
                return 0
        elif a.command == "train":
            results = cmd_train(a)
            summary = (f"test accuracy {results['test_accuracy']:.4f}  test loss {results['test_loss']:.4f}  "
                       f"best epoch {results['best_epoch']}/{results['epochs_run']}  "
                       f"{results['samples_per_second']:,.0f} samples/s\nrun {results['run_dir']}")  # fmt: skip
        elif a.command == "ensemble":
            results = cmd_ensemble(a, argv)
            summary = (f"weight scaling {results['weight_scaling_accuracy']:.4f}; MC "
                       + ", ".join(f"k={k}: {v:.4f}" for k, v in results["mc_accuracy"].items())
                       + (f"; exact {results['exact_accuracy']:.4f}" if "exact_accuracy" in results else "")
                       + "".join(f"; {name} ensemble of {max(acc, key=int)}: {acc[max(acc, key=int)]:.4f}"
                                 for name in ("independent", "bagging")
                                 if (acc := results.get(f"{name}_accuracy")))
                       + f"; run {results['run_dir']}")  # fmt: skip
        elif a.command in _VIEWS:
            results, summary = _VIEWS[a.command](a)
        else:
            results = cmd_fetch(a)
            summary = f"{results['dataset']} ready at {results['path']}"
    except InputError as e:
        who = f"{a.command} (process {jax.process_index()})" if joined else a.command
        print(f"jaxdl {who}: error: {e}", file=sys.stderr)
        return 2
    except (ProcessLost, RUNTIME_ERROR) as e:
        if not joined and not isinstance(e, ProcessLost):
            raise
        said = e if isinstance(e, ProcessLost) else lost(e)  # before or after training
        print(f"jaxdl {a.command} (process {jax.process_index()}): {said}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # At once: a normal exit would first wait at jax.distributed's shutdown barrier
        # for the dead process, until its heartbeat times out and JAX aborts.
        os._exit(1)
    except NonFiniteError as e:
        print(f"jaxdl {a.command}: error: {e}", file=sys.stderr)
        return 3
    except Interrupted as e:
        run = getattr(e, "run_dir", e.directory)
        if joined and jax.process_index():  # every process stopped; process 0 says so
            return 128 + e.signum
        where = processes.again(a) if joined else ""
        print(f"jaxdl {a.command}: {e}; continue with: {resume_command(a.command, run, where)}",
              file=sys.stderr)  # fmt: skip
        return 128 + e.signum
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print(f"jaxdl {a.command}: interrupted; checkpoints already written are kept",
              file=sys.stderr)  # fmt: skip
        return 130
    finally:
        talk.__exit__(None, None, None)
        if threading.current_thread() is threading.main_thread():
            for s, h in handlers.items():  # as they were: the command may have caught them
                signal.signal(s, h)
    print(summary)
    if getattr(a, "json", False):
        print(json.dumps(to_jsonable(results)))
    return 0


class _Talk(contextlib.AbstractContextManager):
    """While a command runs: jaxdl's log messages (fetching data, building kernels,
    compiling) as ``jaxdl: ...`` lines on stderr."""

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            say(self.format(record))  # above a live bar, not inside its line

    def __enter__(self):
        self.handler = self._Handler()
        self.handler.setFormatter(logging.Formatter("jaxdl: %(message)s"))
        self.log = logging.getLogger("jaxdl")
        self.level, self.propagate = self.log.level, self.log.propagate
        self.log.addHandler(self.handler)
        self.log.setLevel(logging.INFO)
        self.log.propagate = False  # once, not again through a root handler
        return self

    def __exit__(self, *exc) -> None:
        self.log.removeHandler(self.handler)
        self.log.setLevel(self.level)
        self.log.propagate = self.propagate


__all__ = ["build_parser", "main"]
