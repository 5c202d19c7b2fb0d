// Matmuls on GGUF-quantized weights kept in their blocks (llama.cpp's ggml layouts: Q4_0, Q5_0, Q8_0, Q4_K, Q5_K,
// Q6_K), for x86 CPUs with AVX2 and, where the CPU has it, AVX-512 (chosen at run time: `set_isa`).
//
// A weight row is read one chunk of up to 256 values at a time: its bytes are unpacked into int8 codes with one
// scale and one offset per 16 values (w = scale * q - offset, the same real numbers ggml's and the `gguf` package's
// dequantizers give; Q8_0's codes are read in place), and each group of 16 codes is widened to fp32 in registers
// and multiplied into the rows of x with fp32 accumulation. No dequantized copy of the weights exists: a decode
// step reads the file's bytes (~4.5-8.5 bits per weight instead of bf16's 16).
//
// Few rows of x (decode): each weight row is streamed once and dequantized in registers against every row of x.
// Many rows: a few weight rows are dequantized into an fp32 block in L1/L2 and multiplied as 4 x C register tiles.
//
// The vector code is written once and compiled twice, for AVX2 (namespace avx2) and for AVX-512 (namespace avx512,
// under `#pragma GCC target`), by including this file into itself with QUANT_PASS set: the AVX-512 instructions
// live only in functions that run where the CPU reports AVX-512F/BW.
#ifndef QUANT_PASS

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16_common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace gemma_quant {

using gemma_cpu::Out;
using gemma_cpu::pull_chunks;
using gemma_cpu::to_bf16;
using gemma_cpu::widen;

// ggml type ids (gguf.GGMLQuantizationType)
enum QType : int64_t { Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

struct Format {
  int64_t block;  // values per block
  int64_t bytes;  // bytes per block
};

inline Format format_of(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return {32, 18};
    case Q5_0: return {32, 22};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
  }
  TORCH_CHECK(false, "quantized matmul: unsupported ggml type ", qtype, " (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K)");
  return {0, 0};
}

inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Up to 256 values of a weight row: group g (16 values) is scale[g] * q[g][i] - offset[g].
struct Chunk {
  const int8_t* q[16];
  float scale[16];
  float offset[16];
  int groups;
  alignas(64) int8_t codes[256];
};

// ggml's get_scale_min_k4: the 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block
inline void scale_min_k4(int j, const uint8_t* s, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Unpack the chunk of `row` that starts at value `k0` (a multiple of 256; the row's length K a multiple of the
// block) into `c`. The bit layouts are ggml's (ggml-quants.c, dequantize_row_*), which the `gguf` package follows.
inline void unpack(int64_t qtype, const uint8_t* row, int64_t k0, int64_t K, Chunk& c) {
  const int64_t n = std::min<int64_t>(256, K - k0);
  c.groups = int(n / 16);
  switch (qtype) {
    case Q8_0: {  // d, qs[32]: codes read in place
      const uint8_t* b = row + k0 / 32 * 34;
      for (int i = 0; i < n / 32; ++i, b += 34) {
        const float d = half(b);
        for (int h = 0; h < 2; ++h) {
          c.q[2 * i + h] = reinterpret_cast<const int8_t*>(b + 2 + 16 * h);
          c.scale[2 * i + h] = d;
          c.offset[2 * i + h] = 0.f;
        }
      }
      return;
    }
    case Q4_0: {  // d, qs[16]: value j is the low nibble of qs[j], value 16 + j its high one, minus 8
      const uint8_t* b = row + k0 / 32 * 18;
      for (int i = 0; i < n / 32; ++i, b += 18) {
        const float d = half(b);
        int8_t* o = c.codes + 32 * i;
        for (int j = 0; j < 16; ++j) {
          o[j] = int8_t((b[2 + j] & 0xF) - 8);
          o[16 + j] = int8_t((b[2 + j] >> 4) - 8);
        }
        for (int h = 0; h < 2; ++h) c.scale[2 * i + h] = d, c.offset[2 * i + h] = 0.f;
      }
      break;
    }
    case Q5_0: {  // d, qh (32 bits: the fifth bit of value j), qs[16] as Q4_0, minus 16
      const uint8_t* b = row + k0 / 32 * 22;
      for (int i = 0; i < n / 32; ++i, b += 22) {
        const float d = half(b);
        uint32_t qh;
        std::memcpy(&qh, b + 2, 4);
        int8_t* o = c.codes + 32 * i;
        for (int j = 0; j < 16; ++j) {
          o[j] = int8_t(((b[6 + j] & 0xF) | (((qh >> j) & 1) << 4)) - 16);
          o[16 + j] = int8_t(((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
        }
        for (int h = 0; h < 2; ++h) c.scale[2 * i + h] = d, c.offset[2 * i + h] = 0.f;
      }
      break;
    }
    case Q4_K:
    case Q5_K: {  // d, dmin, scales[12], (Q5_K: qh[32]), qs[128]: 8 sub-blocks of 32, d*sc*q - dmin*m
      const bool five = qtype == Q5_K;
      const uint8_t* b = row + k0 / 256 * (five ? 176 : 144);
      const float d = half(b), dmin = half(b + 2);
      const uint8_t* scales = b + 4;
      const uint8_t* qh = b + 16;
      const uint8_t* qs = b + (five ? 48 : 16);
      for (int j = 0; j < 4; ++j) {  // 64 values: sub-block 2j from the low nibbles, 2j + 1 from the high ones
        for (int h = 0; h < 2; ++h) {
          int sc, m;
          scale_min_k4(2 * j + h, scales, &sc, &m);
          c.scale[4 * j + 2 * h] = c.scale[4 * j + 2 * h + 1] = d * float(sc);
          c.offset[4 * j + 2 * h] = c.offset[4 * j + 2 * h + 1] = dmin * float(m);
        }
        int8_t* o = c.codes + 64 * j;
        const uint8_t* q = qs + 32 * j;
        for (int l = 0; l < 32; ++l) {
          int lo = q[l] & 0xF, hi = q[l] >> 4;
          if (five) {
            lo |= ((qh[l] >> (2 * j)) & 1) << 4;
            hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
          }
          o[l] = int8_t(lo);
          o[32 + l] = int8_t(hi);
        }
      }
      break;
    }
    case Q6_K: {  // ql[128], qh[64], scales[16] (int8), d: 16 groups of 16, d*sc[g]*(q - 32)
      const uint8_t* b = row + k0 / 256 * 210;
      const float d = half(b + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      for (int g = 0; g < 16; ++g) c.scale[g] = d * float(sc[g]), c.offset[g] = 0.f;
      for (int half128 = 0; half128 < 2; ++half128) {
        const uint8_t* ql = b + 64 * half128;
        const uint8_t* qh = b + 128 + 32 * half128;
        int8_t* o = c.codes + 128 * half128;
        for (int l = 0; l < 32; ++l) {
          o[l] = int8_t(((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
          o[l + 32] = int8_t(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
          o[l + 64] = int8_t(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
          o[l + 96] = int8_t(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
      }
      break;
    }
    default:
      format_of(qtype);  // raises
  }
  for (int g = 0; g < c.groups; ++g) c.q[g] = c.codes + 16 * g;
}

// The kernels, once per instruction set: each pass defines `matmul(x, w, qtype, y, M, K, N)` and
// `dequantize(w, qtype, K, rows, dst)` in its namespace.
namespace avx2 {
#define QUANT_PASS 1
#include __FILE__
#undef QUANT_PASS
}  // namespace avx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
namespace avx512 {
#define QUANT_PASS 2
#include __FILE__
#undef QUANT_PASS
}  // namespace avx512
#pragma GCC pop_options

int g_isa = -1;  // 1: AVX2, 2: AVX-512; -1: not chosen yet (the best the CPU has)

bool has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }

int isa() {
  if (g_isa < 0) g_isa = has_avx512() ? 2 : 1;
  return g_isa;
}

}  // namespace gemma_quant

#pragma GCC pop_options

using namespace gemma_quant;

// "avx2" or "avx512": which variant the kernels run ("auto": the best this CPU has). Raises where the CPU lacks it.
std::string quant_set_isa(const std::string& name) {
  if (name == "auto") g_isa = has_avx512() ? 2 : 1;
  else if (name == "avx2") g_isa = 1;
  else if (name == "avx512") {
    TORCH_CHECK(has_avx512(), "this CPU has no AVX-512F/BW");
    g_isa = 2;
  } else TORCH_CHECK(false, "isa must be 'auto', 'avx2' or 'avx512', got ", name);
  return isa() == 2 ? "avx512" : "avx2";
}

std::string quant_isa() { return isa() == 2 ? "avx512" : "avx2"; }

static std::vector<float> as_fp32(const torch::Tensor& x, const float** p) {
  std::vector<float> buf;
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) {
    *p = x.data_ptr<float>();
    return buf;
  }
  auto xf = x.to(at::kFloat).contiguous();
  buf.resize(xf.numel());
  std::memcpy(buf.data(), xf.data_ptr<float>(), buf.size() * sizeof(float));
  *p = buf.data();
  return buf;
}

static void check_weight(const torch::Tensor& w, int64_t qtype, int64_t K) {
  const Format f = format_of(qtype);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.stride(1) == 1, "w: 2-D uint8 rows of blocks");
  TORCH_CHECK(K % f.block == 0 && w.size(1) == K / f.block * f.bytes, "w: rows of ", K / f.block, " blocks of ",
              f.bytes, " bytes for K = ", K, " (a multiple of ", f.block, ")");
}

// x (M, K) fp32 or bf16, w (N, row bytes) uint8 of ggml type `qtype` -> x w^T (M, N), fp32 accumulation, in x's
// dtype, or written into `out` (contiguous (M, N): x's dtype, or fp32 holding the values x's dtype rounds them to).
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, c10::optional<torch::Tensor> out_opt) {
  TORCH_CHECK(x.dim() == 2, "x: (M, K)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x: bf16 or fp32");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_weight(w, qtype, K);
  auto y = out_opt.has_value() ? *out_opt : torch::empty({M, N}, x.options());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == M && y.size(1) == N && y.is_contiguous() &&
              (y.scalar_type() == x.scalar_type() || y.scalar_type() == at::kFloat),
              "out: (M, N), contiguous, x's dtype or fp32");
  if (M == 0 || N == 0) return y;
  const float* xp;
  auto keep = as_fp32(x, &xp);
  const bool fp32_out = y.scalar_type() == at::kFloat;
  const Out out{fp32_out ? y.data_ptr<float>() : nullptr,
                fp32_out ? nullptr : reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), N,
                fp32_out && x.scalar_type() == at::kBFloat16};
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t ws = w.stride(0);
  if (isa() == 2) avx512::matmul(xp, wp, ws, qtype, out, M, K, N);
  else avx2::matmul(xp, wp, ws, qtype, out, M, K, N);
  return y;
}

// w (N, row bytes) uint8 of ggml type `qtype` -> (N, K) in `dtype` (fp32 or bf16): the dequantized rows.
torch::Tensor quant_dequantize(torch::Tensor w, int64_t qtype, int64_t K, at::ScalarType dtype) {
  check_weight(w, qtype, K);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype: float32 or bfloat16");
  const int64_t N = w.size(0);
  auto y = torch::empty({N, K}, w.options().dtype(at::kFloat));
  if (N == 0) return y.to(dtype);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t ws = w.stride(0);
  float* yp = y.data_ptr<float>();
  pull_chunks(N, std::max<int64_t>(1, 4096 / (K / 256 + 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (isa() == 2) avx512::dequantize_row(wp + n * ws, qtype, K, yp + n * K);
      else avx2::dequantize_row(wp + n * ws, qtype, K, yp + n * K);
    }
  });
  return dtype == at::kFloat ? y : y.to(dtype);
}

// Rows `ids` (int64, any shape) of w, dequantized: an embedding lookup, (*ids.shape, K) in `dtype`.
torch::Tensor quant_embedding(torch::Tensor ids, torch::Tensor w, int64_t qtype, int64_t K, at::ScalarType dtype) {
  check_weight(w, qtype, K);
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids: int64");
  auto flat = ids.reshape(-1).contiguous();
  const int64_t n = flat.numel(), N = w.size(0);
  const int64_t* ip = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < N, "token id ", ip[i], " out of [0, ", N, ")");
  auto y = torch::empty({n, K}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    if (isa() == 2) avx512::dequantize_row(wp + ip[i] * w.stride(0), qtype, K, yp + i * K);
    else avx2::dequantize_row(wp + ip[i] * w.stride(0), qtype, K, yp + i * K);
  }
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(K);
  return (dtype == at::kFloat ? y : y.to(dtype)).view(shape);
}

// torch.ops.gemma_quant.*: registered with the dispatcher (this file joins the kernels extension, whose Python
// module is decode_ops.cpp's)
TORCH_LIBRARY(gemma_quant, m) {
  m.def("linear", &quant_linear);
  m.def("dequantize", &quant_dequantize);
  m.def("embedding", &quant_embedding);
  m.def("set_isa", &quant_set_isa);
  m.def("isa", &quant_isa);
}

#else  // QUANT_PASS: the vector code of one instruction set

#if QUANT_PASS == 2
using V = __m512;
constexpr int W = 16;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vset(float f) { return _mm512_set1_ps(f); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vfms(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }  // a * b - c
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vcodes(const int8_t* q) {  // 16 int8 codes -> fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}
inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
#else
using V = __m256;
constexpr int W = 8;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V vset(float f) { return _mm256_set1_ps(f); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vfms(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vcodes(const int8_t* q) {  // 8 int8 codes -> fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
inline float vsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif
constexpr int P = 16 / W;  // vectors per group of 16 values

// One weight row against C rows of x (row stride K), dequantized in registers: y[m + c, n].
template <int C>
inline void row_dot(const float* x, const uint8_t* row, int64_t qtype, const Out& y, int64_t K, int64_t m,
                    int64_t n) {
  V acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = vzero();
  Chunk ch;
  for (int64_t k0 = 0; k0 < K; k0 += 256) {
    unpack(qtype, row, k0, K, ch);
    for (int g = 0; g < ch.groups; ++g) {
      const V s = vset(ch.scale[g]), o = vset(ch.offset[g]);
      const float* xg = x + m * K + k0 + 16 * g;
      for (int p = 0; p < P; ++p) {
        const V wv = vfms(vcodes(ch.q[g] + W * p), s, o);
        for (int c = 0; c < C; ++c) acc[c][g & 1] = vfma(wv, vload(xg + c * K + W * p), acc[c][g & 1]);
      }
    }
  }
  for (int c = 0; c < C; ++c) y.put(m + c, n, vsum(vadd(acc[c][0], acc[c][1])));
}

inline void dequantize_row(const uint8_t* row, int64_t qtype, int64_t K, float* dst) {
  Chunk ch;
  for (int64_t k0 = 0; k0 < K; k0 += 256) {
    unpack(qtype, row, k0, K, ch);
    for (int g = 0; g < ch.groups; ++g) {
      const V s = vset(ch.scale[g]), o = vset(ch.offset[g]);
      for (int p = 0; p < P; ++p) vstore(dst + k0 + 16 * g + W * p, vfms(vcodes(ch.q[g] + W * p), s, o));
    }
  }
}

// Four dequantized fp32 weight rows `w` (row stride K) against C rows of x: y[m + c, n + r].
template <int C>
inline void tile4(const float* x, const float* w, const Out& y, int64_t K, int64_t m, int64_t n) {
  V acc[4][C];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vzero();
  const float* x0 = x + m * K;
  for (int64_t k = 0; k < K; k += W) {
    V xv[C];
    for (int c = 0; c < C; ++c) xv[c] = vload(x0 + c * K + k);
    for (int r = 0; r < 4; ++r) {
      const V wv = vload(w + r * K + k);
      for (int c = 0; c < C; ++c) acc[r][c] = vfma(wv, xv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < C; ++c) y.put(m + c, n + r, vsum(acc[r][c]));
}

constexpr int TILE_C = W == 16 ? 4 : 3;  // rows of x per tile: 4 * C + C + 1 vector registers (32 zmm / 16 ymm)
constexpr int64_t FEW_ROWS = 4;  // below: stream each weight row once against every row of x

inline void matmul(const float* x, const uint8_t* w, int64_t ws, int64_t qtype, const Out& y, int64_t M, int64_t K,
                   int64_t N) {
  const int64_t threads = at::get_num_threads();
  if (M < FEW_ROWS) {
    pull_chunks(N, std::max<int64_t>(16, N / (8 * threads)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = w + n * ws;
        if (M == 3) row_dot<3>(x, row, qtype, y, K, 0, n);
        else if (M == 2) row_dot<2>(x, row, qtype, y, K, 0, n);
        else row_dot<1>(x, row, qtype, y, K, 0, n);
      }
    });
    return;
  }
  // many rows: blocks of weight rows dequantized once into a per-thread fp32 buffer that stays in L2
  const int64_t rows = std::max<int64_t>(4, std::min<int64_t>(64, (128 * 1024 / (4 * K)) / 4 * 4));
  std::vector<float> block(threads * rows * K);
  pull_chunks(N, rows, [&](int64_t b0, int64_t b1) {
    float* buf = block.data() + at::get_thread_num() * rows * K;
    for (int64_t n = b0; n < b1; ++n) dequantize_row(w + n * ws, qtype, K, buf + (n - b0) * K);
    const int64_t b4 = b0 + (b1 - b0) / 4 * 4;
    for (int64_t n = b0; n < b4; n += 4) {
      const float* wt = buf + (n - b0) * K;
      int64_t m = 0;
      for (; m + TILE_C <= M; m += TILE_C) tile4<TILE_C>(x, wt, y, K, m, n);
      for (; m < M; ++m) tile4<1>(x, wt, y, K, m, n);
    }
    for (int64_t n = b4; n < b1; ++n) {  // the last rows of an odd-sized chunk
      const float* wr = buf + (n - b0) * K;
      for (int64_t m = 0; m < M; ++m) {
        V acc = vzero();
        for (int64_t k = 0; k < K; k += W) acc = vfma(vload(wr + k), vload(x + m * K + k), acc);
        y.put(m, n, vsum(acc));
      }
    }
  });
}

#endif  // QUANT_PASS
