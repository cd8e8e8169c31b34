// A float32 matrix product C = op(A)·op(B) for the CPU, op a transpose or not, as the XLA
// FFI target "jaxdl_matmul". It runs the dense layers' three GEMMs (forward x·W, weight
// gradient xᵀ·δ, input gradient δ·Wᵀ) at training's small batch sizes, where XLA:CPU's
// GEMMs reach about half of the cores' FMA rate (benchmarks/README.md). jaxdl.gemm
// compiles this file with the host's C++ compiler (-march=native) on CPUs with AVX-512.
//
// The scheme is the usual one for GEMMs near peak: op(A) is packed into slivers of
// kMR rows ([k][row]), op(B) into panels of kNR = 32 columns ([k][col], zero-padded;
// transposed operands by 16×16 register transposes), and a kernel keeps a kMR×32 tile
// of C in 24 vector registers while it runs over a block of at most kKC values of k, so
// that the panel's block stays in the L1 cache. Work is split over XLA's thread pool,
// one thread per core (see Work).
//
// Each element of C is one sum over k in increasing order (a tile continues its sum
// from C between k blocks), so a result never depends on the tiling, the threads or
// the batch: a member of a vmapped call equals the same product alone, bit for bit.
//
// Leading dimensions are batch dimensions (vmap, unbatched operands as size 1).
//
// Three more targets serve a dense ReLU layer (jaxdl.gemm.dense_relu) with no
// elementwise pass left to XLA: "jaxdl_matmul_bias" adds the bias and takes the ReLU as a
// tile is stored; "jaxdl_matmul_gate_a" and "jaxdl_matmul_gate_b" zero δ where the
// layer's output is not > 0 as they pack it, and the latter also sums δ's columns (the
// bias gradient). "jaxdl_take_rows" copies a minibatch's rows. Helpers are shared with
// the other kernels as team.h describes.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <thread>
#include <vector>

#include "team.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMR = 12;   // rows per tile: 24 accumulators + 2 panel rows + 1 broadcast ≤ 32
constexpr int kNR = 32;   // columns per tile and panel: two 16-float vectors
constexpr int kKC = 256;  // k per block: a panel's block (32 KiB) stays in L1
// Below this many multiply-adds the product runs on the calling thread alone: a
// hand-off to another core costs more than it saves.
constexpr double kThreadedMacs = 2.0e6;

// An operand as strided element access: X(i, j) = p[i*si + j*sj].
struct View {
  const float* p;
  std::ptrdiff_t si, sj;
  float at(std::ptrdiff_t i, std::ptrdiff_t j) const { return p[i * si + j * sj]; }
};

// What a tile does after its last k block: nothing, or adds the bias (32 columns from
// `bias`) and, if `relu`, takes max(0, ·), which keeps a NaN (max returns its second
// operand when either is NaN); then, with `keep` (a dropout mask laid out as C), multiplies
// by it and by `scale`, as XLA computes (h·mask)/p: it divides by a broadcast scalar as a
// multiplication by the scalar's reciprocal.
struct Epilogue {
  const float* bias = nullptr;
  bool relu = false;
  const float* keep = nullptr;
  float scale = 1.0f;
};

template <int R>
void Kernel(int kc, const float* __restrict ap, const float* __restrict bp, float* c,
            std::ptrdiff_t ldc, int nj, bool accumulate, Epilogue e = {}) {
  const __mmask16 m0 = nj >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nj) - 1);
  const __mmask16 m1 =
      nj >= 32 ? 0xFFFF : nj <= 16 ? 0 : static_cast<__mmask16>((1u << (nj - 16)) - 1);
  __m512 c0[R], c1[R];
  if (accumulate) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      c0[r] = _mm512_maskz_loadu_ps(m0, c + r * ldc);
      c1[r] = _mm512_maskz_loadu_ps(m1, c + r * ldc + 16);
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  }
  for (int k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16);
    bp += kNR;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(ap[r]);
      c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
    }
    ap += R;
  }
  if (e.bias != nullptr) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, e.bias), b1 = _mm512_maskz_loadu_ps(m1, e.bias + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      c0[r] = _mm512_add_ps(c0[r], b0);
      c1[r] = _mm512_add_ps(c1[r], b1);
    }
  }
  if (e.relu) {
    const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      c0[r] = _mm512_max_ps(zero, c0[r]);
      c1[r] = _mm512_max_ps(zero, c1[r]);
    }
  }
  if (e.keep != nullptr) {
    const __m512 scale = _mm512_set1_ps(e.scale);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      c0[r] = _mm512_mul_ps(_mm512_mul_ps(c0[r], _mm512_maskz_loadu_ps(m0, e.keep + r * ldc)), scale);
      c1[r] = _mm512_mul_ps(_mm512_mul_ps(c1[r], _mm512_maskz_loadu_ps(m1, e.keep + r * ldc + 16)),
                            scale);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, c0[r]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, c1[r]);
  }
}

// The last rows when the row count is not a multiple of kMR.
template <int R>
void RestKernel(int rows, int kc, const float* ap, const float* bp, float* c, std::ptrdiff_t ldc,
                int nj, bool accumulate, Epilogue e) {
  if constexpr (R > 0) {
    if (rows == R) return Kernel<R>(kc, ap, bp, c, ldc, nj, accumulate, e);
    RestKernel<R - 1>(rows, kc, ap, bp, c, ldc, nj, accumulate, e);
  }
}

struct Item {  // one product of the batch
  View a, b;   // op(A) (m×k) and op(B) (k×n)
  float* c;    // m×n, row-major
  float* slivers;
  // Optional (null when unused), for the fused dense layer (see the handlers below):
  const float* bias = nullptr;   // n: added to C, before the ReLU if any
  const float* gate_a = nullptr; // as A (op(A) = A): an element of A counts where gate > 0
  const float* gate_b = nullptr; // as B (op(B) = B): likewise for B
  // With dropout, the mask laid out as the gate: an element then counts where
  // gate·mask·scale > 0 (y = relu(z)·mask·scale, so where z > 0 unless the mask is 0) and
  // packs as (element·scale)·mask, autodiff's order for (relu(z)·mask)·scale.
  const float* gate_mask = nullptr;
  float* b_sums = nullptr;       // n: the column sums of op(B) (after gating)
  const float* keep = nullptr;   // m×n as C: the forward's dropout mask (see Epilogue)
  float scale = 1.0f;            // 1/divisor: multiplies the forward's output after `keep`,
                                 // and the gated operand's counted elements as they are packed
};

// The work of one call, split into units that threads take in turn. Two ways:
// - by_rows (op(B) no larger than op(A), e.g. the weight gradient xᵀ·δ): a unit is a
//   range of rows of one product; it packs its own slivers and every panel, and writes
//   rows of C no other unit writes.
// - by panels (e.g. x·W with a large W): the slivers are packed first, one unit each,
//   then a unit is a group of consecutive panels (few unit boundaries, so few cache
//   lines of C written by two threads).
struct Work {
  int m, n, k, slivers_per_item, panels_per_item;
  bool by_rows, relu = false;
  int slivers_per_unit, panels_per_unit, units_per_item;
  std::vector<Item> items;
  size_t pack_units, units;
  std::atomic<size_t> next{0}, packed{0}, done{0};
};

// Transposes 16×16 floats in registers: afterwards r[i] holds what was column i.
inline void Transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

// What gates an element of δ (see Item::gate_mask), compared with 0; `dm` gets the dropout
// mask's elements where there is one.
inline __m512 GateValue(const Item& it, const float* gate, std::ptrdiff_t at, __mmask16 m,
                        __m512& dm) {
  const __m512 g = _mm512_maskz_loadu_ps(m, gate + at);
  if (it.gate_mask == nullptr) {
    dm = _mm512_set1_ps(1.0f);
    return g;
  }
  dm = _mm512_maskz_loadu_ps(m, it.gate_mask + at);
  return _mm512_mul_ps(_mm512_mul_ps(g, dm), _mm512_set1_ps(it.scale));
}

// A counted element of δ as the fused layer's gradient packs it: (δ·scale)·mask.
inline __m512 Dropped(const Item& it, __m512 v, __m512 dm) {
  if (it.scale != 1.0f) v = _mm512_mul_ps(v, _mm512_set1_ps(it.scale));
  return it.gate_mask == nullptr ? v : _mm512_mul_ps(v, dm);
}

// Sliver s of op(A): rows s*kMR.. as [k][row] (a short last sliver has fewer rows).
void PackSliver(const Work& w, const Item& it, int s) {
  const int i0 = s * kMR, rows = std::min(kMR, w.m - i0);
  float* d = it.slivers + static_cast<size_t>(i0) * w.k;
  if (it.a.sj != 1) {  // op(A) = Aᵀ: a row of A holds one k for consecutive rows
    for (int k = 0; k < w.k; ++k)
      for (int r = 0; r < rows; ++r) d[k * rows + r] = it.a.at(i0 + r, k);
    return;
  }
  // Rows contiguous in k: 16 k of each row are loaded and stored transposed.
  const __mmask16 rm = static_cast<__mmask16>((1u << rows) - 1);
  for (int k0 = 0; k0 < w.k; k0 += 16) {
    const int kk = std::min(16, w.k - k0);
    const __mmask16 km = static_cast<__mmask16>((1u << kk) - 1);
    __m512 r[16];
    for (int q = 0; q < 16; ++q) {
      if (q >= rows) {
        r[q] = _mm512_setzero_ps();
        continue;
      }
      const std::ptrdiff_t at = (i0 + q) * it.a.si + k0;
      __mmask16 use = km;
      __m512 mask;
      if (it.gate_a != nullptr) {  // a gated-off element packs as an exact 0
        const __m512 g = GateValue(it, it.gate_a, at, km, mask);
        use = _mm512_mask_cmp_ps_mask(km, g, _mm512_setzero_ps(), _CMP_GT_OQ);
      }
      r[q] = _mm512_maskz_loadu_ps(use, it.a.p + at);
      if (it.gate_a != nullptr) r[q] = Dropped(it, r[q], mask);
    }
    Transpose16(r);
    for (int q = 0; q < kk; ++q) _mm512_mask_storeu_ps(d + (k0 + q) * rows, rm, r[q]);
  }
}

// Panel j of op(B): columns j*kNR.. as [k][32], zero-padded.
// With `sums`, also writes the panel's column sums of op(B) to b_sums (one sum over k in
// increasing order per column).
void PackPanel(const Work& w, const Item& it, int j, float* d, bool sums = false) {
  const int j0 = j * kNR, cols = std::min(kNR, w.n - j0);
  if (it.b.sj == 1) {  // rows of op(B): two vectors each, the columns past n zeroed
    const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
    const __mmask16 m1 =
        cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
    const __m512 zero = _mm512_setzero_ps();
    __m512 s0 = zero, s1 = zero;
    for (int k = 0; k < w.k; ++k) {
      const std::ptrdiff_t at = k * it.b.si + j0;
      __mmask16 u0 = m0, u1 = m1;
      __m512 d0, d1;
      if (it.gate_b != nullptr) {
        u0 = _mm512_mask_cmp_ps_mask(m0, GateValue(it, it.gate_b, at, m0, d0), zero, _CMP_GT_OQ);
        u1 = _mm512_mask_cmp_ps_mask(m1, GateValue(it, it.gate_b, at + 16, m1, d1), zero,
                                     _CMP_GT_OQ);
      }
      __m512 v0 = _mm512_maskz_loadu_ps(u0, it.b.p + at);
      __m512 v1 = _mm512_maskz_loadu_ps(u1, it.b.p + at + 16);
      if (it.gate_b != nullptr) {
        v0 = Dropped(it, v0, d0);
        v1 = Dropped(it, v1, d1);
      }
      _mm512_store_ps(d + k * kNR, v0);
      _mm512_store_ps(d + k * kNR + 16, v1);
      if (sums) {
        s0 = _mm512_add_ps(s0, v0);
        s1 = _mm512_add_ps(s1, v1);
      }
    }
    if (sums) {
      _mm512_mask_storeu_ps(it.b_sums + j0, m0, s0);
      _mm512_mask_storeu_ps(it.b_sums + j0 + 16, m1, s1);
    }
    return;
  }
  // op(B) = Bᵀ: column j0+c of op(B) is row j0+c of B, contiguous in k. 16×16 blocks are
  // loaded as rows of B and stored transposed.
  for (int k0 = 0; k0 < w.k; k0 += 16) {
    const int kk = std::min(16, w.k - k0);
    const __mmask16 km = static_cast<__mmask16>((1u << kk) - 1);
    for (int c0 = 0; c0 < kNR; c0 += 16) {
      __m512 r[16];
      for (int c = 0; c < 16; ++c) {
        r[c] = j0 + c0 + c < j0 + cols
                   ? _mm512_maskz_loadu_ps(km, it.b.p + static_cast<std::ptrdiff_t>(j0 + c0 + c) * it.b.sj + k0)
                   : _mm512_setzero_ps();
      }
      Transpose16(r);
      for (int q = 0; q < kk; ++q) _mm512_store_ps(d + (k0 + q) * kNR + c0, r[q]);
    }
  }
}

// Rows [r0, r1) (multiples of kMR, or to m) of panel j of C.
void ComputePanel(const Work& w, const Item& it, int j, const float* panel, int r0, int r1) {
  const int j0 = j * kNR, nj = std::min(kNR, w.n - j0);
  const int blocks = (w.k + kKC - 1) / kKC, block = (w.k + blocks - 1) / blocks;  // even
  for (int k0 = 0; k0 < w.k; k0 += block) {
    const int kc = std::min(block, w.k - k0);
    for (int i0 = r0; i0 < r1; i0 += kMR) {
      const int rows = std::min(kMR, w.m - i0);
      const float* ap = it.slivers + static_cast<size_t>(i0) * w.k + static_cast<size_t>(k0) * rows;
      const float* bp = panel + static_cast<size_t>(k0) * kNR;
      float* c = it.c + static_cast<size_t>(i0) * w.n + j0;
      Epilogue e;
      if (k0 + kc == w.k) {
        e = {it.bias == nullptr ? nullptr : it.bias + j0, w.relu,
             it.keep == nullptr ? nullptr : it.keep + static_cast<size_t>(i0) * w.n + j0, it.scale};
      }
      if (rows == kMR) {
        Kernel<kMR>(kc, ap, bp, c, w.n, nj, k0 > 0, e);
      } else {
        RestKernel<kMR - 1>(rows, kc, ap, bp, c, w.n, nj, k0 > 0, e);
      }
    }
  }
}

float* PanelMemory(const Work& w) {  // this thread's, 64-byte aligned for the kernel's loads
  thread_local std::vector<float> memory;
  const size_t floats = static_cast<size_t>(w.k) * kNR + 16;
  if (memory.size() < floats) memory.resize(floats);
  float* p = memory.data();
  return p + (16 - (reinterpret_cast<uintptr_t>(p) / sizeof(float)) % 16) % 16;
}

void RunUnit(Work& w, size_t u) {
  if (u < w.pack_units) {
    PackSliver(w, w.items[u / w.slivers_per_item], static_cast<int>(u % w.slivers_per_item));
    w.packed.fetch_add(1, std::memory_order_release);
    return;
  }
  const size_t v = u - w.pack_units;
  const Item& it = w.items[v / w.units_per_item];
  const int unit = static_cast<int>(v % w.units_per_item);
  float* panel = PanelMemory(w);
  if (w.by_rows) {
    const int s0 = unit * w.slivers_per_unit;
    const int s1 = std::min(w.slivers_per_item, s0 + w.slivers_per_unit);
    for (int s = s0; s < s1; ++s) PackSliver(w, it, s);
    for (int j = 0; j < w.panels_per_item; ++j) {
      // Every unit packs every panel; the first writes the column sums.
      PackPanel(w, it, j, panel, it.b_sums != nullptr && unit == 0);
      ComputePanel(w, it, j, panel, s0 * kMR, std::min(w.m, s1 * kMR));
    }
    return;
  }
  while (w.packed.load(std::memory_order_acquire) < w.pack_units) std::this_thread::yield();
  const int p0 = unit * w.panels_per_unit;
  const int p1 = std::min(w.panels_per_item, p0 + w.panels_per_unit);
  for (int j = p0; j < p1; ++j) {
    PackPanel(w, it, j, panel, it.b_sums != nullptr);
    ComputePanel(w, it, j, panel, 0, w.m);
  }
}

// Takes units until none are left: first the slivers, then the panels (which wait until
// every sliver is packed; a sliver being packed is held by a running thread, so the wait
// ends). The calling thread alone can finish the work, so it never waits on a task that
// has not started.
void Drain(Work& w) {
  for (size_t u; (u = w.next.fetch_add(1, std::memory_order_relaxed)) < w.units;) {
    RunUnit(w, u);
    w.done.fetch_add(1, std::memory_order_release);
  }
}

// Offsets of each output batch element in an operand whose batch dimensions are those of
// the output or 1 (broadcast).
bool BatchOffsets(ffi::Span<const int64_t> out, ffi::Span<const int64_t> dims, size_t matrix,
                  std::vector<size_t>& offsets) {
  const size_t nb = out.size() - 2;
  if (dims.size() != out.size()) return false;
  size_t count = 1;
  for (size_t d = 0; d < nb; ++d) count *= out[d];
  offsets.assign(count, 0);
  for (size_t i = 0; i < count; ++i) {
    size_t rest = i, off = 0, stride = matrix;
    for (size_t d = nb; d-- > 0;) {
      const size_t idx = rest % out[d];
      rest /= out[d];
      if (dims[d] != 1 && dims[d] != out[d]) return false;
      if (dims[d] != 1) off += idx * stride;
      stride *= dims[d];
    }
    offsets[i] = off;
  }
  return true;
}

}  // namespace

// An optional operand: its data and dimensions (data null when absent).
struct Operand {
  const float* p = nullptr;
  ffi::Span<const int64_t> dims;
};

// What the fused dense layer adds to a product (jaxdl.gemm.dense_relu):
// - forward: C = relu(A·B + bias), then with dropout (keep) (C·keep)·(1/div);
// - input gradient: A gated by the layer's output (an element of δ counts where y > 0),
//   with dropout where y·mask·(1/div) > 0, each counted element times 1/div, then mask;
// - weight gradient: B gated likewise, and B's column sums (the bias gradient).
// div: a (1, 1) operand batched as C; the gradients' mask (gate_mask) is laid out as the gate.
struct Extras {
  Operand bias, gate_a, gate_b, keep, div, gate_mask;
  float* sums = nullptr;
  bool relu = false;
};

static ffi::Error Run(ffi::ThreadPool& pool, const float* a_data, ffi::Span<const int64_t> ad,
                      const float* b_data, ffi::Span<const int64_t> bd, float* out,
                      ffi::Span<const int64_t> cd, int64_t ta, int64_t tb, const Extras& x) {
  const size_t r = cd.size();
  if (r < 2 || ad.size() != r || bd.size() != r) {
    return ffi::Error::InvalidArgument("jaxdl_matmul: operands must have the output's rank");
  }
  const int64_t m = cd[r - 2], n = cd[r - 1];
  const int64_t am = ta ? ad[r - 1] : ad[r - 2], ak = ta ? ad[r - 2] : ad[r - 1];
  const int64_t bk = tb ? bd[r - 1] : bd[r - 2], bn = tb ? bd[r - 2] : bd[r - 1];
  if (am != m || bn != n || ak != bk) {
    return ffi::Error::InvalidArgument("jaxdl_matmul: mismatched matrix shapes");
  }
  const int64_t k = ak;
  std::vector<size_t> oa, ob, obias, oga, ogb, okeep, odiv, ogm;
  if (!BatchOffsets(cd, ad, m * k, oa) || !BatchOffsets(cd, bd, k * n, ob)) {
    return ffi::Error::InvalidArgument("jaxdl_matmul: mismatched batch dimensions");
  }
  // An optional operand shaped as `like` in its last two dimensions, batched as C.
  auto offsets = [&](const Operand& o, int64_t rows, int64_t cols, std::vector<size_t>& off) {
    return o.p == nullptr || (o.dims.size() == r && o.dims[r - 2] == rows &&
                              o.dims[r - 1] == cols && BatchOffsets(cd, o.dims, rows * cols, off));
  };
  if (!offsets(x.bias, 1, n, obias) || !offsets(x.gate_a, ad[r - 2], ad[r - 1], oga) ||
      !offsets(x.gate_b, bd[r - 2], bd[r - 1], ogb) || (x.gate_a.p != nullptr && ta) ||
      (x.gate_b.p != nullptr && tb) || !offsets(x.keep, m, n, okeep) ||
      !offsets(x.div, 1, 1, odiv) ||
      !offsets(x.gate_mask, x.gate_a.p != nullptr ? ad[r - 2] : bd[r - 2],
               x.gate_a.p != nullptr ? ad[r - 1] : bd[r - 1], ogm)) {
    return ffi::Error::InvalidArgument("jaxdl_matmul: mismatched bias, gate, mask or divisor");
  }
  // XLA's x / p for a broadcast scalar p: x · (1/p).
  auto scale = [&](size_t i) { return x.div.p == nullptr ? 1.0f : 1.0f / x.div.p[odiv[i]]; };
  const size_t batch = oa.size();
  if (m == 0 && x.sums != nullptr) {  // no rows of C, but op(B)'s column sums are asked
    for (size_t i = 0; i < batch; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        float sum = 0.0f;
        for (int64_t q = 0; q < k; ++q) {
          const size_t at = tb ? j * k + q : q * n + j;
          float d = b_data[ob[i] + at];
          if (x.gate_b.p != nullptr) {  // as GateValue and Dropped
            const float dm = x.gate_mask.p == nullptr ? 1.0f : x.gate_mask.p[ogm[i] + at];
            const float g = x.gate_b.p[ogb[i] + at];
            const bool on = x.gate_mask.p == nullptr ? g > 0.0f : (g * dm) * scale(i) > 0.0f;
            d = on ? d : 0.0f;
            if (scale(i) != 1.0f) d *= scale(i);
            if (x.gate_mask.p != nullptr) d *= dm;
          }
          sum += d;
        }
        x.sums[i * n + j] = sum;
      }
    }
  }
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum: C = relu(0 + bias), column sums 0
    for (size_t i = 0; i < batch; ++i) {
      for (int64_t q = 0; q < m * n; ++q) {
        const float v = x.bias.p == nullptr ? 0.0f : x.bias.p[obias[i] + q % n];
        const float y = x.relu && !(v != v) ? std::max(0.0f, v) : v;
        out[i * m * n + q] = x.keep.p == nullptr ? y : (y * x.keep.p[okeep[i] + q]) * scale(i);
      }
    }
    if (x.sums != nullptr) std::fill(x.sums, x.sums + batch * n, 0.0f);
    return ffi::Error::Success();
  }
  auto w = std::make_shared<Work>();
  w->m = static_cast<int>(m), w->n = static_cast<int>(n), w->k = static_cast<int>(k);
  w->relu = x.relu;
  w->slivers_per_item = static_cast<int>((m + kMR - 1) / kMR);
  w->panels_per_item = static_cast<int>((n + kNR - 1) / kNR);
  // The slivers live in the calling thread's memory, kept between calls: a fresh
  // allocation of this size is a fresh mapping, and faulting its pages in costs as much
  // as packing. The call returns only when every unit is done, so no helper outlives it.
  thread_local std::unique_ptr<float[]> sliver_memory;
  thread_local size_t sliver_floats = 0;
  if (sliver_floats < batch * m * k) {
    sliver_floats = batch * m * k;
    sliver_memory.reset(new float[sliver_floats]);
  }
  w->items.resize(batch);
  for (size_t i = 0; i < batch; ++i) {
    Item& it = w->items[i];
    const float* pa = a_data + oa[i];
    const float* pb = b_data + ob[i];
    it.a = ta ? View{pa, 1, m} : View{pa, k, 1};  // op(A)(i, q)
    it.b = tb ? View{pb, 1, k} : View{pb, n, 1};  // op(B)(q, j)
    it.c = out + i * m * n;
    it.slivers = sliver_memory.get() + i * m * k;
    if (x.bias.p != nullptr) it.bias = x.bias.p + obias[i];
    if (x.gate_a.p != nullptr) it.gate_a = x.gate_a.p + oga[i];
    if (x.gate_b.p != nullptr) it.gate_b = x.gate_b.p + ogb[i];
    if (x.gate_mask.p != nullptr) it.gate_mask = x.gate_mask.p + ogm[i];
    if (x.sums != nullptr) it.b_sums = x.sums + i * n;
    if (x.keep.p != nullptr) it.keep = x.keep.p + okeep[i];
    it.scale = scale(i);
  }
  const double macs = static_cast<double>(batch) * m * n * k;
  size_t threads = 1;
  // The calling thread and pool.num_threads() - 1 helpers: one thread per core (the
  // pool has one per core, and the caller is not one of them).
  if (macs >= kThreadedMacs) threads = std::max<size_t>(1, pool.num_threads());
  // About two units per thread: a late helper leaves less undone, and few boundaries.
  const size_t per_item = std::max<size_t>(1, (2 * threads + batch - 1) / batch);
  w->by_rows = n <= m;
  if (w->by_rows) {
    w->slivers_per_unit = static_cast<int>((w->slivers_per_item + per_item - 1) / per_item);
    w->units_per_item = (w->slivers_per_item + w->slivers_per_unit - 1) / w->slivers_per_unit;
    w->pack_units = 0;
  } else {
    w->panels_per_unit = static_cast<int>((w->panels_per_item + per_item - 1) / per_item);
    w->units_per_item = (w->panels_per_item + w->panels_per_unit - 1) / w->panels_per_unit;
    w->pack_units = batch * w->slivers_per_item;
  }
  w->units = w->pack_units + batch * w->units_per_item;
  const size_t helpers = std::min(threads - 1, batch * w->units_per_item - 1);
  jaxdl_team::Run<Work, Drain, &Work::units>(pool, w, helpers, true);
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;

// out[i] = x[idx[i]] for rows of F floats: a minibatch taken from the data set. XLA:CPU's
// gather copies element by element (45 µs for 100 rows of 784 in a training step, 90
// while a helper waits); this copies rows, split over the cores. Indices are read as
// jnp's x[idx] reads them: a negative one counts from the end, then any outside [0, N)
// is clamped.
namespace {

struct Rows {
  const float* x;
  const int32_t* idx;
  float* out;
  int64_t n, f, b, per_unit;
  size_t units;
  std::atomic<size_t> next{0}, done{0};
};

int64_t Row(const Rows& w, int64_t i) {
  const int64_t j = w.idx[i] < 0 ? w.idx[i] + w.n : w.idx[i];
  return std::min<int64_t>(std::max<int64_t>(j, 0), w.n - 1);
}

void DrainRows(Rows& w) {
  for (size_t u; (u = w.next.fetch_add(1, std::memory_order_relaxed)) < w.units;) {
    for (int64_t i = u * w.per_unit, e = std::min(w.b, i + w.per_unit); i < e; ++i) {
      std::memcpy(w.out + i * w.f, w.x + Row(w, i) * w.f, w.f * sizeof(float));
    }
    w.done.fetch_add(1, std::memory_order_release);
  }
}

}  // namespace

static ffi::Error TakeRowsImpl(ffi::ThreadPool pool, F32 x, ffi::Buffer<ffi::S32> idx,
                               ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || idx.dimensions().size() != 1 || od.size() != 2 ||
      od[0] != idx.dimensions()[0] || od[1] != xd[1]) {
    return ffi::Error::InvalidArgument("jaxdl_take_rows: expected x (N, F), idx (B,), out (B, F)");
  }
  auto w = std::make_shared<Rows>();
  w->x = x.typed_data(), w->idx = idx.typed_data(), w->out = out->typed_data();
  w->n = xd[0], w->f = xd[1], w->b = od[0];
  if (w->b == 0 || w->f == 0) return ffi::Error::Success();
  if (w->n == 0) return ffi::Error::InvalidArgument("jaxdl_take_rows: x has no rows");
  // Units of about 64 KiB: a hand-off costs more than copying less.
  w->per_unit = std::max<int64_t>(1, (int64_t{1} << 14) / w->f);
  w->units = static_cast<size_t>((w->b + w->per_unit - 1) / w->per_unit);
  const size_t helpers = std::min<size_t>(pool.num_threads() > 0 ? pool.num_threads() - 1 : 0,
                                          w->units - 1);
  jaxdl_team::Run<Rows, DrainRows, &Rows::units>(pool, w, helpers, true);
  return ffi::Error::Success();
}

static Operand Of(const F32& buffer) { return {buffer.typed_data(), buffer.dimensions()}; }

// The optional trailing operands (dropout's mask and divisor) into `into`, in order; false
// if one is not float32.
static bool Trailing(const ffi::RemainingArgs& rest, std::initializer_list<Operand*> into) {
  if (rest.size() > into.size()) return false;
  size_t i = 0;
  for (Operand* o : into) {
    if (i == rest.size()) break;
    auto buffer = rest.get<F32>(i++);
    if (!buffer.has_value()) return false;
    *o = Of(*buffer);
  }
  return true;
}

// C = op(A)·op(B).
static ffi::Error MatmulImpl(ffi::ThreadPool pool, F32 a, F32 b, ffi::ResultBuffer<ffi::F32> c,
                             int64_t ta, int64_t tb) {
  return Run(pool, a.typed_data(), a.dimensions(), b.typed_data(), b.dimensions(),
             c->typed_data(), c->dimensions(), ta, tb, {});
}

// C = op(A)·op(B) + bias, then max(0, ·) if relu: the dense layer's forward. Optional
// trailing operands: a dropout mask shaped as C and its divisor (1, 1): C = (C·mask)/div,
// as XLA divides by a broadcast scalar: C·mask·(1/div).
static ffi::Error MatmulBiasImpl(ffi::ThreadPool pool, F32 a, F32 b, F32 bias,
                                 ffi::RemainingArgs rest, ffi::ResultBuffer<ffi::F32> c,
                                 int64_t ta, int64_t tb, int64_t relu) {
  Extras x;
  x.bias = Of(bias);
  x.relu = relu != 0;
  if (!Trailing(rest, {&x.keep, &x.div}) || (x.keep.p == nullptr) != (x.div.p == nullptr)) {
    return ffi::Error::InvalidArgument("jaxdl_matmul_bias: expected a float32 mask and divisor");
  }
  return Run(pool, a.typed_data(), a.dimensions(), b.typed_data(), b.dimensions(),
             c->typed_data(), c->dimensions(), ta, tb, x);
}

// C = (A gated by G)·op(B): the input gradient δ·Wᵀ of a ReLU layer, δ counted where the
// layer's output G > 0; with the optional trailing dropout mask (as G) and divisor d (1, 1),
// as Item::gate_mask says.
static ffi::Error MatmulGateAImpl(ffi::ThreadPool pool, F32 a, F32 b, F32 gate,
                                  ffi::RemainingArgs rest, ffi::ResultBuffer<ffi::F32> c,
                                  int64_t tb) {
  Extras x;
  x.gate_a = Of(gate);
  if (!Trailing(rest, {&x.gate_mask, &x.div}) || (x.gate_mask.p == nullptr) != (x.div.p == nullptr)) {
    return ffi::Error::InvalidArgument("jaxdl_matmul_gate_a: expected a float32 mask and divisor");
  }
  return Run(pool, a.typed_data(), a.dimensions(), b.typed_data(), b.dimensions(),
             c->typed_data(), c->dimensions(), 0, tb, x);
}

// C = op(A)·(B gated by G) and the column sums of gated B: a ReLU layer's weight
// gradient xᵀ·δ and bias gradient Σδ (δ masked and divided as in the input gradient).
static ffi::Error MatmulGateBImpl(ffi::ThreadPool pool, F32 a, F32 b, F32 gate,
                                  ffi::RemainingArgs rest, ffi::ResultBuffer<ffi::F32> c,
                                  ffi::ResultBuffer<ffi::F32> sums, int64_t ta) {
  Extras x;
  x.gate_b = Of(gate);
  if (!Trailing(rest, {&x.gate_mask, &x.div}) || (x.gate_mask.p == nullptr) != (x.div.p == nullptr)) {
    return ffi::Error::InvalidArgument("jaxdl_matmul_gate_b: expected a float32 mask and divisor");
  }
  x.sums = sums->typed_data();
  const auto sd = sums->dimensions(), cd = c->dimensions();
  if (sd.size() != cd.size() || sd[sd.size() - 2] != 1 || sd[sd.size() - 1] != cd[cd.size() - 1]) {
    return ffi::Error::InvalidArgument("jaxdl_matmul: the column sums must be (..., 1, n)");
  }
  return Run(pool, a.typed_data(), a.dimensions(), b.typed_data(), b.dimensions(),
             c->typed_data(), cd, ta, 0, x);
}

// The bindings' common start: the pool, then A and B.
static auto Matrices() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdlMatmul, MatmulImpl,
                              Matrices().Ret<F32>().Attr<int64_t>("ta").Attr<int64_t>("tb"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdlMatmulBias, MatmulBiasImpl,
                              Matrices()
                                  .Arg<F32>()
                                  .RemainingArgs()
                                  .Ret<F32>()
                                  .Attr<int64_t>("ta")
                                  .Attr<int64_t>("tb")
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdlMatmulGateA, MatmulGateAImpl,
                              Matrices().Arg<F32>().RemainingArgs().Ret<F32>().Attr<int64_t>("tb"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdlMatmulGateB, MatmulGateBImpl,
                              Matrices()
                                  .Arg<F32>()
                                  .RemainingArgs()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("ta"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdlTakeRows, TakeRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<F32>());
