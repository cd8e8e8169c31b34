"""``models.Dense`` through the GEMM kernel, as a Flax method interceptor.

``intercept(next_fun, args, kwargs, context)`` replaces ``Dense.forward`` (called with
explicit parameters) by the same function computed by ``gemm``: a ReLU layer at least
``gemm.MIN_WIDTH`` wide as one fused call (bias, ReLU and the output's dropout inside the
kernel, forward and backward); any other layer with its product by the kernel. The
lowering installs it (``nn.intercept_methods``) only while tracing jaxdl's own programs.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp

from jaxdl import models
from jaxdl.cpu import gemm

_FORWARD = inspect.signature(models.Dense.forward)
_MATMUL = (((1,), (0,)), ((), ()))


def _matmul(x, w):
    return gemm.dot_general(x, w, _MATMUL)


def intercept(next_fun, args, kwargs, context):
    """A Flax interceptor: ``Dense.forward`` by the kernel, every other method as it is."""
    module = context.module
    if context.method_name != "forward" or not isinstance(module, models.Dense):
        return next_fun(*args, **kwargs)
    bound = _FORWARD.bind(module, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    x, kernel, bias, mask, div = a["x"], a["kernel"], a["bias"], a["mask"], a["div"]
    if module.pieces == 1 and gemm.fusable(module.activation, x, module.features):
        if mask is not None:
            mask = mask.astype(jnp.float32)
        return gemm.dense_relu(x, kernel, bias, mask, div)
    return models.dense_forward(
        x, kernel, bias, module.activation, module.pieces, mask, div, matmul=_matmul
    )
