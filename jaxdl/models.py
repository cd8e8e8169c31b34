"""Models: an MLP and a small CNN in ``flax.linen`` (pure ``init`` / ``apply``).

Dropout is split in two: *sampling* masks (``sample_masks``) and *applying* them (the
models' ``masks=`` argument). A model never draws randomness itself, so the same weights
can be evaluated under any explicit mask (one subnetwork of the dropout ensemble), and
rates are plain traced arrays that can be vmapped.

Masked layers are, in order: the input of the first dense layer (the pixels for the MLP,
the flattened conv features for the CNN), then the output of every hidden dense layer.
``masked_widths(model, feature_shape)`` gives their widths.

The models are plain Flax: every JAX transformation (``grad``, ``jvp``, ``hessian``,
``vmap``, ``checkpoint``, ``jax.export``) works on their ``apply`` on every backend. How
jaxdl's own compiled programs lower them on a given host (``jaxdl.lowering``) never
changes what they compute: it may replace ``Dense.forward`` and ``Conv.convolve`` by
equal computations (Flax method interception), never the modules themselves.

Dropout conventions (both equal in expectation):

- ``"inverted"``: a kept unit is scaled by 1/(1-p) under a mask; no mask → identity.
- ``"classic"``: a kept unit is left as is under a mask; no mask → scaled by (1-p)
  (the same as scaling the outgoing weights by (1-p) at test time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdl import inits, validate

ACTIVATIONS = ("relu", "sigmoid", "tanh", "maxout", "linear")
CONVENTIONS = ("inverted", "classic")
Masks = tuple[jax.Array, ...]


def activate(name: str, h: jax.Array, pieces: int) -> jax.Array:
    """Applies ``name`` to pre-activations ``h`` (..., units·pieces for maxout)."""
    if name == "relu":
        return nn.relu(h)
    if name == "sigmoid":
        return nn.sigmoid(h)
    if name == "tanh":
        return jnp.tanh(h)
    if name == "maxout":
        return h.reshape(*h.shape[:-1], h.shape[-1] // pieces, pieces).max(axis=-1)
    return h


def apply_dropout(
    h: jax.Array, mask: jax.Array | None, rate: jax.Array | None, convention: str
) -> jax.Array:
    """Applies one dropout layer. ``h``: (B, units); ``mask``: (B, units) or (units,) of 0/1,
    a sample: it gets no gradient (the rate does)."""
    if rate is None:
        return h
    keep = (1.0 - rate).astype(h.dtype)
    if mask is None:
        return h * keep if convention == "classic" else h
    h = h * jax.lax.stop_gradient(mask.astype(h.dtype))
    # h · (1/keep): how XLA:CPU divides by a broadcast scalar, as Dense does inside a layer
    # (and the CPU lowering's fused layers), so every path rounds alike.
    return h * (1.0 / keep) if convention == "inverted" else h


def _dropout_at(masks: Masks | None, rates: jax.Array | None, i: int):
    # A mask entry may be None: that layer is not masked (kept whole).
    return (None if masks is None else masks[i]), (None if rates is None else rates[i])


class Net(nn.Module):
    """The call both of jaxdl's networks answer (``logits`` does the work)."""

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        masks: Masks | None = None,
        rates: jax.Array | None = None,
        example_mask: jax.Array | None = None,
        start: int | None = None,
        stop: int | None = None,
    ) -> jax.Array:
        """Logits (B, num_classes). ``masks``: one (B, width) 0/1 array per masked layer
        (or None: sampled from the ``dropout`` rng stream with ``rates`` when training);
        ``rates``: (masked layers,) dropout rates or None; ``example_mask``: (B,) bool
        marking real (not padding) examples, used by batch-norm statistics.

        ``stop=i`` returns the input of masked layer ``i`` (before its dropout) instead of
        the logits; ``start=i`` takes ``x`` to be that input and runs the rest (None: ``x``
        is the network's input). Together they split the network so the part before a
        masked layer is computed once."""
        return self.logits(x, train, masks, rates, example_mask, start, stop)


class MLP(Net):
    """Fully-connected classifier returning logits (B, num_classes).

    Inputs (B, *feature_shape) are flattened. Hidden layers are ``layer_{i}`` (with
    ``bn_{i}`` after them when ``batch_norm``); the last layer is ``output``.
    """

    hidden: Sequence[int] = (500, 500)
    num_classes: int = 10
    activation: str = "relu"
    maxout_pieces: int = 2
    weight_init: str = "xavier_uniform"
    batch_norm: bool = False
    dropout_convention: str = "inverted"

    @nn.compact
    def logits(self, x, train, masks, rates, example_mask, start, stop) -> jax.Array:
        """``Net.__call__``'s work (its arguments, in order)."""
        h = x.reshape((x.shape[0], -1)) if not start else x
        return _dense_head(
            self, h, self.hidden, train, masks, rates, example_mask, start or 0, stop
        )


class CNN(Net):
    """conv → activation → pool blocks, then dense layers; returns logits (B, num_classes).

    Inputs are (B, H, W, C) or flattened (B, H·W·C), reshaped to ``image_shape``.
    Convolutions use SAME padding; each block halves H and W with 2×2 pooling.
    """

    features: Sequence[int] = (32, 64)
    kernel_size: int = 5
    dense: Sequence[int] = (512,)
    num_classes: int = 10
    activation: str = "relu"
    maxout_pieces: int = 2
    weight_init: str = "xavier_uniform"
    batch_norm: bool = False
    pool: str = "max"
    image_shape: tuple[int, int, int] = (28, 28, 1)
    dropout_convention: str = "inverted"
    conv_impl: str = "auto"  # see ``Conv``

    @nn.compact
    def logits(self, x, train, masks, rates, example_mask, start, stop) -> jax.Array:
        """``Net.__call__``'s work; masked layer 0 is the flattened conv output, so
        ``start=0`` takes ``x`` to be those features and skips the convolutions."""
        if start is not None:
            return _dense_head(self, x, self.dense, train, masks, rates, example_mask, start, stop)
        kernel_init = inits.unit_initializer(self.weight_init)
        pieces = self.maxout_pieces if self.activation == "maxout" else 1
        pool = nn.max_pool if self.pool == "max" else nn.avg_pool
        h = x.reshape((x.shape[0], *self.image_shape))
        for i, f in enumerate(self.features):
            h = Conv(f * pieces, self.kernel_size, kernel_init, self.conv_impl, name=f"conv_{i}")(h)
            if self.batch_norm:
                h = _batch_norm(h, train, example_mask, f"conv_bn_{i}")
            h = activate(self.activation, h, pieces)
            self.sow("intermediates", f"act_conv_{i}", h)
            h = pool(h, (2, 2), strides=(2, 2))
        h = h.reshape((h.shape[0], -1))
        return _dense_head(self, h, self.dense, train, masks, rates, example_mask, 0, stop)


CONV_IMPLS = ("auto", "xla", "patches")


class Conv(nn.Module):
    """A stride-1 SAME convolution with a (k, k, C_in, C_out) ``kernel`` and a bias, as
    ``nn.Conv``, computed one of two ways (``impl``):

    - ``"xla"``: ``lax.conv_general_dilated`` (cuDNN on a GPU);
    - ``"patches"``: the k² shifted copies of the padded input side by side, then one
      matmul with the kernel as a (k²·C_in, C_out) matrix. Its gradients are slices,
      pads and matmuls. XLA's CPU backend runs a convolution's weight gradient inside a
      loop (the epoch's ``lax.scan``) about 10× slower than outside one; this form does
      not have that problem (measured: 1,040 vs 82 images/s for the default CNN).
    - ``"auto"``: ``"xla"`` in a direct ``apply``; jaxdl's compiled programs on a CPU
      backend take ``"patches"`` (``jaxdl.lowering``). Both compute the same function.
    """

    features: int
    kernel_size: int
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: (B, H, W, C_in) -> (B, H, W, features)."""
        k, c = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, k, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return self.convolve(x, kernel, bias)

    def convolve(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        """The convolution on explicit parameters (the method a lowering may replace)."""
        return (conv_patches if self.impl == "patches" else conv_xla)(x, kernel, bias)


def conv_xla(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """SAME stride-1 convolution (B, H, W, C_in) * (k, k, C_in, C_out) + (C_out,) by XLA."""
    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dims) + bias


def conv_patches(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``conv_xla``'s function as shifted copies side by side and one matmul (see ``Conv``)."""
    k, c, features = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    lo = (k - 1) // 2  # SAME: as lax pads, the extra row/column (even k) goes after
    pad = ((0, 0), (lo, k - 1 - lo), (lo, k - 1 - lo), (0, 0))
    xp = jnp.pad(x, pad)
    h, w = x.shape[1], x.shape[2]
    # feature order (di, dj, c) matches the kernel's row-major (k, k, C_in) flattening
    patches = jnp.concatenate(
        [xp[:, i : i + h, j : j + w, :] for i in range(k) for j in range(k)], axis=-1
    )
    return patches @ kernel.reshape(k * k * c, features) + bias


class Dense(nn.Module):
    """A dense layer, its activation and optionally dropout on its output:
    ``drop(act(x @ kernel + bias))``: (B, I) -> (B, features). The parameters are
    ``nn.Dense``'s (``kernel`` (I, features·pieces), ``bias`` zeros), initialised alike."""

    features: int
    kernel_init: nn.initializers.Initializer
    activation: str = "linear"
    pieces: int = 1  # maxout's pieces per unit

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, div=None) -> jax.Array:
        """``mask`` (B, features), ``div``: dropout on the output, ``act(...) · mask / div``."""
        n = self.features * self.pieces
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], n))
        bias = self.param("bias", nn.initializers.zeros_init(), (n,))
        return self.forward(x, kernel, bias, mask, div)

    def forward(self, x, kernel, bias, mask=None, div=None) -> jax.Array:
        """The layer on explicit parameters (the method a lowering may replace)."""
        return dense_forward(x, kernel, bias, self.activation, self.pieces, mask, div)


def dense_forward(
    x, kernel, bias, activation: str, pieces: int, mask=None, div=None, matmul=jnp.matmul
) -> jax.Array:
    """``Dense``'s function: ``activate(matmul(x, kernel) + bias)``, then ``· mask · (1/div)``
    with the mask a sample (no gradient; ``div`` gets one)."""
    h = activate(activation, matmul(x, kernel) + bias, pieces)
    if mask is None:
        return h
    # h · (1/div): how XLA:CPU divides by a broadcast scalar, as apply_dropout does.
    return h * jax.lax.stop_gradient(mask.astype(h.dtype)) * (1.0 / div)


def _dense_head(
    module, h, widths, train, masks, rates, example_mask, start=0, stop=None
) -> jax.Array:
    """From masked layer ``start`` on: dropout on ``h`` (B, features), then dense →
    [batch norm] → activation → dropout per width, then the output layer; returns early
    with the input of masked layer ``stop``. Called inside ``module``'s compact
    ``__call__``, so the layers it creates belong to ``module``."""
    m = module
    kernel_init = inits.unit_initializer(m.weight_init)
    pieces = m.maxout_pieces if m.activation == "maxout" else 1
    dropped = False  # whether h's dropout ran inside the layer that made it
    for i in range(start, len(widths) + 1):
        if i == stop:
            return h
        if not dropped:
            h = apply_dropout(h, *_dropout_at(masks, rates, i), m.dropout_convention)
        dropped = False
        if i == len(widths):
            break
        if m.batch_norm:
            h = Dense(widths[i] * pieces, kernel_init, name=f"layer_{i}")(h)
            h = _batch_norm(h, train, example_mask, f"bn_{i}")
            h = activate(m.activation, h, pieces)
        else:
            drop = _inner_dropout(m, masks, rates, i + 1, (h.shape[0], widths[i]), stop)
            h = Dense(widths[i], kernel_init, m.activation, pieces, name=f"layer_{i}")(h, *drop)
            dropped = bool(drop)
        m.sow("intermediates", f"act_layer_{i}", h)
    return Dense(m.num_classes, kernel_init, name="output")(h)


def _inner_dropout(module, masks, rates, i: int, shape: tuple[int, int], stop) -> tuple:
    """(mask, divisor) for a ``Dense`` layer to apply masked layer ``i``'s dropout to its
    output of ``shape``, as ``apply_dropout`` would, or () where it is applied apart: no
    per-example mask, an early ``stop`` there, or activations recorded (they are taken
    before dropout). A lowering can then fuse the dropout into the layer's product."""
    mask, rate = _dropout_at(masks, rates, i)
    if mask is None or rate is None or i == stop or mask.shape != shape:
        return ()
    if module.is_mutable_collection("intermediates"):
        return ()
    keep = (1.0 - rate).astype(jnp.float32)
    div = keep if module.dropout_convention == "inverted" else jnp.ones((), jnp.float32)
    return mask.astype(jnp.float32), div


def _batch_norm(h: jax.Array, train: bool, example_mask: jax.Array | None, name: str):
    # Padding examples of a partial last batch must not enter the batch statistics.
    mask = None
    if example_mask is not None and train:
        mask = example_mask.reshape((-1,) + (1,) * (h.ndim - 1))
        mask = jnp.broadcast_to(mask, h.shape)
    bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)
    return bn(h, mask=mask)


Model = MLP | CNN


def check_model(model: Model) -> Model:
    """Validates a model's static settings on the host (names, sizes)."""
    validate.choice("activation", model.activation, ACTIVATIONS)
    validate.choice("dropout convention", model.dropout_convention, CONVENTIONS)
    inits.canonical(model.weight_init)
    validate.positive_int("num_classes", model.num_classes)
    if model.num_classes < 2:
        validate.fail("num_classes", "at least 2 classes", model.num_classes)
    if model.activation == "maxout":
        validate.positive_int("maxout pieces", model.maxout_pieces)
    widths = model.hidden if isinstance(model, MLP) else (*model.features, *model.dense)
    for w in widths:
        validate.positive_int("layer width", w)
    if isinstance(model, CNN):
        if not model.features:
            validate.fail("CNN features", "at least one conv block, e.g. (32, 64)", model.features)
        validate.choice("pool", model.pool, ("max", "avg"))
        validate.positive_int("kernel size", model.kernel_size)
        validate.choice("conv impl", model.conv_impl, CONV_IMPLS)
    return model


def check_features(model: Model, shape: Sequence) -> None:
    """A CNN's inputs ``shape`` (N, ...) must hold its ``image_shape`` (images or flat)."""
    if isinstance(model, CNN) and math.prod(shape[1:]) != math.prod(model.image_shape):
        size = math.prod(model.image_shape)
        got = "(" + ", ".join(map(str, shape)) + ")"
        raise validate.InputError(f"train x shape: expected images of the CNN's image_shape "
                                  f"{model.image_shape} (N, H, W, C), or flat (N, {size}), got "
                                  f"{got}")  # fmt: skip


def masked_widths(model: Model, feature_shape: Sequence[int]) -> tuple[int, ...]:
    """Widths of the dropout-masked layers: first dense input, then each hidden layer."""
    if isinstance(model, MLP):
        return (math.prod(feature_shape), *model.hidden)
    h, w, _ = model.image_shape
    for _ in model.features:
        h, w = h // 2, w // 2
    return (h * w * model.features[-1], *model.dense)


def bernoulli(key: jax.Array, p: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Float32 0/1 array of ``shape``, each 1 with probability ``p``."""
    return jax.random.bernoulli(key, p, shape).astype(jnp.float32)


def sample_masks(
    key: jax.Array,
    rates: jax.Array,
    widths: Sequence[int],
    batch: int | None = None,
    *,
    draw: Callable[[jax.Array, jax.Array, tuple[int, ...]], jax.Array] = bernoulli,
) -> Masks:
    """Draws keep-masks: unit j of layer i is kept with probability 1 - rates[i].

    Returns one float32 0/1 array per masked layer, (batch, widths[i]), or (widths[i],)
    when ``batch`` is None (one subnetwork shared by all examples). The draws are
    ``jax.random.bernoulli``'s; ``draw`` (``bernoulli``'s signature) may give the same bits
    another way (a lowering's kernel).
    """
    keys = jax.random.split(key, len(widths))
    lead = () if batch is None else (batch,)
    return tuple(draw(k, 1.0 - r, (*lead, w)) for k, r, w in zip(keys, rates, widths, strict=True))
