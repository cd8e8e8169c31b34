"""Search spaces of a sweep: grids, value lists as text (``logspace:1e-4:1e-1:16``) and
random configurations, each a list of ``{setting: value}`` dicts (one per configuration).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxdl import validate

# Settings a member may set besides the optimizer's own numbers (optim.defaults).
MEMBER_KEYS = ("l1", "l2", "dropout", "dropout_input", "input_noise", "init_scale")


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """The cartesian product of the given value lists, as one dict per configuration.

    >>> grid(learning_rate=[1e-3, 1e-2], l2=[0.0, 1e-4])[1]
    {'learning_rate': 0.001, 'l2': 0.0001}
    """
    for name, values in axes.items():
        if isinstance(values, str) or not isinstance(values, Sequence) or not values:
            validate.fail(f"sweep values of {name}", "a non-empty list of values", values)
    names = list(axes)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes.values())]


def parse_values(text: str, *, what: str = "values") -> list[float]:
    """Parses ``"1e-4,3e-4,1e-3"``, ``"logspace:1e-4:1e-1:16"`` or ``"linspace:0:0.5:6"``."""
    text = text.strip()
    try:
        if text.startswith(("logspace:", "linspace:")):
            kind, lo, hi, n = text.split(":")
            lo, hi, n = float(lo), float(hi), int(n)
            if n < 1:
                raise ValueError
            if kind == "logspace":
                if lo <= 0 or hi <= 0:
                    validate.fail(what, "logspace bounds > 0", text)
                return [float(v) for v in np.geomspace(lo, hi, n)]
            return [float(v) for v in np.linspace(lo, hi, n)]
        values = [float(t) for t in text.split(",") if t.strip()]
        if not values:
            raise ValueError
        return values
    except validate.InputError:
        raise
    except ValueError:
        validate.fail(what, "comma-separated numbers, logspace:LO:HI:N or linspace:LO:HI:N", text)
        raise  # unreachable: fail raises


def random_configs(seed: int, n: int, **ranges: tuple[float, float, str]) -> list[dict[str, float]]:
    """``n`` random configurations; each range is ``(lo, hi, "log" | "linear")``.

    Log-uniform is the natural prior for learning rates and regularisation strengths.
    """
    validate.positive_int("random configurations", n)
    rng = np.random.default_rng(seed)
    out: list[dict[str, float]] = [{} for _ in range(n)]
    for name, (lo, hi, scale) in ranges.items():
        validate.choice(f"scale of {name}", scale, ("log", "linear"))
        if scale == "log":
            validate.positive(f"{name} lower bound", lo)
            draws = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
        else:
            draws = rng.uniform(lo, hi, n)
        for cfg, v in zip(out, draws, strict=True):
            cfg[name] = float(v)
    return out
