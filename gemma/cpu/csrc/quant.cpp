// Matmuls on GGUF-quantized weights kept in their blocks (llama.cpp's ggml layouts: Q4_0, Q5_0, Q8_0, Q4_K, Q5_K,
// Q6_K), for x86 CPUs with AVX2 and, where the CPU has it, AVX-512 with VNNI (chosen at run time: `set_isa`).
//
// Few rows of x (decode), the weights stay in their blocks and the products are integer, as llama.cpp computes
// them: each row of x is quantized per 16 values to int8 codes with one fp32 scale (d = max|x| / 127,
// q = round(x / d); llama.cpp takes 32 or 256 values per scale: on the real 270M, 16 brought greedy agreement with
// the fp32 model from 95.3% to 96.9% of 448 tokens at no measurable cost, Intel Xeon, 2026-12-05), every weight
// block is unpacked in registers into unsigned 8-bit codes u, one scale s and one offset per 16 or 32 values
// (w = s * (u - o) - f: o an integer for Q4_0 / Q5_0 / Q6_K / Q8_0, f the K-quants' float minimum), and
//   x . w = sum over groups of 16 of d * s * (u . q) - (s * o + f) * d * (sum of q)
// with u . q summed exactly in int32 by one instruction per 32 values (vpdpbusd on AVX-512-VNNI; vpmaddubsw and
// vpmaddwd on AVX2), the scales applied in fp32. A decode step reads only the file's bytes (~4.5-8.5 bits per
// weight instead of bf16's 16) and the arithmetic stays below the memory's pace.
//
// Many rows (prefill, big batches): the arithmetic dominates, so the weights are dequantized (exactly as the `gguf`
// package dequantizes them) in chunks of rows into x's dtype and multiplied by PyTorch's matmul (oneDNN: AMX or
// AVX-512-BF16 where the CPU has them) or, for bf16 on a CPU without native bf16, the bf16 kernel
// (bf16_linear.cpp). From how many rows is measured per weight shape by gemma.cpu.fastpath (`dense_rows`).
//
// The vector code is written once and compiled twice, for AVX2 (namespace avx2) and for AVX-512 (namespace avx512,
// under `#pragma GCC target`), by including this file into itself with QUANT_PASS set: the AVX-512 instructions
// live only in functions that run where the CPU reports AVX-512F/BW/VL and VNNI.
#ifndef QUANT_PASS

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16_common.h"

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> out);  // bf16_linear.cpp

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace gemma_quant {

using gemma_cpu::Out;
using gemma_cpu::pull_chunks;

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

// Rows of x quantized per 16 values: codes q (M, K) int8; d (M, K / 4) the scale of every 4 codes (one int32 lane of
// a product: each scale 4 times); qsum (M, K / 16) = d * (sum of the 16 codes), which multiplies the weights' offsets.
struct QuantX {
  std::vector<int8_t> q;
  std::vector<float> d, qsum;
  int64_t K = 0;
};

// One block of 32 weight values, unpacked: unsigned codes u; values 0-15 are s0 * (u - O) - f0, 16-31 likewise with
// s1 and f1 (O is the type's integer offset, `Codes<QT>::O`).
struct Block {
  __m256i u;
  float s0, s1, f0, f1;
};

template <int64_t QT>
struct Codes {
  static constexpr int O = QT == Q4_0 ? 8 : QT == Q5_0 ? 16 : QT == Q6_K ? 32 : QT == Q8_0 ? 128 : 0;
  static constexpr bool split = QT == Q6_K;  // a scale per 16 values (else one per 32: s0 == s1, f0 == f1)
};

// The kernels, once per instruction set: each pass defines `matmul` and `dequantize_row` in its namespace.
namespace avx2 {
#define QUANT_PASS 1
#include __FILE__
#undef QUANT_PASS
}  // namespace avx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")
namespace avx512 {
#define QUANT_PASS 2
#include __FILE__
#undef QUANT_PASS
}  // namespace avx512
#pragma GCC pop_options

int g_isa = -1;  // 1: AVX2, 2: AVX-512 with VNNI; -1: not chosen yet (the best the CPU has)

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

int isa() {
  if (g_isa < 0) g_isa = has_avx512() ? 2 : 1;
  return g_isa;
}

// Whether PyTorch's bf16 matmul has native instructions here (oneDNN on AVX-512-BF16 or AMX): else the bf16
// kernel multiplies the dequantized chunks.
bool native_bf16() { return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16"); }

}  // namespace gemma_quant

#pragma GCC pop_options

using namespace gemma_quant;

// "avx2" or "avx512": which variant the kernels run ("auto": the best this CPU has). Raises where the CPU lacks it.
std::string quant_set_isa(const std::string& name) {
  if (name == "auto") g_isa = has_avx512() ? 2 : 1;
  else if (name == "avx2") g_isa = 1;
  else if (name == "avx512") {
    TORCH_CHECK(has_avx512(), "this CPU has no AVX-512F/BW/VL with VNNI");
    g_isa = 2;
  } else TORCH_CHECK(false, "isa must be 'auto', 'avx2' or 'avx512', got ", name);
  return isa() == 2 ? "avx512" : "avx2";
}

std::string quant_isa() { return isa() == 2 ? "avx512" : "avx2"; }

static void check_weight(const torch::Tensor& w, int64_t qtype, int64_t K) {
  const Format f = format_of(qtype);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "w: contiguous 2-D uint8 rows of "
              "blocks");
  TORCH_CHECK(K % f.block == 0 && w.size(1) == K / f.block * f.bytes, "w: rows of ", K / f.block, " blocks of ",
              f.bytes, " bytes for K = ", K, " (a multiple of ", f.block, ")");
}

static void dequantize_rows(const uint8_t* w, int64_t ws, int64_t qtype, int64_t K, int64_t N, float* yf,
                            uint16_t* yh) {
  pull_chunks(N, std::max<int64_t>(1, 4096 / (K / 256 + 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* f = yf ? yf + n * K : nullptr;
      uint16_t* h = yh ? yh + n * K : nullptr;
      if (isa() == 2) avx512::dequantize_row(w + n * ws, qtype, K, f, h);
      else avx2::dequantize_row(w + n * ws, qtype, K, f, h);
    }
  });
}

// w (N, row bytes) uint8 of ggml type `qtype` -> (N, K) in `dtype` (fp32 or bf16): the dequantized rows.
torch::Tensor quant_dequantize(torch::Tensor w, int64_t qtype, int64_t K, at::ScalarType dtype) {
  check_weight(w, qtype, K);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype: float32 or bfloat16");
  const int64_t N = w.size(0);
  auto y = torch::empty({N, K}, w.options().dtype(dtype));
  if (N == 0) return y;
  const bool f32 = dtype == at::kFloat;
  dequantize_rows(w.data_ptr<uint8_t>(), w.stride(0), qtype, K, N, f32 ? y.data_ptr<float>() : nullptr,
                  f32 ? nullptr : reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  return y;
}

// x (M, K) fp32 or bf16, w (N, row bytes) uint8 of ggml type `qtype` -> x w^T (M, N) in x's dtype, or written into
// `out` (contiguous (M, N): x's dtype, or fp32 holding the values x's dtype rounds them to). Below `dense_rows`
// rows: the integer products on int8-quantized x; from there on: w dequantized in chunks of rows, PyTorch's matmul.
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, c10::optional<torch::Tensor> out_opt,
                           int64_t dense_rows) {
  TORCH_CHECK(x.dim() == 2, "x: (M, K)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x: bf16 or fp32");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_weight(w, qtype, K);
  auto y = out_opt.has_value() ? *out_opt : torch::empty({M, N}, x.options());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == M && y.size(1) == N && y.is_contiguous() &&
              (y.scalar_type() == x.scalar_type() || y.scalar_type() == at::kFloat),
              "out: (M, N), contiguous, x's dtype or fp32");
  if (M == 0 || N == 0) return y;
  if (M >= dense_rows) {
    // chunks of ~8 MB of dequantized weights (every layer matrix of a small model is one chunk; a 262k-row LM head
    // is ~50), each multiplied by PyTorch's matmul, or the bf16 kernel where PyTorch's bf16 matmul is slow
    const int64_t rows = std::min(N, std::max<int64_t>(64, (int64_t(1) << 22) / K));
    const bool kernel = x.scalar_type() == at::kBFloat16 && !native_bf16(), f32 = x.scalar_type() == at::kFloat;
    // one buffer per thread, reused: fresh pages for every chunk cost as much as dequantizing it
    thread_local std::vector<float> scratch;
    scratch.resize(std::max<size_t>(scratch.size(), (rows * K + 1) / (f32 ? 1 : 2)));
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t n = std::min(rows, N - n0);
      auto wd = torch::from_blob(scratch.data(), {n, K}, x.options());
      dequantize_rows(w.data_ptr<uint8_t>() + n0 * w.stride(0), w.stride(0), qtype, K, n,
                      f32 ? scratch.data() : nullptr, f32 ? nullptr : reinterpret_cast<uint16_t*>(scratch.data()));
      auto yc = kernel ? linear_bf16(x, wd, c10::nullopt) : at::linear(x, wd);
      if (n0 == 0 && n == N && !out_opt.has_value()) return yc;
      y.narrow(1, n0, n).copy_(yc);
    }
    return y;
  }
  auto xc = x.stride(1) == 1 ? x : x.contiguous();
  thread_local QuantX qx;
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  if (isa() == 2) avx512::quantize_x(xc.data_ptr(), bf16, xc.stride(0), M, K, qx);
  else avx2::quantize_x(xc.data_ptr(), bf16, xc.stride(0), M, K, qx);
  const bool fp32_out = y.scalar_type() == at::kFloat;
  const Out out{fp32_out ? y.data_ptr<float>() : nullptr,
                fp32_out ? nullptr : reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), N,
                fp32_out && x.scalar_type() == at::kBFloat16};
  if (isa() == 2) avx512::matmul(qx, w.data_ptr<uint8_t>(), w.stride(0), qtype, out, M, N);
  else avx2::matmul(qx, w.data_ptr<uint8_t>(), w.stride(0), qtype, out, M, N);
  return y;
}

// Rows `ids` (int64, any shape) of w, dequantized: an embedding lookup, (*ids.shape, K) in `dtype`.
torch::Tensor quant_embedding(torch::Tensor ids, torch::Tensor w, int64_t qtype, int64_t K, at::ScalarType dtype) {
  check_weight(w, qtype, K);
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids: int64");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype: float32 or bfloat16");
  auto flat = ids.reshape(-1).contiguous();
  const int64_t n = flat.numel(), N = w.size(0);
  const int64_t* ip = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < N, "token id ", ip[i], " out of [0, ", N, ")");
  auto y = torch::empty({n, K}, w.options().dtype(dtype));
  const bool f32 = dtype == at::kFloat;
  for (int64_t i = 0; i < n; ++i) {
    float* yf = f32 ? y.data_ptr<float>() + i * K : nullptr;
    uint16_t* yh = f32 ? nullptr : reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) + i * K;
    const uint8_t* row = w.data_ptr<uint8_t>() + ip[i] * w.stride(0);
    if (isa() == 2) avx512::dequantize_row(row, qtype, K, yf, yh);
    else avx2::dequantize_row(row, qtype, K, yf, yh);
  }
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(K);
  return y.view(shape);
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

// Compiled once per instruction set (an AVX-512 function cannot be inlined into an AVX2 one), so every helper the
// kernels call lives in the pass.
constexpr int64_t kPrefetchBytes = 2048;  // ahead of the block being unpacked (the rows of a chunk are one stream)

inline __m256i nibbles(__m128i q) {  // 16 bytes -> 32 codes: the low nibbles, then the high ones
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

inline __m256i bits_to_bytes(uint32_t bits) {  // byte j = 0xFF where bit j is set, else 0
  const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303);
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)), spread);  // byte j = byte j / 8 of bits
  const __m256i others = _mm256_set1_epi64x(0x7FBFDFEFF7FBFDFE);  // every bit but bit j % 8 of byte j
  return _mm256_cmpeq_epi8(_mm256_or_si256(v, others), _mm256_set1_epi64x(-1));
}

// f(kb, Block) for every block of 32 values of `row` (K values), kb its index along the row. The bit layouts are
// ggml's (ggml-quants.c, dequantize_row_*), which the `gguf` package follows.
template <int64_t QT, typename F>
inline void blocks_of(const uint8_t* row, int64_t K, const F& f) {
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  if constexpr (QT == Q4_0 || QT == Q5_0 || QT == Q8_0) {  // one fp16 scale per 32 values
    constexpr int64_t bytes = QT == Q4_0 ? 18 : QT == Q5_0 ? 22 : 34;
    const uint8_t* b = row;
    for (int64_t kb = 0; kb < K / 32; ++kb, b += bytes) {
      _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchBytes), _MM_HINT_T0);
      const float d = half(b);
      __m256i u;
      if constexpr (QT == Q8_0) {  // d, qs[32] int8: u = q + 128
        u = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)), _mm256_set1_epi8(-128));
      } else if constexpr (QT == Q4_0) {  // d, qs[16]: value j the low nibble of qs[j], value 16 + j its high one
        u = nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)));
      } else {  // d, qh (bit j: the fifth bit of value j), qs[16] as Q4_0
        uint32_t qh;
        std::memcpy(&qh, b + 2, 4);
        u = _mm256_or_si256(nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 6))),
                            _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10)));
      }
      f(kb, Block{u, d, d, 0.f, 0.f});
    }
  } else if constexpr (QT == Q4_K || QT == Q5_K) {  // d, dmin, scales[12], (Q5_K: qh[32]), qs[128]: 8 x 32 values
    constexpr bool five = QT == Q5_K;
    const uint8_t* b = row;
    for (int64_t k0 = 0; k0 < K; k0 += 256, b += five ? 176 : 144) {
      _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchBytes + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchBytes + 128), _MM_HINT_T0);
      const float d = half(b), dmin = half(b + 2);
      const uint8_t* scales = b + 4;
      const __m256i qh = five ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)) : _mm256_setzero_si256();
      const uint8_t* qs = b + (five ? 48 : 16);
      for (int j = 0; j < 4; ++j) {  // 64 values: sub-block 2j from the low nibbles of 32 bytes, 2j + 1 the high
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * j));
        __m256i lo = _mm256_and_si256(q, lo4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), lo4);
        if constexpr (five) {  // bit 2j of qh[l] is the fifth bit of value l of sub-block 2j, bit 2j + 1 of 2j + 1
          const __m256i b0 = _mm256_set1_epi8(char(1 << (2 * j))), b1 = _mm256_set1_epi8(char(2 << (2 * j)));
          const __m256i fifth = _mm256_set1_epi8(0x10);
          lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), fifth));
          hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), fifth));
        }
        int sc, m;
        scale_min_k4(2 * j, scales, &sc, &m);
        const float s0 = d * float(sc), f0 = dmin * float(m);
        f(k0 / 32 + 2 * j, Block{lo, s0, s0, f0, f0});
        scale_min_k4(2 * j + 1, scales, &sc, &m);
        const float s1 = d * float(sc), f1 = dmin * float(m);
        f(k0 / 32 + 2 * j + 1, Block{hi, s1, s1, f1, f1});
      }
    }
  } else {  // Q6_K: ql[128], qh[64], scales[16] (int8), d: 16 x 16 values, d * sc[g] * (q - 32)
    const uint8_t* b = row;
    for (int64_t k0 = 0; k0 < K; k0 += 256, b += 210) {
      for (int p = 0; p < 4; ++p) _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchBytes + 64 * p), _MM_HINT_T0);
      const float d = half(b + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const __m256i two = _mm256_set1_epi8(0x30);  // the two high bits' place in a 6-bit code
      for (int h = 0; h < 2; ++h) {  // 128 values: ql[64h..64h+63], qh[32h..32h+31]
        const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h));
        const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
        const __m256i u[4] = {
            _mm256_or_si256(_mm256_and_si256(l0, lo4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), two)),
            _mm256_or_si256(_mm256_and_si256(l1, lo4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), two)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), lo4), _mm256_and_si256(qh, two)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), lo4),
                            _mm256_and_si256(_mm256_srli_epi16(qh, 2), two))};
        for (int j = 0; j < 4; ++j) {
          const int g = 8 * h + 2 * j;
          f(k0 / 32 + 4 * h + j, Block{u[j], d * float(sc[g]), d * float(sc[g + 1]), 0.f, 0.f});
        }
      }
    }
  }
}

// f<QT>() for the ggml type qtype (raises for one without a kernel)
template <typename F>
inline void dispatch(int64_t qtype, const F& f) {
  switch (qtype) {
    case Q4_0: return f(std::integral_constant<int64_t, Q4_0>{});
    case Q5_0: return f(std::integral_constant<int64_t, Q5_0>{});
    case Q8_0: return f(std::integral_constant<int64_t, Q8_0>{});
    case Q4_K: return f(std::integral_constant<int64_t, Q4_K>{});
    case Q5_K: return f(std::integral_constant<int64_t, Q5_K>{});
    case Q6_K: return f(std::integral_constant<int64_t, Q6_K>{});
  }
  format_of(qtype);  // raises
}

// x (M, K) fp32 or bf16 rows (row stride ldx) -> QuantX; K % 32 == 0
inline void quantize_x(const void* x, bool bf16, int64_t ldx, int64_t M, int64_t K, QuantX& qx) {
  qx.K = K;
  qx.q.resize(M * K);
  qx.d.resize(M * K / 4);
  qx.qsum.resize(M * K / 16);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t kb = 0; kb < K / 32; ++kb) {
      __m256 v[4];
      for (int i = 0; i < 4; ++i) {
        const int64_t k = m * ldx + 32 * kb + 8 * i;
        v[i] = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + k))), 16))
                    : _mm256_loadu_ps(static_cast<const float*>(x) + k);
      }
      __m256i q[4];
      for (int h = 0; h < 2; ++h) {  // each 16 values their own scale
        const __m256 amax = _mm256_max_ps(_mm256_andnot_ps(sign, v[2 * h]), _mm256_andnot_ps(sign, v[2 * h + 1]));
        __m128 a = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        a = _mm_max_ps(a, _mm_movehl_ps(a, a));
        a = _mm_max_ss(a, _mm_movehdup_ps(a));
        const float d = _mm_cvtss_f32(a) / 127.f, id = d != 0.f ? 1.f / d : 0.f;
        for (int i = 2 * h; i < 2 * h + 2; ++i)
          q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));  // to nearest even
        const __m256i s8 = _mm256_add_epi32(q[2 * h], q[2 * h + 1]);
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
        s = _mm_hadd_epi32(s, s);
        s = _mm_hadd_epi32(s, s);
        qx.qsum[m * K / 16 + 2 * kb + h] = d * float(_mm_cvtsi128_si32(s));
        _mm_storeu_ps(qx.d.data() + m * K / 4 + 8 * kb + 4 * h, _mm_set1_ps(d));  // the scale of 4 int32 lanes
      }
      const __m256i packed = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qx.q.data() + m * K + 32 * kb), packed);
    }
  }
}


#if QUANT_PASS == 2
// u . q of unsigned codes u and int8 codes q: 8 int32 lanes, each the exact sum of 4 products (vpdpbusd)
inline __m256i dot(__m256i u, __m256i q) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, q); }
#else
// vpmaddubsw's int16 pair sums cannot saturate for codes below 128 (every type's but Q8_0's: see row_dot)
inline __m256i dot(__m256i u, __m256i q) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1));
}
#endif

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m + c, n] for c < C: one weight row, unpacked in registers block by block, against C quantized rows of x. Each
// row's additions are the same whatever C is: a row's result does not depend on the other rows.
template <int64_t QT, int C>
inline void row_dot(const QuantX& qx, const uint8_t* row, const Out& y, int64_t m, int64_t n) {
  const int64_t K = qx.K;
  // AVX2 has no unsigned x signed product without int16 saturation for Q8_0's codes u = q + 128: it multiplies the
  // signed codes (q = u - 128, the sign moved onto x's codes), which need no offset
  constexpr bool signed_codes = QUANT_PASS == 1 && QT == Q8_0;
  constexpr float O = signed_codes ? 0.f : float(Codes<QT>::O);
  constexpr bool split = Codes<QT>::split, offsets = O != 0.f || QT == Q4_K || QT == Q5_K;
  __m256 acc[C];
  float off[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps(), off[c] = 0.f;
  const int8_t* q0 = qx.q.data() + m * K;
  const float* d0 = qx.d.data() + m * K / 4;
  const float* s0 = qx.qsum.data() + m * K / 16;
  blocks_of<QT>(row, K, [&](int64_t kb, const Block& b) {
    __m256i u = b.u, us = b.u;
    if constexpr (signed_codes) {
      u = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
      us = _mm256_sign_epi8(u, u);
    }
    const __m256 sw = _mm256_set_m128(_mm_set1_ps(b.s1), _mm_set1_ps(b.s0));
    const float o0 = b.s0 * O + b.f0, o1 = b.s1 * O + b.f1;  // the offsets per unit of x's code sums
    for (int c = 0; c < C; ++c) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0 + c * K + 32 * kb));
      const __m256 i = _mm256_cvtepi32_ps(signed_codes ? dot(us, _mm256_sign_epi8(q, u)) : dot(u, q));
      const __m256 dx = _mm256_loadu_ps(d0 + c * K / 4 + 8 * kb);  // x's scales per int32 lane
      acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(i, dx), sw, acc[c]);
      const float* s = s0 + c * K / 16 + 2 * kb;
      if constexpr (split) off[c] += o0 * s[0] + o1 * s[1];
      else if constexpr (offsets) off[c] += o0 * (s[0] + s[1]);
    }
  });
  for (int c = 0; c < C; ++c) y.put(m + c, n, hsum(acc[c]) - off[c]);
}

template <int64_t QT>
inline void matmul_t(const QuantX& qx, const uint8_t* w, int64_t ws, const Out& y, int64_t M, int64_t N) {
  const int64_t threads = at::get_num_threads();
  gemma_cpu::stream_chunks(N, std::max<int64_t>(16, N / (8 * threads)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {  // each weight row read once from memory, again from L1 for more rows of x
      const uint8_t* row = w + n * ws;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) row_dot<QT, 4>(qx, row, y, m, n);
      if (M - m == 3) row_dot<QT, 3>(qx, row, y, m, n);
      else if (M - m == 2) row_dot<QT, 2>(qx, row, y, m, n);
      else if (M - m == 1) row_dot<QT, 1>(qx, row, y, m, n);
    }
  });
}

inline void matmul(const QuantX& qx, const uint8_t* w, int64_t ws, int64_t qtype, const Out& y, int64_t M,
                   int64_t N) {
  dispatch(qtype, [&](auto qt) { matmul_t<decltype(qt)::value>(qx, w, ws, y, M, N); });
}

// The K values of `row`, dequantized as the `gguf` package does (the same fp32 values), into yf (fp32) or yh (bf16)
#if QUANT_PASS == 2
inline void store_bf16(uint16_t* p, __m512 v) {  // 16 values rounded to nearest even (finite inputs), as to_bf16
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

template <int64_t QT>
inline void dequantize_t(const uint8_t* row, int64_t K, float* yf, uint16_t* yh) {
  blocks_of<QT>(row, K, [&](int64_t kb, const Block& b) {
    for (int h = 0; h < 2; ++h) {  // 16 values at a time
      const __m512i c = _mm512_cvtepu8_epi32(h ? _mm256_extracti128_si256(b.u, 1) : _mm256_castsi256_si128(b.u));
      const __m512 s = _mm512_set1_ps(h ? b.s1 : b.s0);
      __m512 v;
      if constexpr (QT == Q4_K || QT == Q5_K)  // d * sc * q - dmin * m
        v = _mm512_fmsub_ps(_mm512_cvtepi32_ps(c), s, _mm512_set1_ps(h ? b.f1 : b.f0));
      else  // d * (q - O)
        v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c, _mm512_set1_epi32(Codes<QT>::O))), s);
      if (yf) _mm512_storeu_ps(yf + 32 * kb + 16 * h, v);
      else store_bf16(yh + 32 * kb + 16 * h, v);
    }
  });
}
#else
inline void store_bf16(uint16_t* p, __m256 v) {  // 8 values rounded to nearest even (finite inputs), as to_bf16
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

template <int64_t QT>
inline void dequantize_t(const uint8_t* row, int64_t K, float* yf, uint16_t* yh) {
  blocks_of<QT>(row, K, [&](int64_t kb, const Block& b) {
    alignas(32) uint8_t u[32];
    _mm256_store_si256(reinterpret_cast<__m256i*>(u), b.u);
    for (int i = 0; i < 4; ++i) {  // 8 values at a time
      const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(u + 8 * i)));
      const __m256 s = _mm256_set1_ps(i < 2 ? b.s0 : b.s1);
      __m256 v;
      if constexpr (QT == Q4_K || QT == Q5_K)  // d * sc * q - dmin * m
        v = _mm256_fmsub_ps(_mm256_cvtepi32_ps(c), s, _mm256_set1_ps(i < 2 ? b.f0 : b.f1));
      else  // d * (q - O)
        v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, _mm256_set1_epi32(Codes<QT>::O))), s);
      if (yf) _mm256_storeu_ps(yf + 32 * kb + 8 * i, v);
      else store_bf16(yh + 32 * kb + 8 * i, v);
    }
  });
}
#endif

inline void dequantize_row(const uint8_t* row, int64_t qtype, int64_t K, float* yf, uint16_t* yh) {
  dispatch(qtype, [&](auto qt) { dequantize_t<decltype(qt)::value>(row, K, yf, yh); });
}

#endif  // QUANT_PASS
