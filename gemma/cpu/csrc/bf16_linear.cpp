// bf16 x bf16 -> bf16 matmul with fp32 accumulation for x86 CPUs with AVX2 and FMA, and variants for CPUs with
// AVX-512F and with AVX-512-BF16 (vdpbf16ps) chosen at run time, further down (gemma/cpu/kernels.py says when and
// why it is used).
// Built at first use by torch.utils.cpp_extension with -mavx2 -mfma -fopenmp (the AVX-512 code under
// `#pragma GCC target`, run only where __builtin_cpu_supports says so); threads are ATen's (torch.set_num_threads).
// The description below is the AVX2 variant's.
//
// y = x w^T for x (M, K), w (N, K) row-major. Every bf16 value is widened to fp32 exactly (a 16-bit shift), the
// products are summed in fp32 and the result is rounded to x's dtype once, as a bf16 GEMM with fp32 accumulation
// does; only the order of the additions differs from other implementations.
//
// The order of the additions, the same in every path: k is cut into chunks of 8 lanes; chunk c goes to partial sum
// c % 4, each partial a chain of FMAs in increasing c; then (p0 + p1) + (p2 + p3) and one tree across the lanes.
// Four independent chains hide the FMA latency (one chain capped one-row decode at ~8-10 GB/s per core), and a
// row's result does not depend on the other rows of x: batched decode equals one sequence at a time, bit for bit.
// - M < 16 (decode): bound by reading w; one weight row at a time (sequential streams of rows per thread), each chunk
//   widened once and used against up to three rows of x.
// - M >= 16 (prefill, big batches): bound by arithmetic; each block of w is widened once into a per-thread fp32
//   buffer in L2, then four rows of w stay in L1 while every row of x passes over them, three at a time.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "bf16_common.h"

namespace {

using gemma_cpu::Out;
using gemma_cpu::pull_chunks;
using gemma_cpu::stream_chunks;
using gemma_cpu::to_bf16;
using gemma_cpu::widen;

// One-row decode reads each thread's chunks of w as sequential streams; the hardware prefetcher stops at every
// 4 KiB page and restarts slowly, so each 64-byte line is also prefetched 2 KiB ahead: measured on 2 AVX2 cores,
// the 262k-row LM head went from 15.1 to 12.6-13.0 ms (22 -> 26 GB/s) and a layer stack's matrices from 12.1 to
// 10.9 ms (median of 15 interleaved runs; 1 and 3 KiB ahead were no better).
constexpr int64_t kPrefetchAhead = 1024;  // bf16 elements

inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> 8 fp32 (exact: bf16 is fp32's upper half)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline float hsum1(__m256 a) {  // the tree across the lanes
  __m256 h = _mm256_hadd_ps(a, a);
  h = _mm256_hadd_ps(h, h);
  return _mm_cvtss_f32(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {  // {hsum1(a0), ..., hsum1(a3)}, same additions
  __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline __m256 combine(const __m256* p) { return _mm256_add_ps(_mm256_add_ps(p[0], p[1]), _mm256_add_ps(p[2], p[3])); }

// y[m + c, n] for c < C: one weight row (bf16) against C rows of x, four partial sums each.
template <int C>
inline void row1(const float* x, const uint16_t* w, const Out& y, int64_t K, int64_t m, int64_t n) {
  __m256 acc[C][4];
  for (int c = 0; c < C; ++c)
    for (int p = 0; p < 4; ++p) acc[c][p] = _mm256_setzero_ps();
  const uint16_t* w0 = w + n * K;
  const float* x0 = x + m * K;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch((const char*)(w0 + k + kPrefetchAhead), _MM_HINT_T0);  // past the end: harmless
    for (int p = 0; p < 4; ++p) {
      const __m256 wv = load8(w0 + k + 8 * p);
      for (int c = 0; c < C; ++c) acc[c][p] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + c * K + k + 8 * p), acc[c][p]);
    }
  }
  for (int p = 0; k < K; k += 8, ++p) {
    const __m256 wv = load8(w0 + k);
    for (int c = 0; c < C; ++c) acc[c][p] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + c * K + k), acc[c][p]);
  }
  for (int c = 0; c < C; ++c) y.put(m + c, n, hsum1(combine(acc[c])));
}

// The chunks of a row of k, reordered so that each partial's chunks are contiguous: those with c % 4 == 0 in
// increasing c, then c % 4 == 1, ... The batched path stores x and the weight blocks so, and each pass reads one
// sequential stream.
struct Passes {
  int64_t off[5];
  explicit Passes(int64_t K) {
    const int64_t C = K / 8;
    off[0] = 0;
    for (int p = 0; p < 4; ++p) off[p + 1] = off[p] + 8 * ((C - p + 3) / 4);
  }
  template <typename T>
  void reorder(const T* src, float* dst, int64_t K) const {  // one row, widened to fp32
    for (int p = 0; p < 4; ++p)
      for (int64_t k = 8 * p, o = off[p]; k < K; k += 32, o += 8) _mm256_storeu_ps(dst + o, load8(src + k));
  }
};

// y[m + c, n + r] for r < 4, c < C: four reordered fp32 weight rows `w` against C reordered rows of x, one pass
// per partial sum (4 * C accumulators), adding in the order row1 adds.
template <int C>
inline void tile4(const float* x, const float* w, const Out& y, int64_t K, const Passes& ps, int64_t m, int64_t n) {
  __m256 part[4][4][C];  // [p][r][c]
  const float* x0 = x + m * K;
  for (int p = 0; p < 4; ++p) {
    __m256 acc[4][C];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int64_t k = ps.off[p]; k < ps.off[p + 1]; k += 8) {
      // C rows of x in registers, then one weight row at a time: 4 * C + C + 1 <= 16 ymm registers, no spills
      __m256 xv[C];
      for (int c = 0; c < C; ++c) xv[c] = _mm256_loadu_ps(x0 + c * K + k);
      for (int r = 0; r < 4; ++r) {
        const __m256 wv = _mm256_loadu_ps(w + r * K + k);
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(wv, xv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < C; ++c) part[p][r][c] = acc[r][c];
  }
  for (int c = 0; c < C; ++c) {
    __m256 s[4];
    for (int r = 0; r < 4; ++r) {
      const __m256 pr[4] = {part[0][r][c], part[1][r][c], part[2][r][c], part[3][r][c]};
      s[r] = combine(pr);
    }
    float v[4];
    _mm_storeu_ps(v, hsum4(s[0], s[1], s[2], s[3]));
    for (int r = 0; r < 4; ++r) y.put(m + c, n + r, v[r]);
  }
}

void rows_of_x(const float* x, const uint16_t* w, const Out& y, int64_t M, int64_t K, int64_t n) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) row1<3>(x, w, y, K, m, n);
  if (M - m == 2) row1<2>(x, w, y, K, m, n);
  else if (M - m == 1) row1<1>(x, w, y, K, m, n);
}

// ---- the AVX-512-BF16 variant (CPUs with `avx512_bf16`: Intel Cooper Lake / Sapphire Rapids on, AMD Zen 4 on) ----
// vdpbf16ps multiplies 32 bf16 pairs and adds each pair's two products into 16 fp32 lanes: one instruction per
// 64-byte line of weights, against 4 widenings and 4 FMAs per line in the AVX2 variant. It takes x in bf16, so it
// serves bf16 x only (fp32 x takes the AVX-512F variant below, whose widening of x is exact). The products are
// exact in fp32 as before; the additions run in another order (and the instruction flushes subnormals to zero),
// so its results are not the AVX2 variant's bits. The order, the same for every row count (so a row's result still
// does not depend on the other rows of x): k is cut into chunks of 32; chunk j goes to partial j % 2 (one
// vdpbf16ps chain each, in increasing j; a last partial chunk is zero-padded), then p0 + p1 and
// _mm512_reduce_add_ps across the lanes. Every row count runs the same tile: 4 weight rows against up to 3 rows of
// x (24 accumulators), so one-row decode has 8 independent chains in flight and batches reuse each line of w
// from L1 for every row of x.
int64_t g_prefetch = 4096;  // bf16 elements (8 KiB) ahead of each weight row's position: see `bf16_set_isa`

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
namespace bf16dp {

inline __m512bh ld(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh ld_tail(const uint16_t* p, int64_t n) {  // n < 32 elements, the rest zero
  return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1u << n) - 1), p);
}

// y[m + c, n + r] for r < R, c < C: weight rows w[n + r] against x rows x[m + c] (row stride ldx), both bf16
template <int R, int C>
inline void tile(const uint16_t* x, int64_t ldx, const uint16_t* w, const Out& y, int64_t K, int64_t m, int64_t n,
                 int64_t ahead) {
  __m512 acc[R][C][2];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c][0] = acc[r][c][1] = _mm512_setzero_ps();
  const uint16_t* x0 = x + m * ldx;
  const uint16_t* w0 = w + n * K;
  auto step = [&](int64_t k, int p, bool tail) {
    __m512bh xv[C];
    for (int c = 0; c < C; ++c) xv[c] = tail ? ld_tail(x0 + c * ldx + k, K - k) : ld(x0 + c * ldx + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = tail ? ld_tail(w0 + r * K + k, K - k) : ld(w0 + r * K + k);
      for (int c = 0; c < C; ++c) acc[r][c][p] = _mm512_dpbf16_ps(acc[r][c][p], wv, xv[c]);
    }
  };
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (int r = 0; r < R; ++r) {  // past the end: harmless
      _mm_prefetch((const char*)(w0 + r * K + k + ahead), _MM_HINT_T0);
      _mm_prefetch((const char*)(w0 + r * K + k + ahead + 32), _MM_HINT_T0);
    }
    step(k, 0, false);
    step(k + 32, 1, false);
  }
  int p = 0;
  if (k + 32 <= K) step(k, p++, false), k += 32;
  if (k < K) step(k, p, true);
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) y.put(m + c, n + r, _mm512_reduce_add_ps(_mm512_add_ps(acc[r][c][0], acc[r][c][1])));
}

template <int R>
void block(const uint16_t* x, int64_t ldx, const uint16_t* w, const Out& y, int64_t M, int64_t K, int64_t n,
           int64_t ahead) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) tile<R, 3>(x, ldx, w, y, K, m, n, ahead);
  if (M - m == 2) tile<R, 2>(x, ldx, w, y, K, m, n, ahead);
  else if (M - m == 1) tile<R, 1>(x, ldx, w, y, K, m, n, ahead);
}

void matmul(const uint16_t* x, int64_t ldx, const uint16_t* w, const Out& y, int64_t M, int64_t K, int64_t N) {
  const int64_t threads = at::get_num_threads(), ahead = g_prefetch;
  const int64_t chunk = (std::max<int64_t>(16, N / (8 * threads)) + 3) / 4 * 4;
  stream_chunks(N, chunk, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) block<4>(x, ldx, w, y, M, K, n, ahead);
    if (n1 - n == 3) block<3>(x, ldx, w, y, M, K, n, ahead);
    else if (n1 - n == 2) block<2>(x, ldx, w, y, M, K, n, ahead);
    else if (n1 - n == 1) block<1>(x, ldx, w, y, M, K, n, ahead);
  });
}

}  // namespace bf16dp
#pragma GCC pop_options

// ---- the AVX-512F variant (CPUs with AVX-512 but no bf16 instructions: Intel Skylake-SP to Ice Lake) ----
// w widened to fp32 exactly (a shift), x in fp32, FMAs on 16 lanes. The order: one chain of FMAs per output over
// k in chunks of 16 (a last partial chunk zero-padded), then the two halves of the 16 lanes added and the AVX2
// variant's tree across 8 lanes (hsum1, or hsum4 for four outputs at once: the same additions). As every output
// is its own chain, the tile's shape does not change a result, so each row count takes the shape that suits it:
// 8 weight rows per tile for few rows of x (8 chains in flight for one-row decode), and for many rows (M >= 16)
// blocks of weight rows widened once into a per-thread fp32 buffer in L2, 4 rows against 6 rows of x per tile.
// It also serves fp32 x on AVX-512-BF16 CPUs.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
namespace f512 {

inline __m512 wid(const uint16_t* p, __mmask16 mask) {  // 16 bf16 -> 16 fp32, exactly (masked-off lanes zero)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
inline __m512 wid(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }  // already widened

inline __m256 halves(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

// y[m + c, yn + r] for r < R, c < C: weight rows w[n + r] (bf16, or a block already widened to fp32) against fp32
// rows x[m + c]
template <typename WT, int R, int C>
inline void tile(const float* x, const WT* w, const Out& y, int64_t K, int64_t m, int64_t n, int64_t yn,
                 int64_t ahead) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const float* x0 = x + m * K;
  const WT* w0 = w + n * K;
  auto step = [&](int64_t k, __mmask16 mask) {
    __m512 xv[C];
    for (int c = 0; c < C; ++c) xv[c] = _mm512_maskz_loadu_ps(mask, x0 + c * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = wid(w0 + r * K + k, mask);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(wv, xv[c], acc[r][c]);
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (ahead > 0)  // past the end: harmless
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w0 + r * K + k + ahead), _MM_HINT_T0);
    step(k, 0xFFFF);
    step(k + 16, 0xFFFF);
  }
  for (; k < K; k += 16) step(k, K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1));
  for (int c = 0; c < C; ++c) {
    int r = 0;
    for (; r + 4 <= R; r += 4) {
      float v[4];
      _mm_storeu_ps(v, hsum4(halves(acc[r][c]), halves(acc[r + 1][c]), halves(acc[r + 2][c]), halves(acc[r + 3][c])));
      for (int i = 0; i < 4; ++i) y.put(m + c, yn + r + i, v[i]);
    }
    for (; r < R; ++r) y.put(m + c, yn + r, hsum1(halves(acc[r][c])));
  }
}

// weight rows [n, n + R) against every row of x, C at a time
template <typename WT, int R, int C>
void block(const float* x, const WT* w, const Out& y, int64_t M, int64_t K, int64_t n, int64_t yn, int64_t ahead) {
  int64_t m = 0;
  for (; m + C <= M; m += C) tile<WT, R, C>(x, w, y, K, m, n, yn, ahead);
  if constexpr (C > 1) {
    if (M - m > 0) {
      // the rest: fewer than C rows of x, one tile of exactly that many
      if (M - m >= C - 1) block<WT, R, C - 1>(x + m * K, w, y.at_row(m), M - m, K, n, yn, ahead);
      else block<WT, R, 1>(x + m * K, w, y.at_row(m), M - m, K, n, yn, ahead);
    }
  }
}

// weight rows [n0, n1) (outputs from column yn0 on), R rows per tile, then 4, 3, 2, 1
template <typename WT, int R, int C>
void rows(const float* x, const WT* w, const Out& y, int64_t M, int64_t K, int64_t n0, int64_t n1, int64_t yn0,
          int64_t ahead) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) block<WT, R, C>(x, w, y, M, K, n, yn0 + n - n0, ahead);
  if constexpr (R > 4) {
    for (; n + 4 <= n1; n += 4) block<WT, 4, C>(x, w, y, M, K, n, yn0 + n - n0, ahead);
  }
  if (n1 - n == 3) block<WT, 3, C>(x, w, y, M, K, n, yn0 + n - n0, ahead);
  else if (n1 - n == 2) block<WT, 2, C>(x, w, y, M, K, n, yn0 + n - n0, ahead);
  else if (n1 - n == 1) block<WT, 1, C>(x, w, y, M, K, n, yn0 + n - n0, ahead);
}

// x (M, K) fp32, w (N, K) bf16
void matmul(const float* x, const uint16_t* w, const Out& y, int64_t M, int64_t K, int64_t N) {
  const int64_t threads = at::get_num_threads(), ahead = g_prefetch;
  if (M < 16) {  // bound by reading w: each weight row read once, widened in registers
    const int64_t chunk = (std::max<int64_t>(16, N / (8 * threads)) + 7) / 8 * 8;
    stream_chunks(N, chunk, [&](int64_t n0, int64_t n1) { rows<uint16_t, 8, 3>(x, w, y, M, K, n0, n1, n0, ahead); });
    return;
  }
  // bound by arithmetic: blocks of weight rows widened once, small enough to stay in L2
  const int64_t nb = std::max<int64_t>(4, std::min<int64_t>(256, (256 * 1024 / (4 * K)) / 4 * 4));
  std::vector<float> buf(threads * nb * K);
  pull_chunks(N, nb, [&](int64_t n0, int64_t n1) {
    float* b = buf.data() + at::get_thread_num() * nb * K;
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        _mm512_mask_storeu_ps(b + (n - n0) * K + k, mask, wid(w + n * K + k, mask));
      }
    // six rows of x stay in L1 while the block's rows pass over them, four at a time
    for (int64_t m = 0; m < M; m += 6) {
      const int64_t c = std::min<int64_t>(6, M - m);
      rows<float, 4, 6>(x + m * K, b, y.at_row(m), c, K, 0, n1 - n0, n0, 0);
    }
  });
}

}  // namespace f512
#pragma GCC pop_options

bool has_bf16dp() { return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw"); }
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
int best_isa() { return has_bf16dp() ? 3 : has_avx512() ? 2 : 1; }
int g_isa = -1;  // 1: AVX2, 2: AVX-512F, 3: AVX-512-BF16; -1: not chosen yet (the best the CPU has)
int isa() {
  if (g_isa < 0) g_isa = best_isa();
  return g_isa;
}
const char* isa_name() { return isa() == 3 ? "avx512_bf16" : isa() == 2 ? "avx512" : "avx2"; }

}  // namespace

// "avx2", "avx512" or "avx512_bf16": which variant the bf16 matmul runs ("auto": the best this CPU has); raises where
// the CPU lacks it. `prefetch` >= 0 sets the AVX-512 variants' prefetch distance (bf16 elements; for tuning).
std::string bf16_set_isa(const std::string& name, int64_t prefetch) {
  if (prefetch >= 0) g_prefetch = prefetch;
  if (name == "auto") g_isa = best_isa();
  else if (name == "avx2") g_isa = 1;
  else if (name == "avx512") {
    TORCH_CHECK(has_avx512(), "this CPU has no AVX-512F/BW/VL");
    g_isa = 2;
  } else if (name == "avx512_bf16") {
    TORCH_CHECK(has_bf16dp(), "this CPU has no AVX-512-BF16");
    g_isa = 3;
  } else TORCH_CHECK(false, "isa must be 'auto', 'avx2', 'avx512' or 'avx512_bf16', got ", name);
  return isa_name();
}

std::string bf16_isa() { return isa_name(); }

// x (M, K) fp32 or bf16, w (N, K) bf16, K % 8 == 0 -> x w^T (M, N), accumulated in fp32, returned in x's dtype;
// or written into `out` (M, N), contiguous: in x's dtype, or fp32 holding the values x's dtype would round them to
// (the engine's logits, written once into a buffer it reuses, with no conversion op and no fresh pages).
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> out_opt) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous(), "w: contiguous 2-D bf16");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1) && w.size(1) % 8 == 0, "x: (M, K) with K % 8 == 0");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x: bf16 or fp32");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = out_opt.has_value() ? *out_opt : torch::empty({M, N}, x.options());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == M && y.size(1) == N && y.is_contiguous() &&
              (y.scalar_type() == x.scalar_type() || y.scalar_type() == at::kFloat), "out: (M, N), contiguous, "
              "x's dtype or fp32");
  if (M == 0 || N == 0) return y;
  if (isa() == 3 && x.scalar_type() == at::kBFloat16) {  // bf16 x as it is (rows contiguous), or one copy
    const bool direct = x.stride(1) == 1;
    auto xb = direct ? x : x.contiguous();
    const bool fp32_out = y.scalar_type() == at::kFloat;
    const Out out{fp32_out ? y.data_ptr<float>() : nullptr,
                  fp32_out ? nullptr : reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), N, fp32_out};
    bf16dp::matmul(reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()), xb.stride(0),
                   reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), out, M, K, N);
    return y;
  }
  // x in fp32, widened once here rather than by an ATen op (each op costs ~10 us of dispatch on small inputs)
  std::vector<float> xbuf;
  const float* xp;
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) {
    xp = x.data_ptr<float>();
  } else {
    xbuf.resize(M * K);
    if (x.scalar_type() == at::kFloat) {
      auto xc = x.contiguous();
      std::memcpy(xbuf.data(), xc.data_ptr<float>(), M * K * sizeof(float));
    } else {
      const int64_t s0 = x.stride(0), s1 = x.stride(1);
      const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
      for (int64_t m = 0; m < M; ++m)
        if (s1 == 1) {
          for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(&xbuf[m * K + k], load8(src + m * s0 + k));
        } else {
          for (int64_t k = 0; k < K; ++k) {
            uint32_t u = uint32_t(src[m * s0 + k * s1]) << 16;
            std::memcpy(&xbuf[m * K + k], &u, 4);
          }
        }
    }
    xp = xbuf.data();
  }
  const bool fp32_out = y.scalar_type() == at::kFloat;
  const Out out{fp32_out ? y.data_ptr<float>() : nullptr,
                fp32_out ? nullptr : reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), N,
                fp32_out && x.scalar_type() == at::kBFloat16};
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  if (isa() >= 2) {
    f512::matmul(xp, wp, out, M, K, N);
    return y;
  }
  const int64_t threads = at::get_num_threads();
  if (M < 16) {  // few rows: bound by reading the weights; chunks of consecutive rows, each one sequential stream
    stream_chunks(N, std::max<int64_t>(16, N / (8 * threads)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) rows_of_x(xp, wp, out, M, K, n);
    });
    return y;
  }
  // many rows: x and blocks of weight rows (small enough to stay in L2) widened to fp32 once, chunks reordered
  const Passes ps(K);
  std::vector<float> xr(M * K);
  for (int64_t m = 0; m < M; ++m) ps.reorder(xp + m * K, xr.data() + m * K, K);
  const int64_t rows = std::max<int64_t>(4, std::min<int64_t>(256, (256 * 1024 / (4 * K)) / 4 * 4));
  std::vector<float> block(threads * rows * K);
  pull_chunks(N, rows, [&](int64_t b0, int64_t b1) {  // a chunk is one block (`rows` is a multiple of 4)
    float* buf = block.data() + at::get_thread_num() * rows * K;
    const int64_t b4 = b0 + (b1 - b0) / 4 * 4;
    for (int64_t n = b0; n < b4; ++n) ps.reorder(wp + n * K, buf + (n - b0) * K, K);
    for (int64_t n = b0; n < b4; n += 4) {
      const float* wt = buf + (n - b0) * K;
      int64_t m = 0;
      for (; m + 3 <= M; m += 3) tile4<3>(xr.data(), wt, out, K, ps, m, n);
      if (M - m == 2) tile4<2>(xr.data(), wt, out, K, ps, m, n);
      else if (M - m == 1) tile4<1>(xr.data(), wt, out, K, ps, m, n);
    }
    for (int64_t n = b4; n < b1; ++n) rows_of_x(xp, wp, out, M, K, n);
  });
  return y;
}
