"""Host-side files of a run: atomic writes, JSON and CSV, history files, run
directories and the parameters' digest.

Nothing here runs inside ``jit``. A *history* is ``dict[str, list[float]]``: one list per
metric, one value per epoch, e.g. ``train_loss``, ``val_accuracy``, ``grad_norm/layer_0``.

Every file is written atomically (temp file in the same directory, then ``os.replace``),
so a crash or Ctrl-C never leaves a truncated ``history.json`` behind.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdl.validate import InputError

PathLike = str | os.PathLike
History = Mapping[str, Sequence[float]]  # metric name -> one value per epoch


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file


def atomic_write(path: PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` via a sibling temp file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target: os.replace is only atomic within one filesystem.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes it private (0600); results are not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_jsonable(obj: Any) -> Any:
    """Converts NumPy/JAX scalars and arrays (nested in dicts, lists, tuples) to Python.

    Non-finite floats (NaN, ±Inf) become ``None``: they are not valid JSON, and a
    diverged run must still produce a file that every JSON parser accepts.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: PathLike, obj: Any) -> Path:
    """Writes ``obj`` as indented JSON (see ``to_jsonable`` for the conversions)."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, text.encode())


def write_text(path: PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) atomically."""
    return atomic_write(path, text.encode())


def scalar(value: Any) -> Any:
    """Unwraps 0-d NumPy/JAX values so CSV cells read ``0.5``, not ``Array(0.5)``."""
    is_array = isinstance(value, (jax.Array, np.ndarray, np.generic))
    return np.asarray(value).item() if is_array else value


def write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Writes ``rows`` as CSV; columns are the first row's keys, then new keys in order seen.

    A row that lacks a column gets an empty cell.
    """
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: scalar(v) for k, v in row.items()} for row in rows)
    return atomic_write(path, buf.getvalue().encode())


def history_rows(history: History) -> list[dict[str, Any]]:
    """One dict per epoch: ``{"epoch": 1, "train_loss": ..., ...}``.

    Raises ``InputError`` (a ``ValueError``) if the metrics have different lengths,
    since rows would otherwise silently misalign epochs.
    """
    lengths = {k: len(v) for k, v in history.items()}
    if len(set(lengths.values())) > 1:
        raise InputError(
            f"history: metrics have different lengths {lengths}; expected one value per epoch each"
        )
    n = next(iter(lengths.values()), 0)
    return [{"epoch": i + 1, **{k: float(v[i]) for k, v in history.items()}} for i in range(n)]


def save_history(run_dir: PathLike, history: History) -> list[Path]:
    """Writes ``history.json`` (metric → list) and ``history.csv`` (one row per epoch)."""
    rows = history_rows(history)  # validates lengths before anything is written
    json_path = write_json(Path(run_dir, "history.json"), dict(history))
    return [json_path, write_csv(Path(run_dir, "history.csv"), rows)]


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def make_run_dir(root: PathLike, name: str | None = None, *, prefix: str = "train") -> Path:
    """Creates and returns ``root/name`` (parents included).

    With ``name=None`` the name is ``<prefix>-YYYYmmdd-HHMMSS``, suffixed ``-2``, ``-3``,
    ... if taken. An explicit ``name`` that exists and is not empty is refused: reusing it
    would mix two runs' files.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise InputError(f"runs root {str(root)!r} is a file; expected a directory")
    root.mkdir(parents=True, exist_ok=True)
    if name is not None:
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise InputError(f"--name: expected a plain directory name, got {name!r}")
        path = root / name
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise InputError(
                f"run directory {str(path)!r} already exists; pick another --name or delete it"
            )
        path.mkdir(exist_ok=True)
        return path
    base = f"{prefix}-{_timestamp()}"
    for i in itertools.count(1):
        path = root / (base if i == 1 else f"{base}-{i}")
        with contextlib.suppress(FileExistsError):
            path.mkdir()  # atomic: two processes starting together never share a dir
            return path


def params_digest(params: Any) -> str:
    """SHA-256 hex digest of a parameter pytree's names, dtypes, shapes and bytes.

    Leaves are sorted by path and serialised little-endian in C order, so the digest
    does not depend on dict insertion order or host byte order, and any single-bit
    change in any value changes it. Arrays must be fully addressable on this host.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    h = hashlib.sha256()
    for key, leaf in sorted(((jax.tree_util.keystr(p), x) for p, x in leaves), key=lambda t: t[0]):
        arr = np.asarray(leaf)
        arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
        # Length-prefix each field so different (name, bytes) splits cannot collide.
        fields = (key.encode(), str(arr.dtype).encode(), repr(arr.shape).encode(), arr.tobytes())
        for part in fields:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()
