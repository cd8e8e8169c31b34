// Bernoulli draws as jax.random.bernoulli(key, p, shape) makes them with a threefry2x32
// key and jax_threefry_partitionable (JAX's default), bit for bit, as float32 0/1: element
// i (row-major) hashes the 64-bit counter i with the key, XORs the two output words,
// turns the top 23 bits into u in [0, 1) and keeps u < p.
//
// XLA:CPU runs the same hash as a loop of five rolled steps, each a pass over the whole
// array, about 5.6 ns per element on one core; this loop vectorises the twenty rounds
// across elements (benchmarks/README.md). jaxdl.bernoulli compiles this file and
// registers it as the FFI target "jaxdl_bernoulli".
//
// keys: K×2 uint32 (one key per row, K = 1 unless the call is vmapped), p: K float32,
// out: K rows of n float32, row k drawn with keys[k] and p[k].
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>

#include "team.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Elements per unit of work (a power of two, so a unit's counters share their high word).
constexpr size_t kChunk = 1 << 14;

inline uint32_t Rotl(uint32_t v, int r) { return (v << r) | (v >> (32 - r)); }

#define JAXDL_ROUND(r) x0 += x1, x1 = Rotl(x1, r), x1 ^= x0;
#define JAXDL_ROUNDS_A JAXDL_ROUND(13) JAXDL_ROUND(15) JAXDL_ROUND(26) JAXDL_ROUND(6)
#define JAXDL_ROUNDS_B JAXDL_ROUND(17) JAXDL_ROUND(29) JAXDL_ROUND(16) JAXDL_ROUND(24)

// threefry2x32 (20 rounds) of the counter (hi, lo) under (k0, k1): out[0] ^ out[1].
inline uint32_t Bits(uint32_t k0, uint32_t k1, uint32_t hi, uint32_t lo) {
  const uint32_t k2 = k0 ^ k1 ^ 0x1BD11BDAu;
  uint32_t x0 = hi + k0, x1 = lo + k1;
  JAXDL_ROUNDS_A x0 += k1, x1 += k2 + 1u;
  JAXDL_ROUNDS_B x0 += k2, x1 += k0 + 2u;
  JAXDL_ROUNDS_A x0 += k0, x1 += k1 + 3u;
  JAXDL_ROUNDS_B x0 += k1, x1 += k2 + 4u;
  JAXDL_ROUNDS_A x0 += k2, x1 += k0 + 5u;
  return x0 ^ x1;
}

struct Work {
  const uint32_t* keys;
  const float* p;
  float* out;
  size_t n, chunks_per_row, chunks;
  std::atomic<size_t> next{0}, done{0};
};

void Run(Work& w, size_t c) {
  const size_t k = c / w.chunks_per_row, lo = (c % w.chunks_per_row) * kChunk;
  const size_t hi = std::min(lo + kChunk, w.n);
  const uint32_t k0 = w.keys[2 * k], k1 = w.keys[2 * k + 1];
  const uint32_t high = static_cast<uint32_t>(static_cast<uint64_t>(lo) >> 32);
  const uint32_t base = static_cast<uint32_t>(lo);
  const float p = w.p[k];
  float* __restrict out = w.out + k * w.n;
#pragma omp simd simdlen(16)
  for (size_t i = 0; i < hi - lo; ++i) {
    const uint32_t bits = Bits(k0, k1, high, base + static_cast<uint32_t>(i));
    const uint32_t one_to_two = (bits >> 9) | 0x3F800000u;  // [1, 2) as uniform does
    float u;
    std::memcpy(&u, &one_to_two, sizeof u);
    out[lo + i] = (u - 1.0f) < p ? 1.0f : 0.0f;
  }
}

}  // namespace

static ffi::Error BernoulliImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> keys,
                                ffi::Buffer<ffi::F32> p, ffi::ResultBuffer<ffi::F32> out) {
  const size_t rows = p.element_count(), total = out->element_count();
  if (rows == 0 || keys.element_count() != 2 * rows || total % rows != 0) {
    return ffi::Error::InvalidArgument("jaxdl_bernoulli: mismatched buffer sizes");
  }
  if (total == 0) return ffi::Error::Success();
  auto w = std::make_shared<Work>();
  w->keys = keys.typed_data(), w->p = p.typed_data(), w->out = out->typed_data();
  w->n = total / rows;
  w->chunks_per_row = (w->n + kChunk - 1) / kChunk;
  w->chunks = rows * w->chunks_per_row;
  // The calling thread works too: with num_threads() - 1 helpers, one thread per core.
  const size_t threads = static_cast<size_t>(pool.num_threads());
  const size_t helpers = std::min<size_t>(threads > 0 ? threads - 1 : 0, w->chunks - 1);
  constexpr auto drain = jaxdl_team::DrainUnits<Work, Run, &Work::chunks>;
  jaxdl_team::Run<Work, drain, &Work::chunks>(pool, w, helpers, false);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdlBernoulli, BernoulliImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
