"""Checkpoints with Orbax: save every N epochs and the best, resume bit-exactly.

A checkpoint is one Orbax step directory, ``<directory>/<epoch>/``, with three items:

- ``state``: the whole resumable pytree. For a single run it is the ``TrainState``:
  step, epoch, parameters, optimizer state (injected hyperparameters included), batch
  statistics, plateau and early-stopping state, and the run's PRNG key, stored as its
  raw ``uint32`` data (``jax.random.key_data``) and re-wrapped on restore with the
  recorded implementation. The data order of epoch ``e`` is a function of ``(key, e)``
  (``step.epoch_order``), so the key and the epoch counter are the data-order state.
  For a sweep it is every member's state stacked, with the ``active`` flags.
- ``host``: JSON for what lives on the host (the history; for a sweep also the
  ``diverged`` flags and epochs run). Python floats round-trip through JSON exactly.
- ``meta``: the epoch, a description of the run (``config``; see ``describe``), the
  versions of jax, flax, optax and orbax and the PRNG implementation.

Orbax writes each checkpoint into a temporary directory and renames it once complete,
so a checkpoint half-written when the process died is never listed. A latest checkpoint
that cannot be read falls back to the one before, with a warning. A checkpoint written
by another configuration, library version or PRNG implementation is refused
(``CheckpointError``): resuming it could not continue the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxdl import processes, validate
from jaxdl.validate import InputError

FORMAT = 1
# Versions that must match for a resumed run to be the same computation.
COMPATIBLE = ("jax", "flax", "optax", "prng_impl")


class CheckpointError(InputError):
    """A checkpoint cannot be used to resume this run (the message says why)."""


class Interrupted(Exception):  # noqa: N818 (not an error: a requested stop)
    """Training stopped on a signal after saving a checkpoint at ``epoch``."""

    def __init__(self, signum: int, epoch: int, directory: Path) -> None:
        self.signum, self.epoch, self.directory = signum, epoch, directory
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name} after epoch {epoch}; checkpoint saved in {directory}"
        )


def versions() -> dict[str, str]:
    """Library versions and the default PRNG implementation of this process."""
    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax": ocp.__version__,
        "prng_impl": str(jax.config.jax_default_prng_impl),
    }


def data_digest(*arrays: np.ndarray) -> str:
    """SHA-256 of the arrays' dtypes, shapes and bytes (the training data's identity)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (tuples become lists), as it reads back from a file."""

    def default(o):
        if isinstance(o, jax.Array | np.ndarray | np.generic):
            return np.asarray(o).tolist()
        return repr(o)

    return json.loads(json.dumps(obj, default=default))


def describe(setup: Any, hp: Any, x: np.ndarray, y: np.ndarray, **extra: Any) -> dict[str, Any]:
    """What makes a resumed run the same run: the static ``Setup`` (model, optimizer
    structure, sizes), the traced hyperparameter values, the training data's digest,
    and any ``extra`` entries (JSON-able)."""
    return _jsonable({"setup": repr(setup), "hparams": hp, "data": data_digest(x, y), **extra})


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _encode(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda v: jax.random.key_data(v) if _is_key(v) else v, tree)


def _decode(tree: Any, like: Any, impl: str | None) -> Any:
    def wrap(v, ref):
        return jax.random.wrap_key_data(v, impl=impl) if _is_key(ref) else v

    return jax.tree_util.tree_map(wrap, tree, like)


def _key_impl(tree: Any) -> str | None:
    keys = [v for v in jax.tree_util.tree_leaves(tree) if _is_key(v)]
    return str(jax.random.key_impl(keys[0])) if keys else None


def _rank(metrics: Mapping[str, float]) -> tuple[float, int]:
    """Orbax keeps the checkpoint with the largest rank: best score, earliest epoch."""
    return (metrics["score"], -metrics["epoch"])


@dataclasses.dataclass
class Restored:
    """A restored checkpoint, ending at ``epoch``."""

    state: Any  # a TrainState; for a sweep chunk {"states": (members, ...), "active": (members,)}
    host: dict[str, Any]  # the history {metric: [a float per epoch]}, for a chunk (members, epochs)
    epoch: int


@dataclasses.dataclass
class Checkpointer:
    """Saves a run every ``every`` epochs, at each new best epoch and at the last one;
    keeps the ``max_to_keep`` latest and the best. ``config`` (see ``describe``) must
    equal the one a checkpoint was written with for it to be restored."""

    directory: Path
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    every: int = 1
    max_to_keep: int = 2

    def __post_init__(self) -> None:
        validate.positive_int("checkpoint every", self.every)
        validate.positive_int("checkpoints to keep", self.max_to_keep)
        self.directory = Path(self.directory).absolute()
        self.config = _jsonable(dict(self.config))
        keep = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=self.max_to_keep),
                policies.BestN(get_metric_fn=_rank, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            preservation_policy=keep,
            create=True,
            cleanup_tmp_directories=True,  # what a killed save left behind
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._caught: dict[str, int] = {}  # shared with the ``sub`` checkpointers

    @property
    def requested(self) -> int | None:
        """The signal caught while training (see ``catch_signals``), or None."""
        return self._caught.get("signal")

    @requested.setter
    def requested(self, signum: int | None) -> None:
        self._caught["signal"] = signum

    def sub(self, name: str, **extra: Any) -> Checkpointer:
        """A checkpointer with the same settings in ``directory/name`` (a sweep chunk),
        its config extended by ``extra``."""
        config = {**self.config, **extra}
        child = Checkpointer(self.directory / name, config, self.every, self.max_to_keep)
        child._caught = self._caught  # a signal caught by this one stops the child too
        return child

    def epochs(self) -> list[int]:
        """Epochs with a complete checkpoint, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def saved(self) -> list[int]:
        """Epochs with a complete checkpoint here or in a ``sub`` checkpointer's directory
        (a sweep's chunks), oldest first."""
        found = {int(d.name) for d in self.directory.glob("**/[0-9]*") if d.name.isdigit()}
        return sorted(found)

    def save(self, epoch: int, state: Any, host: Mapping[str, Any], score: float | None = None):
        """Writes the checkpoint of ``epoch`` (``score``: higher is better, ranks the best)."""
        meta = {
            "format": FORMAT,
            "epoch": int(epoch),
            "versions": versions(),
            "key_impl": _key_impl(state),
            "config": self.config,
        }
        metrics = None
        if score is not None:
            metrics = {"score": float(score) if np.isfinite(score) else -1e300, "epoch": epoch}
        items = ocp.args.Composite(
            state=ocp.args.StandardSave(_encode(state)),
            host=ocp.args.JsonSave(dict(host)),
            meta=ocp.args.JsonSave(meta),
        )
        self._manager.save(int(epoch), args=items, metrics=metrics, force=True)
        self._manager.wait_until_finished()

    def after_epoch(
        self, epoch: int, state: Any, host: Mapping[str, Any], *, score=None, best=False, last=False
    ) -> None:
        """Saves when due (every N epochs, a new best, the last epoch, a pending signal);
        after a signal, raises ``Interrupted`` once the checkpoint is written, unless this
        was the ``last`` epoch: the run is then complete and goes on to its results. Over
        several processes, a signal any of them caught stops them all at this epoch (they
        save together)."""
        if processes.any_process(self.requested is not None) and self.requested is None:
            self.requested = signal.SIGTERM  # another process's signal
        if epoch % self.every == 0 or best or last or self.requested is not None:
            self.save(epoch, state, host, score)
        if self.requested is not None and not last:
            raise Interrupted(self.requested, epoch, self.directory)

    def check(self, meta: Mapping[str, Any], epoch: int) -> None:
        """Raises ``CheckpointError`` unless ``meta`` matches this process and config."""
        where = f"checkpoint {self.directory / str(epoch)}"
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{where}: unknown format {meta.get('format')!r}")
        now = versions()
        for k in COMPATIBLE:
            if meta["versions"].get(k) != now[k]:
                raise CheckpointError(
                    f"{where} was written with {k} {meta['versions'].get(k)}, this is {k} "
                    f"{now[k]}; resume with the same versions or start a new run"
                )
        if meta["config"] != self.config:
            diff = sorted(
                k
                for k in {*meta["config"], *self.config}
                if meta["config"].get(k) != self.config.get(k)
            )
            if diff == ["size"]:  # a sweep chunk's members, padded to a multiple of devices
                raise CheckpointError(
                    f"{where} holds {meta['config']['size']} members (padded for its devices); "
                    f"this run pads to {self.config['size']}: resume on as many devices "
                    "(the --processes and --cpu-devices it started with)"
                )
            raise CheckpointError(
                f"{where} belongs to a run with other settings ({', '.join(diff)} differ); "
                "resume with the run's own settings or start a new run"
            )

    def restore(self, like: Any) -> Restored | None:
        """The latest readable checkpoint (None if there is none), shaped like ``like``
        (a freshly initialised state of the same run). An unreadable checkpoint falls back
        to the previous one with a warning, and is moved aside to ``unreadable-<epoch>``
        once an older one was read (so the run can save that epoch again); an incompatible
        one raises ``CheckpointError``."""
        steps = self.epochs()[::-1]
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _encode(like))
        errors = []
        for step in steps:
            try:
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                ).meta
            except Exception as e:  # noqa: BLE001 (any read failure means: try the previous)
                errors.append(self._unreadable(step, e, steps))
                continue
            self.check(meta, step)
            try:
                items = ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()
                )
                out = self._manager.restore(step, args=items)
            except Exception as e:  # noqa: BLE001
                errors.append(self._unreadable(step, e, steps))
                continue
            for bad in (s for s in steps if s > step and processes.leader()):
                target, n = self.directory / f"unreadable-{bad}", 1
                while target.exists():
                    target, n = self.directory / f"unreadable-{bad}-{n}", n + 1
                (self.directory / str(bad)).rename(target)
            processes.barrier("jaxdl: unreadable checkpoints renamed")  # before any reloads
            self._manager.reload()
            return Restored(_decode(out.state, like, meta["key_impl"]), dict(out.host), step)
        if errors:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} (tried epochs "
                f"{', '.join(map(str, steps))}; last error: {errors[-1]})"
            )
        return None

    def _unreadable(self, step: int, error: Exception, steps: list[int]) -> str:
        text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        older = [s for s in steps if s < step]
        then = f"falling back to epoch {older[0]}" if older else "no older checkpoint"
        warnings.warn(
            f"checkpoint {self.directory / str(step)} is unreadable ({text[:200]}); {then}",
            stacklevel=3,
        )
        return text

    @contextlib.contextmanager
    def catch_signals(
        self,
        signums=(signal.SIGINT, signal.SIGTERM),
        *,
        restore: bool = True,
        announce: Callable[[int], None] | None = None,
        stop: Callable[[int], None] | None = None,
    ) -> Iterator[Checkpointer]:
        """While inside, SIGINT/SIGTERM only set ``self.requested``: training saves a
        checkpoint at the end of the current epoch and raises ``Interrupted``. A second
        signal acts at once: ``stop(signum)`` if given, else the previous handlers (back
        after the first). With ``restore=False`` the handlers stay after the block (a
        signal while the results are written then lets them finish); the caller restores
        them. ``announce(signum)`` and ``stop`` are called as soon as the signal arrives,
        even while the main thread waits for a compiled epoch (see ``_at_once``)."""
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be installed from the main thread
            return
        previous = {s: signal.getsignal(s) for s in signums}

        def handler(signum, frame):
            if self.requested is not None:  # a second one, which _at_once's thread stops
                return
            self.requested = signum
            if stop is None:  # the previous handlers take the second
                for s, h in previous.items():
                    signal.signal(s, h)

        for s in signums:
            signal.signal(s, handler)
        watch = _at_once(signums, announce, stop) if announce or stop else contextlib.nullcontext()
        try:
            with watch:
                yield self
        except BaseException:
            restore = True
            raise
        finally:
            if restore:
                for s, h in previous.items():
                    signal.signal(s, h)

    def close(self) -> None:
        self._manager.close()


@contextlib.contextmanager
def _at_once(signums, announce, stop) -> Iterator[None]:
    """Calls ``announce(signum)`` from a thread as soon as the first of ``signums``
    arrives, and ``stop(signum)`` at the second (either may be None). Python runs a
    signal's handler only once the main thread is back in Python: while it waits for a
    compiled epoch, not before the epoch ends. The interpreter also writes each signal's
    number to its wakeup file descriptor at once; a thread reads it."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watch() -> None:
        seen = 0
        while got := os.read(r, 1):
            if got[0] in signums:
                seen += 1
                then = announce if seen == 1 else stop
                if then is not None:
                    then(got[0])

    watcher = threading.Thread(target=watch, name="jaxdl-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(w)  # the watcher's read ends
        watcher.join()
        os.close(r)
