"""Optimizers as Optax chains whose every number lives in the optimizer state.

``make_optimizer(name, **hyperparams)`` returns an ``Optimizer``: a hashable description
of the *structure* (family, schedule kind, frozen layers, per-layer multipliers) plus the
initial numeric values. ``Optimizer.tx`` is the Optax ``GradientTransformation``, built
with ``optax.inject_hyperparams`` so learning rate, momentum, betas, ε, weight decay and
the clipping norm are arrays in ``opt_state.hyperparams``. Two optimizers that differ
only in numbers compare equal, so the training program compiled for one is reused for
the other.

Each family is ``clip_by_global_norm → scale_by_<family> → add_decayed_weights →
scale_by_learning_rate → [per-layer multipliers] → max_norm`` (the decay is decoupled, as
in AdamW, and reaches kernels only; max-norm, as in Srivastava et al. 2014, keeps each
unit's incoming weight vector within an L2 ball of radius ``max_norm`` after the step).

| family | update direction u (before ×(-lr)) |
|---|---|
| sgd | g |
| momentum | v ← μ·v + g; u = v (the accumulating form) |
| momentum_ema | m ← μ·m + (1-μ)·g; u = m (the moving-average form) |
| nesterov | v ← μ·v + g; u = g + μ·v |
| adagrad | s ← s + g²; u = g / sqrt(s + ε) (s starts at 0.1, as in Keras) |
| rmsprop | s ← ρ·s + (1-ρ)·g²; u = g / sqrt(s + ε) |
| adam, adamw | bias-corrected Adam moments (adamw: weight_decay defaults to 1e-4) |

The learning-rate schedule and the delayed weight decay are applied by the train step,
which writes the current values into ``opt_state.hyperparams`` each step from the base
values (see ``current_hyperparams``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from jaxdl import inits, validate

_COMMON = {"learning_rate": 0.01, "weight_decay": 0.0, "clip_norm": math.inf, "max_norm": math.inf}
FAMILIES: dict[str, dict[str, float]] = {
    "sgd": {},
    "momentum": {"momentum": 0.9},
    "momentum_ema": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9},
    "adagrad": {"eps": 1e-7},
    "rmsprop": {"learning_rate": 1e-3, "decay": 0.9, "eps": 1e-7},
    "adam": {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-7},
    "adamw": {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-7, "weight_decay": 1e-4},
}
SCHEDULES = ("constant", "step", "plateau", "warmup_cosine")
# Numbers read by the train step, not by Optax: they shape lr(t) and wd(t).
SCHEDULE_DEFAULTS = {
    "lr_decay": 0.5,  # step: lr × decay every `lr_decay_every` epochs; plateau: × decay
    "lr_decay_every": 10.0,
    "lr_patience": 3.0,  # plateau: epochs without improvement before decaying
    "warmup_epochs": 0.0,
    "lr_min_ratio": 0.0,  # cosine floor as a fraction of the base learning rate
    "decay_start_epoch": 0.0,  # weight decay is 0 before this epoch
}


def defaults(name: str) -> dict[str, float]:
    """All numeric hyperparameters of family ``name`` with their defaults."""
    validate.choice("optimizer", name, FAMILIES)
    return {**_COMMON, **FAMILIES[name], **SCHEDULE_DEFAULTS}


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """Structure (compared and hashed) plus initial values (``hyperparams``, not compared)."""

    name: str
    schedule: str = "constant"
    freeze: tuple[str, ...] = ()
    layer_lr: tuple[tuple[str, float], ...] = ()
    # Whether the chain contains these passes at all (each costs a sweep over the
    # parameters every step); their values stay traced.
    clip: bool = False
    decay: bool = False
    constrain: bool = False  # the max-norm projection
    hyperparams: Mapping[str, float] = dataclasses.field(
        default_factory=dict, compare=False, hash=False
    )

    @functools.cached_property
    def tx(self) -> optax.GradientTransformation:
        """The Optax transformation, initialised with ``hyperparams``."""
        injected = {k: v for k, v in self.hyperparams.items() if k in injected_names(self.name)}
        return _structure(
            self.name, self.freeze, self.layer_lr, self.clip, self.decay, self.constrain
        )(injected)

    def init(self, params) -> optax.OptState:
        return self.tx.init(params)

    def update(self, updates, state, params=None):
        return self.tx.update(updates, state, params)


def make_optimizer(
    name: str,
    *,
    schedule: str = "constant",
    freeze: tuple[str, ...] | list[str] = (),
    layer_lr: Mapping[str, float] | None = None,
    **hyperparams: float,
) -> Optimizer:
    """Builds an optimizer description; unknown names and bad values raise ``InputError``.

    Args:
      name: one of ``FAMILIES``.
      schedule: one of ``SCHEDULES``; its numbers are hyperparameters too.
      freeze: top-level parameter names (e.g. ``"layer_0"``) that never change.
      layer_lr: learning-rate multipliers per top-level parameter name.
      **hyperparams: overrides of ``defaults(name)``.

    Example::

      opt = make_optimizer("momentum", learning_rate=0.05, momentum=0.9)
      state = opt.init(params)                      # plain Optax from here on
      opt.tx.update(grads, state, params)
    """
    values = defaults(name)
    validate.choice("schedule", schedule, SCHEDULES)
    for key, value in hyperparams.items():
        validate.choice(f"{name} hyperparameter", key, values)
        values[key] = value
    check_hyperparams(values)
    mult = tuple(sorted((layer_lr or {}).items()))
    for layer, m in mult:
        validate.positive(f"layer_lr[{layer}]", m, allow_zero=True)
    return Optimizer(
        name,
        schedule,
        tuple(sorted(set(freeze))),
        mult,
        clip=math.isfinite(values["clip_norm"]),
        decay=values["weight_decay"] > 0,
        constrain=math.isfinite(values["max_norm"]),
        hyperparams=values,
    )


def check_hyperparams(values: Mapping[str, float]) -> None:
    """Host-side range checks for the numbers a user can set."""
    validate.positive("learning_rate", values["learning_rate"])
    for key in ("weight_decay", "eps", "lr_min_ratio", "warmup_epochs", "decay_start_epoch"):
        if key in values:
            validate.positive(key, values[key], allow_zero=True)
    for key in ("momentum", "b1", "b2", "decay"):
        if key in values:
            validate.in_range(key, values[key], 0.0, 1.0)
    if not values["clip_norm"] > 0:
        validate.fail("clip_norm", "a number > 0 (inf: no clipping)", values["clip_norm"])
    if not values["max_norm"] > 0:
        validate.fail("max_norm", "a number > 0 (inf: no constraint)", values["max_norm"])
    validate.in_range("lr_decay", values["lr_decay"], 0.0, 1.0, hi_open=False)
    validate.positive("lr_decay_every", values["lr_decay_every"])
    validate.positive("lr_patience", values["lr_patience"], allow_zero=True)


def check_structure(optimizer: Optimizer, values: Mapping[str, float]) -> None:
    """Values that need a pass the optimizer was built without are an error, not a no-op."""
    if values["weight_decay"] > 0 and not optimizer.decay:
        validate.fail("weight_decay", "0 for an optimizer made without weight decay (pass "
                      "weight_decay to make_optimizer to include the decay step)", values["weight_decay"])  # fmt: skip
    if math.isfinite(values["clip_norm"]) and not optimizer.clip:
        validate.fail("clip_norm", "inf for an optimizer made without clipping (pass clip_norm "
                      "to make_optimizer to include the clipping step)", values["clip_norm"])  # fmt: skip
    if math.isfinite(values["max_norm"]) and not optimizer.constrain:
        validate.fail("max_norm", "inf for an optimizer made without the max-norm constraint "
                      "(pass max_norm to make_optimizer to include it)", values["max_norm"])  # fmt: skip


def check_layers(optimizer: Optimizer, layers: list[str]) -> None:
    """Checks that ``freeze`` and ``layer_lr`` name top-level parameters of the model."""
    for what, names in (
        ("freeze", optimizer.freeze),
        ("layer_lr", [k for k, _ in optimizer.layer_lr]),
    ):
        for n in names:
            validate.choice(f"{what} layer", n, layers)


def injected_names(name: str) -> tuple[str, ...]:
    """The hyperparameters that live in ``opt_state.hyperparams`` for family ``name``."""
    return tuple(k for k in defaults(name) if k not in SCHEDULE_DEFAULTS)


def _kernel_mask(params):
    return jax.tree_util.tree_map_with_path(inits.is_kernel, params)


def _family(name: str, h: Mapping[str, jax.Array]) -> optax.GradientTransformation:
    if name in ("momentum", "nesterov"):
        return optax.trace(decay=h["momentum"], nesterov=name == "nesterov")
    if name == "momentum_ema":
        return optax.ema(decay=h["momentum"], debias=False)
    if name == "adagrad":
        return optax.scale_by_rss(initial_accumulator_value=0.1, eps=h["eps"])
    if name == "rmsprop":
        return optax.scale_by_rms(decay=h["decay"], eps=h["eps"])
    if name in ("adam", "adamw"):
        return optax.scale_by_adam(b1=h["b1"], b2=h["b2"], eps=h["eps"])
    return optax.identity()


def _top(path) -> str:
    return str(getattr(path[0], "key", path[0]))


@functools.lru_cache(maxsize=64)
def _structure(
    name: str,
    freeze: tuple[str, ...],
    layer_lr: tuple[tuple[str, float], ...],
    with_clip: bool = True,
    with_decay: bool = True,
    with_max_norm: bool = False,
):
    """Returns ``values -> GradientTransformation`` for one structure (cached)."""

    # inject_hyperparams reads the factory's signature, so every name is spelled out;
    # the ones a family does not use stay None (static).
    def factory(
        learning_rate,
        weight_decay,
        clip_norm,
        max_norm,
        momentum=None,
        decay=None,
        eps=None,
        b1=None,
        b2=None,
    ):
        h = dict(momentum=momentum, decay=decay, eps=eps, b1=b1, b2=b2)
        return optax.chain(
            optax.clip_by_global_norm(clip_norm) if with_clip else optax.identity(),
            _family(name, h),
            optax.add_decayed_weights(weight_decay, mask=_kernel_mask)
            if with_decay
            else optax.identity(),
            optax.scale_by_learning_rate(learning_rate),
            _scale_layers(dict(layer_lr)) if layer_lr else optax.identity(),
            # Last: the constraint holds for the parameters the step produces.
            _max_norm(max_norm) if with_max_norm else optax.identity(),
        )

    injected = optax.inject_hyperparams(factory)

    def build(values: Mapping[str, float]) -> optax.GradientTransformation:
        tx = injected(**values)
        if freeze:
            labels = functools.partial(_freeze_labels, frozenset(freeze))
            tx = optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)
        return tx

    return build


def _freeze_labels(frozen: frozenset[str], params):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if _top(p) in frozen else "train", params
    )


def _scale_layers(mult: Mapping[str, float]) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(lambda p, u: u * mult.get(_top(p), 1.0), updates)
        return scaled, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _max_norm(radius: jax.Array) -> optax.GradientTransformation:
    """Changes the updates so that every unit's incoming weights (a kernel's column: the
    norm is taken over all axes but the last) end within an L2 ball of ``radius``."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("max_norm needs the parameters: call update(grads, state, params)")

        def project(path, u, p):
            if not inits.is_kernel(path, p):
                return u
            new = p + u
            norm = jnp.sqrt((new * new).sum(axis=tuple(range(new.ndim - 1)), keepdims=True))
            scale = jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))
            return new * scale.astype(new.dtype) - p

        return jax.tree_util.tree_map_with_path(project, updates, params), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _is_injected(node) -> bool:
    return isinstance(node, optax.InjectStatefulHyperparamsState | optax.InjectHyperparamsState)


def set_hyperparams(opt_state, values: Mapping[str, jax.Array]):
    """Returns ``opt_state`` with the injected hyperparameters in ``values`` replaced.

    Works through ``partition`` / ``chain`` wrappers. Values are cast to each slot's dtype
    so the state's types never change (which would retrace).
    """

    def replace(node):
        if not _is_injected(node):
            return node
        hp = dict(node.hyperparams)
        for k in hp.keys() & values.keys():
            hp[k] = jnp.asarray(values[k], dtype=jnp.asarray(hp[k]).dtype)
        return node._replace(hyperparams=hp)

    return jax.tree_util.tree_map(replace, opt_state, is_leaf=_is_injected)


def get_hyperparams(opt_state) -> dict[str, jax.Array]:
    """The injected hyperparameters of the (first) injected state in ``opt_state``."""
    nodes = [
        n for n in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_injected) if _is_injected(n)
    ]
    return dict(nodes[0].hyperparams) if nodes else {}


def lr_factor(
    schedule: str, epoch: jax.Array, h: Mapping[str, jax.Array], total_epochs: int, plateau_scale
) -> jax.Array:
    """Multiplier of the base learning rate at (fractional, 0-based) ``epoch``.

    ``step``: decay^floor(epoch / every). ``plateau``: the tracked scale.
    ``warmup_cosine``: linear warm-up to 1 over ``warmup_epochs``, then a cosine to
    ``lr_min_ratio`` at ``total_epochs``.
    """
    if schedule == "step":
        return h["lr_decay"] ** jnp.floor(epoch / h["lr_decay_every"])
    if schedule == "plateau":
        return plateau_scale
    if schedule == "warmup_cosine":
        warm = h["warmup_epochs"]
        up = jnp.where(warm > 0, jnp.minimum(1.0, (epoch + 1e-9) / jnp.maximum(warm, 1e-9)), 1.0)
        frac = jnp.clip((epoch - warm) / jnp.maximum(total_epochs - warm, 1e-9), 0.0, 1.0)
        floor = h["lr_min_ratio"]
        cos = floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(epoch < warm, up, cos)
    return jnp.ones((), jnp.float32)


def current_hyperparams(
    optimizer: Optimizer,
    base: Mapping[str, jax.Array],
    epoch: jax.Array,
    total_epochs: int,
    plateau_scale: jax.Array,
) -> dict[str, jax.Array]:
    """The injected values for this step: scheduled lr, weight decay gated by epoch."""
    values = {k: base[k] for k in injected_names(optimizer.name)}
    factor = lr_factor(optimizer.schedule, epoch, base, total_epochs, plateau_scale)
    values["learning_rate"] = base["learning_rate"] * factor
    values["weight_decay"] = jnp.where(
        epoch >= base["decay_start_epoch"], base["weight_decay"], 0.0
    )
    return values
