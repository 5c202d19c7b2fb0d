// bf16 x bf16 -> bf16 matmul with fp32 accumulation for x86 CPUs that have AVX2 and FMA but no native bf16
// instructions (gemma/cpu_kernels.py says when and why it is used). Built at first use by
// torch.utils.cpp_extension with -mavx2 -mfma -fopenmp; threads are ATen's (torch.set_num_threads).
//
// y = x w^T for x (M, K), w (N, K) row-major. Every bf16 value is widened to fp32 exactly (a 16-bit shift), the
// products are summed in fp32 and the result is rounded to x's dtype once, as a bf16 GEMM with fp32 accumulation
// does; only the order of the additions differs from other implementations.
// - M < 16 (decode): bound by reading w; one weight row at a time (one sequential stream per thread), each element
//   widened as it is used, against up to four rows of x.
// - M >= 16 (prefill, big batches): bound by arithmetic; each block of w is widened once into a per-thread fp32
//   buffer that stays in L2 while every row of x passes over it, four rows of w against three of x at a time.
// Every output element is one fp32 accumulator over k in steps of 8 lanes, then the same tree of additions across the
// lanes, in both paths: a row's result does not depend on the other rows of x (batched decode equals one at a time).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> 8 fp32 (exact: bf16 is fp32's upper half)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {  // {sum a0, sum a1, sum a2, sum a3}
  __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline float hsum1(__m256 a) {  // the same additions, in the same order, as hsum4 gives each of its sums
  __m256 h = _mm256_hadd_ps(a, a);
  h = _mm256_hadd_ps(h, h);
  return _mm_cvtss_f32(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// y[m + c, n + r] for r < 4, c < C: four weight rows against C rows of x, 4*C accumulators.
// `w` points at weight row n (bf16, converted on load, or an fp32 copy of the block).
template <int C, typename W>
inline void tile4(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t m, int64_t n) {
  __m256 acc[4][C];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const W* w0 = w;
  const float* x0 = x + m * K;
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = load8(w0 + r * K + k);
    for (int c = 0; c < C; ++c) {
      __m256 xv = _mm256_loadu_ps(x0 + c * K + k);
      for (int r = 0; r < 4; ++r) acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
    }
  }
  for (int c = 0; c < C; ++c) _mm_storeu_ps(y + (m + c) * N + n, hsum4(acc[0][c], acc[1][c], acc[2][c], acc[3][c]));
}

// y[m + c, n] for c < C: one weight row against C rows of x. Reading w one row after the other (one stream) is what
// lets one-row decode reach the memory's bandwidth; four interleaved rows read ~35% slower.
template <int C>
inline void row1(const float* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t m, int64_t n) {
  __m256 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  const uint16_t* w0 = w + n * K;
  const float* x0 = x + m * K;
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv = load8(w0 + k);
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + c * K + k), acc[c]);
  }
  for (int c = 0; c < C; ++c) y[(m + c) * N + n] = hsum1(acc[c]);
}

}  // namespace

// x (M, K), w (N, K) bf16, K % 8 == 0 -> x w^T (M, N), accumulated in fp32, returned in x's dtype.
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous(), "w: contiguous 2-D bf16");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1) && w.size(1) % 8 == 0, "x: (M, K) with K % 8 == 0");
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  // blocks of weight rows small enough to stay in L2 while every row of x passes over them
  const int64_t rows = std::max<int64_t>(4, std::min<int64_t>(256, (256 * 1024 / (4 * K)) / 4 * 4));
  std::vector<float> block(M >= 16 ? at::get_num_threads() * rows * K : 0);
  at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * rows, n1 = std::min(N, n0 + rows);
      const int64_t n4 = n0 + (n1 - n0) / 4 * 4;
      if (M < 16) {  // few rows: bound by reading the weights, convert each element as it is used
        for (int64_t n = n0; n < n1; ++n) {
          int64_t m = 0;
          for (; m + 4 <= M; m += 4) row1<4>(xp, wp, yp, K, N, m, n);
          if (M - m == 3) row1<3>(xp, wp, yp, K, N, m, n);
          else if (M - m == 2) row1<2>(xp, wp, yp, K, N, m, n);
          else if (M - m == 1) row1<1>(xp, wp, yp, K, N, m, n);
        }
      } else {  // many rows: convert the block to fp32 once, then every row of x reuses it from cache
        float* buf = block.data() + at::get_thread_num() * rows * K;
        const uint16_t* src = wp + n0 * K;
        for (int64_t i = 0; i < (n4 - n0) * K; i += 8) _mm256_storeu_ps(buf + i, load8(src + i));
        int64_t m = 0;
        for (; m + 3 <= M; m += 3)
          for (int64_t n = n0; n < n4; n += 4) tile4<3>(xp, buf + (n - n0) * K, yp, K, N, m, n);
        for (; m < M; ++m)
          for (int64_t n = n0; n < n4; n += 4) tile4<1>(xp, buf + (n - n0) * K, yp, K, N, m, n);
        for (int64_t n = n4; n < n1; ++n)
          for (int64_t mm = 0; mm < M; ++mm) row1<1>(xp, wp, yp, K, N, mm, n);
      }
    }
  });
  return y.to(x.scalar_type());
}
