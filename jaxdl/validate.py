"""Host-side input checks with clear messages.

Every check runs on NumPy values or Python scalars *before* anything is traced, so a
bad input fails fast with a message that names what was wrong and what was expected,
instead of as an XLA shape error deep inside ``jit``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


class InputError(ValueError):
    """A user-supplied value is invalid. The message names it and what was expected.

    The CLI turns this into a one-line message and exit status 2.
    """


def fail(what: str, expected: str, got: Any) -> None:
    """Raises ``InputError('<what>: expected <expected>, got <got>')``."""
    raise InputError(f"{what}: expected {expected}, got {got!r}")


def choice(what: str, value: str, options: Iterable[str]) -> str:
    """Checks ``value`` is one of ``options``; suggests the nearest one if not."""
    options = list(options)
    if value in options:
        return value
    near = difflib.get_close_matches(str(value), options, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise InputError(f"{what}: unknown value {value!r}{hint}; expected one of {', '.join(options)}")


def positive(what: str, value: float, *, allow_zero: bool = False) -> float:
    """Checks a finite number > 0 (or >= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, float, np.number)) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        fail(what, "a finite number " + (">= 0" if allow_zero else "> 0"), value)
    return float(value)


def positive_int(what: str, value: int, *, allow_zero: bool = False) -> int:
    """Checks an integer > 0 (or >= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        fail(what, "an integer " + (">= 0" if allow_zero else "> 0"), value)
    return int(value)


def in_range(what: str, value: float, lo: float, hi: float, *, hi_open: bool = True) -> float:
    """Checks ``lo <= value < hi`` (or ``<= hi`` when ``hi_open`` is False)."""
    ok = isinstance(value, (int, float, np.number)) and math.isfinite(value) and value >= lo
    ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        fail(what, f"a number in [{lo}, {hi}{')' if hi_open else ']'}", value)
    return float(value)


def rates(what: str, values: Sequence[float], n: int) -> np.ndarray:
    """Checks a dropout-rate vector: ``n`` numbers, each in [0, 1)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape != (n,):
        fail(
            what,
            f"{n} rate(s), one per masked layer (jaxdl.MLP: the input, then each "
            "hidden layer; another module: each jaxdl.Dropout layer)",
            list(values),
        )
    for i, r in enumerate(arr):
        in_range(f"{what}[{i}]", float(r), 0.0, 1.0)
    return arr.astype(np.float32)


def features(what: str, x: Any, feature_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Checks a float feature array of shape (N, *feature_shape), finite, N >= 1."""
    arr = np.asarray(x)
    if arr.ndim < 2:
        fail(f"{what} shape", "(N, features...) with at least 2 dimensions", arr.shape)
    if arr.shape[0] == 0:
        fail(f"{what} shape", "at least one example", arr.shape)
    if not np.issubdtype(arr.dtype, np.floating):
        fail(f"{what} dtype", "a floating dtype (e.g. float32)", str(arr.dtype))
    if feature_shape is not None and tuple(arr.shape[1:]) != tuple(feature_shape):
        fail(f"{what} shape", f"(N, {', '.join(map(str, feature_shape))})", arr.shape)
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise InputError(f"{what}: contains {bad} NaN/Inf value(s); expected finite numbers")
    return arr


def labels(what: str, y: Any, num_classes: int, n: int | None = None) -> np.ndarray:
    """Checks integer labels of shape (N,) in [0, num_classes)."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        fail(f"{what} shape", "(N,) integer class labels", arr.shape)
    if n is not None and arr.shape[0] != n:
        raise InputError(f"{what}: {arr.shape[0]} labels for {n} examples; expected the same count")
    if not np.issubdtype(arr.dtype, np.integer):
        fail(f"{what} dtype", "integer class labels (e.g. int32)", str(arr.dtype))
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise InputError(
            f"{what}: values in [{arr.min()}, {arr.max()}]; expected labels in [0, {num_classes})"
        )
    return arr


def unknown(where: str, key: str, valid, what: str = "key") -> InputError:
    """The error for ``key``, not one of ``valid``, naming the nearest valid one."""
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return InputError(f"{where}: unknown {what} {key!r}{hint}; expected one of {', '.join(valid)}")
