"""The CPU kernels: an optional lowering of jaxdl's own compiled programs.

C++ sources (``gemm.cc``, ``adam.cc``, ``bernoulli.cc``, their helper threads in
``team.h``), their build (``build``) and Python bindings (``gemm``, ``adam``,
``bernoulli``), plus ``layers``: the Flax method interceptor that runs ``models.Dense``
through the GEMM kernel. Only ``jaxdl.lowering`` imports this package, once it has
resolved on the host that the kernels are wanted and can run here; a model's ``apply``
called by a user never reaches them.
"""

from __future__ import annotations

from jaxdl.cpu import adam, bernoulli, gemm


def unavailable() -> str | None:
    """Why the kernels cannot run on this host (None: they can): a CPU without AVX-512
    or a failed build. Builds and registers all of them on first use (on the host)."""
    for kernel in (gemm, adam, bernoulli):
        why = kernel.unavailable()
        if why is not None:
            return why
    return None
