"""TensorBoard event files for runs and sweeps (host side; needs the optional ``tensorboardX``).

``jaxdl train --tensorboard`` writes the run's events into its run directory, epoch by
epoch while it trains; ``jaxdl sweep --tensorboard`` writes one TensorBoard run per member
(``<sweep>/member-000``, …, in the order of ``results.csv``) with the HParams plugin's
session data, and the experiment summary (which settings, which metrics) in the sweep
directory itself, so ``tensorboard --logdir runs/<sweep>`` shows the sweep as a table.

Tags:

- scalars per epoch: ``loss/train``, ``loss/val``, ``accuracy/train``, ``accuracy/val``
  (from the history's ``train_loss`` …), and the other history keys as they are:
  ``learning_rate``, ``grad_norm/<layer>``, ``act_std/<layer>``, ``dead_fraction/<layer>``,
  ``saturated_fraction/<layer>``;
- histograms: ``weights/<layer>/<param>`` (every parameter) and ``activations/<layer>``
  (the deterministic network's hidden activations on the probe batch); per epoch for a
  run, of the final parameters for each sweep member;
- final results: ``results/<name>`` (``test_accuracy``, ``best_val_accuracy``, …), the
  metrics of the HParams table.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxdl import contract, step
from jaxdl.models import Model
from jaxdl.validate import InputError


def require() -> ModuleType:
    """Imports ``tensorboardX``, or says how to install it (exit 2 from the CLI)."""
    try:
        import tensorboardX
    except ImportError:
        raise InputError(
            "--tensorboard: needs the tensorboardX package; install it with "
            "pip install 'jaxdl[tensorboard]'"
        ) from None
    return tensorboardX


def writer(logdir: str | Path, **kwargs: Any) -> Any:
    """A ``SummaryWriter`` for ``logdir`` whose event file never takes the name of one
    already there. tensorboardX names its files by the second and the host alone, so a
    run resumed within the same second as the interrupted one started (or a sweep
    written twice) would truncate the earlier file and lose its events. The suffix sorts
    in the order the files were opened, the order TensorBoard reads them in."""
    suffix = f".{time.time_ns():020d}.{os.getpid()}"
    return require().SummaryWriter(logdir=str(logdir), filename_suffix=suffix, **kwargs)


def scalar_tag(key: str) -> str:
    """History key → TensorBoard tag: ``train_loss`` → ``loss/train``, others unchanged."""
    for split in ("train", "val"):
        if key.startswith(split + "_") and "/" not in key:
            return f"{key.removeprefix(split + '_')}/{split}"
    return key


def param_arrays(params: Any) -> dict[str, np.ndarray]:
    """``{"layer_0/kernel": array, ...}`` from a parameter pytree (host copies)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(params))
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(x)
        for path, x in leaves
    }


@functools.partial(jax.jit, static_argnums=0)
def _activations(model: Model, params, batch_stats, rates, x, numbers=None) -> dict[str, jax.Array]:
    variables = step.apply_variables(params, batch_stats, numbers)
    _, inter = contract.call(model, variables, x, rates=rates, mutable=["intermediates"])
    flat = traverse_util.flatten_dict(inter.get("intermediates", {}), sep="/")
    return {k.removeprefix("act_"): v[-1] for k, v in flat.items()}


def activations(model: Model, params, batch_stats, rates, x, numbers=None) -> dict[str, np.ndarray]:
    """Hidden activations of the deterministic network on ``x``: ``{layer: (N, ...)}``."""
    return jax.device_get(_activations(model, params, batch_stats, rates, x, numbers))


def _histogram(writer: Any, tag: str, values: np.ndarray, step: int) -> None:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]  # a diverged run's NaNs have no bucket
    if values.size:
        writer.add_histogram(tag, values, step)


def log_scalars(writer: Any, step: int, metrics: Mapping[str, float]) -> None:
    """One scalar per metric at ``step`` (NaN kept: TensorBoard shows a diverged run)."""
    for key, value in metrics.items():
        writer.add_scalar(scalar_tag(key), float(value), step)


def log_histograms(
    writer: Any, step: int, params: Any, acts: Mapping[str, np.ndarray] | None = None
) -> None:
    """Histograms of every parameter (``weights/...``) and activation (``activations/...``)."""
    for name, values in param_arrays(params).items():
        _histogram(writer, f"weights/{name}", values, step)
    for name, values in (acts or {}).items():
        _histogram(writer, f"activations/{name}", values, step)


class RunWriter:
    """Events of one training run: ``epoch`` and ``state`` are ``fit_state``'s
    ``on_epoch`` and ``on_state`` callbacks; ``close`` adds the final results.

    ``resumed_from``: the epoch a resumed run restarts after. Events the interrupted run
    wrote for later epochs (logged after its last checkpoint) are purged, so TensorBoard
    shows each epoch once, as the resumed run computed it."""

    def __init__(
        self,
        logdir: str | Path,
        model: Model,
        probe_x: Any,
        config: Mapping | None,
        resumed_from: int | None = None,
    ):
        purge = None if resumed_from is None else int(resumed_from) + 1
        self.writer = writer(logdir, flush_secs=10, purge_step=purge)
        self.model = model
        self.probe_x = probe_x
        self.step = 0
        if config is not None and resumed_from is None:
            text = json.dumps(dict(config), indent=2, default=str)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.step = int(epoch)
        log_scalars(self.writer, self.step, metrics)

    def state(self, epoch: int, state: Any) -> None:
        acts = activations(self.model, state.params, state.batch_stats, state.rates, self.probe_x,
                           state.numbers)  # fmt: skip
        log_histograms(self.writer, int(epoch), state.params, acts)
        self.writer.flush()  # an interrupted run keeps every epoch it finished

    def close(self, results: Mapping[str, Any] | None = None) -> None:
        for key, value in (results or {}).items():
            if _is_number(value):
                self.writer.add_scalar(f"results/{key}", float(value), self.step)
        self.writer.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _hparam(value: Any) -> Any:
    """A value the HParams plugin can show: number, bool or text."""
    if isinstance(value, (bool, str)) or _is_number(value):
        return value.item() if isinstance(value, np.generic) else value
    return json.dumps(value, default=str)


def write_sweep(
    run_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    history: Mapping[str, np.ndarray],
    *,
    settings: Sequence[str],
    results: Sequence[str],
    params: Any = None,
) -> list[Path]:
    """Writes a sweep's events; returns the member log directories.

    Args:
      rows: one dict per member (``results.csv``'s rows).
      history: ``{metric: (members, epochs)}``, NaN after a member stopped (not written).
      settings: the row keys that are hyperparameters (the HParams table's columns).
      results: the row keys that are results (its metrics, as ``results/<key>``).
      params: the members' final parameters stacked on a leading axis, for histograms.
    """
    tbx = require()
    run_dir = Path(run_dir)
    metrics = [k for k in results if any(_is_number(r.get(k)) for r in rows)]
    exp, _, _ = tbx.summary.hparams(
        {k: _hparam(rows[0][k]) for k in settings}, {f"results/{k}": 0.0 for k in metrics}
    )
    with writer(run_dir) as w:
        w.file_writer.add_summary(exp)
    host_params = None if params is None else jax.device_get(params)
    dirs = []
    for i, row in enumerate(rows):
        values = {f"results/{k}": float(row[k]) for k in metrics if _is_number(row.get(k))}
        _, ssi, sei = tbx.summary.hparams({k: _hparam(row[k]) for k in settings}, values)
        logdir = run_dir / f"member-{i:03d}"
        with writer(logdir) as w:
            w.file_writer.add_summary(ssi)
            last = 0
            for key, curves in history.items():
                for e, v in enumerate(np.asarray(curves[i], dtype=np.float64), start=1):
                    if not math.isnan(v):  # NaN: the member had stopped
                        w.add_scalar(scalar_tag(key), float(v), e)
                        last = max(last, e)
            for tag, v in values.items():
                w.add_scalar(tag, v, last)
            if host_params is not None:
                member = jax.tree_util.tree_map(lambda p, i=i: p[i], host_params)
                log_histograms(w, last, member)
            w.file_writer.add_summary(sei)
        dirs.append(logdir)
    return dirs
