"""The model contract: what jaxdl asks of a Flax module, and how its programs call one.

A model is any ``flax.linen.Module`` whose ``__call__(x, *, train: bool)`` returns logits
(B, classes) for inputs (B, *feature_shape). Inside it may use ``nn.BatchNorm``
(``batch_stats``, updated while ``train``), Flax's ``nn.Dropout`` (jaxdl supplies the
``dropout`` rng stream while training) and ``jaxdl.Dropout``:

- ``Dropout(rate)`` drops like ``nn.Dropout`` in a plain ``model.apply`` (a mask drawn
  from the ``dropout`` rng stream when ``train``), but its rate and its mask may come
  from jaxdl, through the ``dropout`` variable collection: the rate as a traced number
  (sweepable, one per ``Dropout`` layer) and the mask sampled from the step's key, or
  one fixed mask for one subnetwork of the dropout ensemble (``jaxdl.ensemble``).

The masked layers of a module are its ``Dropout`` layers, in the order they are first
called; each masks ``prod(x.shape[1:])`` units of its input (``masked_widths``).

``jaxdl.MLP`` and ``jaxdl.CNN`` (``jaxdl.models.Net``) follow the same contract and take
their rates and masks as arguments instead (a lowering fuses them into their layers).
Every program of jaxdl calls a model through ``call``, which handles both.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from jaxdl import models, validate
from jaxdl.validate import InputError

COLLECTION = "dropout"  # the variables jaxdl gives Dropout layers: "rate" and "mask"
NUMBERS = "hyperparams"  # a module's own traced numbers, {key: value} at the root


class Hyperparameter(nn.Module):
    """A number of a module's own that jaxdl traces: ``Hyperparameter("temperature",
    1.0)()`` is a float32 scalar, the value given under ``key`` in the ``hyperparams``
    collection (``{"hyperparams": {"temperature": 2.0}, "params": ...}``), else
    ``default``. jaxdl gives it from a run's settings (``fit(..., temperature=2.0)``)
    or a sweep's (``grid(temperature=[0.5, 1, 2])``), one compiled program for every
    value. Layers that read the same key read the same number."""

    key: str
    default: float = 1.0

    @nn.compact
    def __call__(self) -> jax.Array:
        root = self.scope.root  # one flat table for the whole module, whatever the path
        if root.has_variable(NUMBERS, self.key):
            return jnp.asarray(root.get_variable(NUMBERS, self.key), jnp.float32)
        return jnp.float32(self.default)


class Dropout(nn.Module):
    """Dropout whose rate is traced and whose mask jaxdl may give (see the module doc).

    ``x``: (B, ...) -> (B, ...). ``convention`` as ``jaxdl.MLP``'s: ``"inverted"`` scales
    kept units by 1/(1-rate) under a mask; ``"classic"`` scales by (1-rate) without one.
    """

    rate: float = 0.5
    convention: str = "inverted"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """``x`` with dropout: jaxdl's mask (B, units) or (units,) if given, else one drawn
        from the ``dropout`` rng stream when ``train``, else none."""
        given = self.has_variable(COLLECTION, "rate")
        rate = self.get_variable(COLLECTION, "rate") if given else self.rate
        if isinstance(rate, int | float) and rate == 0:  # off, known while tracing
            return x
        mask = (
            self.get_variable(COLLECTION, "mask") if self.has_variable(COLLECTION, "mask") else None
        )
        if mask is not None:  # one mask per example (B, units) or one for all (units,)
            mask = mask.reshape(x.shape if mask.ndim == 2 else x.shape[1:])
        elif train:
            keep = 1.0 - jnp.asarray(rate, jnp.float32)
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
        return models.apply_dropout(x, mask, jnp.asarray(rate, jnp.float32), self.convention)


class Layout(NamedTuple):
    """What jaxdl reads off a model for inputs of one feature shape."""

    classes: int  # C of the logits (B, C)
    paths: tuple[tuple[str, ...], ...]  # each Dropout layer's module path, in call order
    widths: tuple[int, ...]  # units each Dropout layer masks
    rates: tuple[float, ...]  # each Dropout layer's own rate
    numbers: tuple[tuple[str, float], ...] = ()  # each Hyperparameter's key and default


def is_net(model: nn.Module) -> bool:
    """Whether ``model`` takes rates and masks as arguments (``jaxdl.MLP``/``CNN``)."""
    return isinstance(model, models.Net)


def _fail(model: nn.Module, expected: str, got: Any) -> InputError:
    return InputError(f"model {type(model).__name__}: expected {expected}, got {got}")


def check_module(model: Any) -> nn.Module:
    """The contract's static part: a Flax module, hashable, ``__call__`` with ``train``."""
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model: expected a flax.linen.Module (e.g. jaxdl.MLP()), got {type(model).__name__}"
        )
    if is_net(model):
        return models.check_model(model)
    params = inspect.signature(type(model).__call__).parameters
    takes = "train" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not takes:
        raise _fail(model, "__call__(self, x, *, train: bool) taking a `train` keyword",
                    f"__call__{inspect.signature(type(model).__call__)}")  # fmt: skip
    try:
        hash(model)
    except TypeError:
        fields = [f.name for f in dataclasses.fields(model) if f.name not in ("parent", "name")]
        bad = [f for f in fields if not _hashable(getattr(model, f))]
        raise _fail(model, "hashable fields (tuples, not lists)", ", ".join(bad) or "") from None
    return model


def _hashable(v: Any) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


def _declare(model: nn.Module, numbers: dict[str, float], number: Hyperparameter) -> None:
    if numbers.setdefault(number.key, float(number.default)) != number.default:
        raise _fail(model, f"one default for hyperparameter {number.key!r}",
                    f"{numbers[number.key]} and {number.default}")  # fmt: skip


@functools.lru_cache(maxsize=128)
def layout(model: nn.Module, feature_shape: tuple[int, ...]) -> Layout:
    """The model's classes and Dropout layers for inputs (B, *feature_shape), read by
    tracing its ``init`` and a training call (no computation); a model that breaks the
    contract raises ``InputError`` saying how."""
    if is_net(model):
        models.check_features(model, ("N", *feature_shape))
        widths = models.masked_widths(model, feature_shape)
        return Layout(model.num_classes, (), widths, ())
    found: dict[tuple[str, ...], Dropout] = {}
    numbers: dict[str, float] = {}

    def seen(module: nn.Module, method: str) -> bool:
        if isinstance(module, Hyperparameter):
            _declare(model, numbers, module)
        if isinstance(module, Dropout) and method == "__call__":
            found.setdefault(tuple(module.scope.path), module)
            return True
        return False

    def probe():
        x = jnp.zeros((2, *feature_shape), jnp.float32)
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        out, v = model.init_with_output(
            rngs, x, train=False, capture_intermediates=seen, mutable=True
        )
        v = dict(v)
        inter = v.pop("intermediates", {})
        stats = [k for k in v if k not in ("params", "batch_stats", NUMBERS)]
        if stats:
            raise _fail(model, "variables in params and batch_stats only", stats)
        model.apply(v, x, train=True, rngs={"dropout": rngs["dropout"]}, mutable=["batch_stats"])
        flat = traverse_util.flatten_dict(inter)
        return out, [flat[(*p, "__call__")] for p in found]

    try:
        out, calls = jax.eval_shape(probe)
    except InputError:
        raise
    except Exception as e:  # a user's module failing in Flax or JAX: say which and why
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise _fail(model, f"a module that runs on inputs {(2, *feature_shape)}",
                    f"{type(e).__name__}: {first}") from e  # fmt: skip
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 2 or out.shape[0] != 2:
        shape = getattr(out, "shape", type(out).__name__)
        raise _fail(model, f"logits (B, classes) = (2, C) for inputs {(2, *feature_shape)}", shape)
    for path, outs in zip(found, calls, strict=True):
        if len(outs) != 1:
            raise _fail(model, "each jaxdl.Dropout layer called once", f"{'/'.join(path)} "
                        f"called {len(outs)} times")  # fmt: skip
    layers = list(found.values())
    for d in layers:
        validate.choice("dropout convention", d.convention, models.CONVENTIONS)
    return Layout(
        classes=int(out.shape[1]),
        paths=tuple(found),
        widths=tuple(math.prod(c[0].shape[1:]) for c in calls),
        rates=tuple(float(d.rate) for d in layers),
        numbers=tuple(numbers.items()),
    )


def masked_widths(model: nn.Module, feature_shape: Sequence[int]) -> tuple[int, ...]:
    """Units of each masked layer (``jaxdl.MLP``: the input, then each hidden layer;
    another module: each ``jaxdl.Dropout`` layer, in call order)."""
    return layout(model, tuple(feature_shape)).widths


def classes(model: nn.Module, feature_shape: Sequence[int]) -> int:
    """C of the model's logits (B, C)."""
    return layout(model, tuple(feature_shape)).classes


def call(
    model: nn.Module,
    variables: dict[str, Any],
    x: jax.Array,
    *,
    train: bool = False,
    rates: jax.Array | None = None,
    masks: models.Masks | None = None,
    example_mask: jax.Array | None = None,
    start: int | None = None,
    stop: int | None = None,
    rng: jax.Array | None = None,
    mutable: Any = False,
):
    """``model.apply`` as jaxdl's programs need it: ``rates`` (masked layers,) and
    ``masks`` (one (B, width) or (width,) 0/1 array, or None, per masked layer) for its
    dropout (rates None: dropout off); ``rng`` the ``dropout`` stream of a training call.

    ``start``/``stop`` split a ``Net`` at a masked layer (``models.Net``); another module
    is split at its input (``stop`` returns ``x``, ``start`` runs the whole module).
    ``example_mask`` (B,) keeps padding out of a ``Net``'s batch statistics (another
    module's batch norm sees the padding of a partial last batch)."""
    if is_net(model):
        return model.apply(
            variables, x, train=train, rates=rates, masks=masks, example_mask=example_mask,
            start=start, stop=stop, mutable=mutable,
        )  # fmt: skip
    if stop is not None:
        return x
    lay = layout(model, tuple(x.shape[1:]))
    given: dict[tuple[str, ...], Any] = {}
    for i, path in enumerate(lay.paths):
        given[(*path, "rate")] = 0.0 if rates is None else rates[i]
        if masks is not None and masks[i] is not None:
            given[(*path, "mask")] = masks[i]
    if given:
        variables = {**variables, COLLECTION: traverse_util.unflatten_dict(given)}
    rngs = {} if rng is None else {"dropout": rng}
    return model.apply(variables, x, train=train, rngs=rngs, mutable=mutable)
