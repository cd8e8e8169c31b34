// Adam's update for one parameter array in one pass: read p, g, m, v; write p, m, v
// (seven passes over the array, where XLA:CPU's three fusions per parameter make ten).
// An XLA FFI handler for benchmarks/bench_adam_update.py, which compiles this file with
// the host's C++ compiler and the jaxlib headers. Same formulas and operation order as
// optax.scale_by_adam followed by the learning rate and optax.apply_updates. Compiled
// without FMA contraction (-ffp-contract=off), so the fmas below are the only ones.
#include <cmath>
#include <cstddef>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
// s: 1-b1, b1, 1-b2, b2, r1 = 1/(1-b1^t), r2 = 1/(1-b2^t), eps_root, eps, step = -lr
// (float32). For a program with one parameter array, XLA rewrites Optax's division by
// each bias correction as a multiplication by its reciprocal and contracts the three
// multiply-adds written below as fmas; this loop then matches it bit for bit. With
// several arrays XLA rewrites the expression differently (benchmarks/README.md), and
// the script counts the elements that differ.
static ffi::Error AdamImpl(ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> m,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> s,
                           ffi::ResultBuffer<ffi::F32> po, ffi::ResultBuffer<ffi::F32> mo,
                           ffi::ResultBuffer<ffi::F32> vo) {
  const size_t n = p.element_count();
  const float* S = s.typed_data();
  const float ob1 = S[0], b1 = S[1], ob2 = S[2], b2 = S[3], r1 = S[4], r2 = S[5], er = S[6], eps = S[7], step = S[8];
  const float* __restrict P = p.typed_data(); const float* __restrict G = g.typed_data();
  const float* __restrict M = m.typed_data(); const float* __restrict V = v.typed_data();
  float* PO = po->typed_data(); float* MO = mo->typed_data(); float* VO = vo->typed_data();
#pragma omp simd
  for (size_t i = 0; i < n; ++i) {
    const float gi = G[i];
    const float mi = std::fma(ob1, gi, b1 * M[i]);
    const float vi = std::fma(b2, V[i], ob2 * (gi * gi));
    const float u = (mi * r1) / (std::sqrt(vi * r2 + er) + eps);
    MO[i] = mi; VO[i] = vi; PO[i] = std::fma(step, u, P[i]);
  }
  return ffi::Error::Success();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedAdam, AdamImpl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
