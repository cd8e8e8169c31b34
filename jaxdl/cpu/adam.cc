// Adam's (and AdamW's) update of one float32 parameter array in one loop: read p, g, m,
// v; write p, m, v. XLA:CPU runs the same update as three fusions per array (ten passes
// over memory where this loop makes seven), so the loop takes about half the time
// (benchmarks/README.md). jaxdl.fused compiles this file with the host's C++ compiler
// and the jaxlib headers and registers it as the FFI target "jaxdl_adam".
//
// Built with -ffp-contract=off, so the three fmas below are the only contractions; they
// sit where XLA:CPU contracts Optax's expression, and the multiplications by r1 and r2
// are XLA's own rewrite of Optax's division by the bias corrections. For a program with
// one parameter array the loop then matches Optax bit for bit.
//
// s holds K rows of 10 float32 scalars, one row per member when the call is vmapped
// (the arrays then hold K members one after another):
//   1-b1, b1, 1-b2, b2, r1 = 1/(1-b1^t), r2 = 1/(1-b2^t), eps_root, eps, -lr, wd
// with wd the decoupled weight decay (0: plain Adam; fma(0, p, u) == u exactly).
// Any further operands are not read: they only order the call after the operations that
// produce them (jaxdl.fused passes every gradient, so that the in-place update of a kernel
// follows the backward GEMM that reads it and XLA need not copy the kernel).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <memory>
#include <thread>

#include "team.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Elements per task: big enough to amortise a hand-off, small enough that an array of the
// default MLP splits over the cores. A result never depends on how the work is split.
constexpr size_t kChunk = 1 << 15;

struct Work {
  const float *p, *g, *m, *v, *s;
  float *po, *mo, *vo;
  size_t n, chunks_per_row, chunks;
  std::atomic<size_t> next{0}, done{0};
};

void Run(Work& w, size_t c) {
  const size_t k = c / w.chunks_per_row, lo = (c % w.chunks_per_row) * kChunk;
  const size_t hi = lo + kChunk < w.n ? lo + kChunk : w.n, o = k * w.n;
  const float* S = w.s + 10 * k;
  const float ob1 = S[0], b1 = S[1], ob2 = S[2], b2 = S[3], r1 = S[4], r2 = S[5];
  const float er = S[6], eps = S[7], step = S[8], wd = S[9];
  const float* __restrict P = w.p + o;
  const float* __restrict G = w.g + o;
  const float* __restrict M = w.m + o;
  const float* __restrict V = w.v + o;
  float* PO = w.po + o;
  float* MO = w.mo + o;
  float* VO = w.vo + o;
#pragma omp simd
  for (size_t i = lo; i < hi; ++i) {
    const float gi = G[i], pi = P[i];
    const float mi = std::fma(ob1, gi, b1 * M[i]);
    const float vi = std::fma(b2, V[i], ob2 * (gi * gi));
    const float u = (mi * r1) / (std::sqrt(vi * r2 + er) + eps);
    MO[i] = mi;
    VO[i] = vi;
    PO[i] = std::fma(step, std::fma(wd, pi, u), pi);
  }
}

}  // namespace

static ffi::Error AdamImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p,
                           ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> m,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> s,
                           ffi::RemainingArgs /*after*/, ffi::ResultBuffer<ffi::F32> po,
                           ffi::ResultBuffer<ffi::F32> mo, ffi::ResultBuffer<ffi::F32> vo) {
  const size_t total = p.element_count(), rows = s.element_count() / 10;
  if (rows == 0 || s.element_count() % 10 != 0 || total % rows != 0 ||
      g.element_count() != total || m.element_count() != total || v.element_count() != total) {
    return ffi::Error::InvalidArgument("jaxdl_adam: mismatched buffer sizes");
  }
  if (total == 0) return ffi::Error::Success();
  auto w = std::make_shared<Work>();
  w->p = p.typed_data(), w->g = g.typed_data(), w->m = m.typed_data(), w->v = v.typed_data();
  w->s = s.typed_data(), w->po = po->typed_data(), w->mo = mo->typed_data();
  w->vo = vo->typed_data(), w->n = total / rows;
  w->chunks_per_row = (w->n + kChunk - 1) / kChunk;
  w->chunks = rows * w->chunks_per_row;
  const size_t helpers = std::min<size_t>(static_cast<size_t>(pool.num_threads()), w->chunks - 1);
  constexpr auto drain = jaxdl_team::DrainUnits<Work, Run, &Work::chunks>;
  jaxdl_team::Run<Work, drain, &Work::chunks>(pool, w, helpers, false);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdlAdam, AdamImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
