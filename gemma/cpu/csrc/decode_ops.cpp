// Fused forms of the small elementwise ops of a Gemma layer, for the same CPUs as bf16_linear.cpp. A decode step
// runs ~3000 PyTorch ops on a few hundred numbers each, and on 2 slow cores each costs ~10 us of dispatch: these
// replace ~11 ops per RMSNorm and ~8 per rotary embedding with one call, computing exactly what those ops compute.
// - rms_norm: Gemma's RMSNorm in fp32, (x * rsqrt(mean(x^2) + eps)) * (1 + w), rounded to x's dtype once; the
//   mean's additions run in another order than PyTorch's (a difference of fp32 rounding before the bf16 one).
// - rope_bf16: x * cos + rotate_half(x) * sin with each product and the sum rounded to bf16, as PyTorch's three
//   bf16 ops round them: bit-identical to gemma.layers.apply_rope.
// - gelu_mul: Gemma's MLP activation, gelu_tanh(gate) * up, as the two PyTorch ops compute it.
// - decode_layers: every decoder layer of a step of single-token decodes, one call for ~40 Python-level ops a layer.
// - argmax_rows: torch.argmax over fp32 logits rows in one pass.
// - huge_pages: tensors' storages moved to 2 MiB pages, where weights stream faster.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "bf16_common.h"

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> out);  // bf16_linear.cpp
std::string bf16_set_isa(const std::string& name, int64_t prefetch);  // bf16_linear.cpp
std::string bf16_isa();
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, c10::optional<torch::Tensor> out,
                           int64_t dense_rows);  // quant.cpp
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots,
                               torch::Tensor allowed, double scale, double softcap);  // attention.cpp
void attention_rows(const gemma_cpu::AttentionArgs& a);
std::string attention_set_isa(const std::string& name);
std::string attention_isa();

namespace {

inline float from_bf16(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as c10::BFloat16 does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7FC0;
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float round_bf16(float f) { return from_bf16(to_bf16(f)); }

inline __m256 widen8(const uint16_t* p) {  // 8 bf16 -> 8 fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// 8 lanes rounded to bf16 (round to nearest even, NaN -> 0x7FC0, as c10::BFloat16), kept as fp32 bits
inline __m256i round8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb),
                                     _mm256_set1_epi32(int(0xFFFF0000u)));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

inline void store8_bf16(uint16_t* p, __m256 v) {  // to_bf16 of 8 lanes
  const __m256i r = _mm256_srli_epi32(round8(v), 16);
  _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

}  // namespace

// PyTorch's 1.0 + weight.float() for a norm's weight w (D,), into scale: the same fp32 values, made here (two ATen ops
// per call cost more than the norm)
static void norm_scale_into(const torch::Tensor& w, std::vector<float>& scale) {
  TORCH_CHECK(w.dim() == 1, "rms_norm: w must be (D,)");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, "rms_norm: fp32 or bf16 w");
  const int64_t D = w.size(0), st = w.stride(0);
  scale.resize(D);
  const bool f32 = w.scalar_type() == at::kFloat;
  const float* wf = f32 ? w.data_ptr<float>() : nullptr;
  const uint16_t* wh = f32 ? nullptr : reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  for (int64_t d = 0; d < D; ++d) scale[d] = (f32 ? wf[d * st] : from_bf16(wh[d * st])) + 1.0f;
}

// Gemma's RMSNorm of one fp32 row, rounded once into oh (bf16) or of (fp32): every norm of this file computes it here
static void norm_row(const float* row, int64_t D, const float* sp, double eps, uint16_t* oh, float* of) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m256 v = _mm256_loadu_ps(row + d);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  float sum = 0.f;
  for (int i = 0; i < 8; ++i) sum += lanes[i];
  for (; d < D; ++d) sum += row[d] * row[d];
  const float inv = 1.0f / std::sqrt(sum / float(D) + float(eps));
  d = 0;
  if (oh)
    for (; d + 8 <= D; d += 8)
      store8_bf16(oh + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + d), _mm256_set1_ps(inv)),
                                        _mm256_loadu_ps(sp + d)));
  for (; d < D; ++d) {
    const float v = (row[d] * inv) * sp[d];
    if (oh) oh[d] = to_bf16(v);
    else of[d] = v;
  }
}

// D values into row as fp32: bf16 ones from h, or else fp32 ones from f
static void widen_row(const uint16_t* h, const float* f, int64_t D, float* row) {
  int64_t d = 0;
  if (h)
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(row + d, widen8(h + d));
  for (; d < D; ++d) row[d] = h ? from_bf16(h[d]) : f[d];
}

// x (..., D) fp32 or bf16 (rows may be strided, D contiguous), w (D,) zero-centred -> Gemma's RMSNorm of each
// row, contiguous, in x's dtype. Reads and writes x's dtype directly: no conversion ops around it.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(w.dim() == 1 && x.size(-1) == w.size(0), "rms_norm: w must be (D,) for x (..., D)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "rms_norm: fp32 or bf16 x");
  const int64_t D = x.size(-1);
  auto x2 = x.stride(-1) == 1 ? x : x.contiguous();
  const int64_t R = D ? x2.numel() / D : 0, nd = x2.dim();
  auto row_offset = [&](int64_t r) {  // element offset of row r of the leading dims, whatever their strides
    int64_t off = 0;
    for (int64_t i = nd - 2; i >= 0; --i) {
      off += (r % x2.size(i)) * x2.stride(i);
      r /= x2.size(i);
    }
    return off;
  };
  std::vector<float> scale;
  norm_scale_into(w, scale);
  auto out = torch::empty(x.sizes(), x.options());
  const bool half = x.scalar_type() == at::kBFloat16;
  const uint16_t* xh = half ? reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>()) : nullptr;
  const float* xf = half ? nullptr : x2.data_ptr<float>();
  uint16_t* oh = half ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  float* of = half ? nullptr : out.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = row_offset(r);
      widen_row(half ? xh + o : nullptr, half ? nullptr : xf + o, D, row.data());
      norm_row(row.data(), D, scale.data(), eps, half ? oh + r * D : nullptr, half ? nullptr : of + r * D);
    }
  });
  return out;
}

// The residual step of a sandwich-normed layer over n rows of D: sum = x + rms_norm(h, s1) for bf16 x, h, the norm
// rounded to bf16 before the addition, as `x + norm(h)` rounds it; with s2, also normed = rms_norm(sum, s2) (the
// following norm): what rms_norm and at::add give, in one pass. Without s1: sum = x + h, as at::add gives it.
// row, hn: D floats and D bf16 values of scratch.
static void add_norm_rows(const uint16_t* x, const uint16_t* h, int64_t n, int64_t D, const float* s1, const float* s2,
                          double eps, uint16_t* sum, uint16_t* normed, float* row, uint16_t* hn) {
  for (int64_t o = 0; o < n * D; o += D) {
    const uint16_t* add = h + o;
    if (s1) {
      widen_row(h + o, nullptr, D, row);
      norm_row(row, D, s1, eps, hn, nullptr);
      add = hn;
    }
    for (int64_t d = 0; d < D; ++d) sum[o + d] = to_bf16(from_bf16(x[o + d]) + from_bf16(add[d]));
    if (s2) {
      widen_row(sum + o, nullptr, D, row);
      norm_row(row, D, s2, eps, normed + o, nullptr);
    }
  }
}

extern "C" __m512 Sleef_tanhf16_u10(__m512);  // in libtorch_cpu, which ATen's vectorized tanh calls
extern "C" __m256 Sleef_tanhf8_u10(__m256);

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i round16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb),
                                     _mm512_set1_epi32(int(0xFFFF0000u)));
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC00000));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const uint16_t* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// Gemma's activation of n bf16 values, gelu_tanh(g) * u, each op rounded to bf16 as ATen's gelu and mul round them.
// ATen's vectorized gelu computes in fp32 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) with SLEEF's tanh (1 ulp),
// 16 lanes where the CPU has AVX-512 and 8 where it has AVX2: these do the same, calling the same SLEEF functions
// (PyTorch exports them), so they give ATen's values (every bf16 input checked). A partial vector at the end goes
// through the same code.
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void gelu_mul_avx512(const uint16_t* g, const uint16_t* u,
                                                                                uint16_t* o, int64_t n) {
  const __m512 beta = _mm512_set1_ps(float(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa = _mm512_set1_ps(0.044715f);
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    const __m512 x = load16(g + i, mask);
    const __m512 inner = _mm512_mul_ps(beta, _mm512_add_ps(x, _mm512_mul_ps(kappa, _mm512_mul_ps(_mm512_mul_ps(x, x), x))));
    const __m512 act = _mm512_castsi512_ps(
        round16(_mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, Sleef_tanhf16_u10(inner)))));
    const __m512i y = _mm512_srli_epi32(round16(_mm512_mul_ps(act, load16(u + i, mask))), 16);
    _mm256_mask_storeu_epi16(o + i, mask, _mm512_cvtepi32_epi16(y));
  }
}

static void gelu_mul_avx2(const uint16_t* g, const uint16_t* u, uint16_t* o, int64_t n) {
  const __m256 beta = _mm256_set1_ps(float(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa = _mm256_set1_ps(0.044715f);
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t m = std::min<int64_t>(8, n - i);
    uint16_t gb[8] = {}, ub[8] = {}, ob[8];
    std::memcpy(gb, g + i, m * 2), std::memcpy(ub, u + i, m * 2);
    const __m256 x = widen8(gb);
    const __m256 inner = _mm256_mul_ps(beta, _mm256_add_ps(x, _mm256_mul_ps(kappa, _mm256_mul_ps(_mm256_mul_ps(x, x), x))));
    const __m256 act = _mm256_castsi256_ps(
        round8(_mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, Sleef_tanhf8_u10(inner)))));
    store8_bf16(ob, _mm256_mul_ps(act, widen8(ub)));
    std::memcpy(o + i, ob, m * 2);
  }
}

// One row of gelu_mul at ATen's own choice of vector width: AVX512 where the CPU has AVX-512 F, BW, VL and DQ, unless
// ATEN_CPU_CAPABILITY names another
static void gelu_row(const uint16_t* g, const uint16_t* u, uint16_t* o, int64_t n) {
  static const bool wide = [] {
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    if (env && *env && std::string(env) != "avx512") return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  if (wide) gelu_mul_avx512(g, u, o, n);
  else gelu_mul_avx2(g, u, o, n);
}

// gate, up (..., I) bf16, the same shape (rows may be strided, I contiguous) -> gelu_tanh(gate) * up (..., I): what
// F.gelu(gate, approximate="tanh") * up gives
torch::Tensor gelu_mul(torch::Tensor gate, torch::Tensor up) {
  TORCH_CHECK(gate.scalar_type() == at::kBFloat16 && up.scalar_type() == at::kBFloat16 && gate.sizes() == up.sizes()
              && gate.dim() >= 1, "gelu_mul: gate and up bf16, the same shape");
  auto g = gate.dim() == 2 && gate.stride(1) == 1 ? gate : gate.contiguous().view({-1, gate.size(-1)});
  auto u = up.dim() == 2 && up.stride(1) == 1 ? up : up.contiguous().view({-1, up.size(-1)});
  const int64_t R = g.size(0), I = g.size(1);
  auto out = torch::empty({R, I}, gate.options());
  const auto* gp = static_cast<const uint16_t*>(g.data_ptr());
  const auto* upp = static_cast<const uint16_t*>(u.data_ptr());
  auto* op = static_cast<uint16_t*>(out.data_ptr());
  const int64_t gs = g.stride(0), us = u.stride(0);
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(I, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) gelu_row(gp + r * gs, upp + r * us, op + r * I, I);
  });
  return out.view(gate.sizes());
}

// One row of D values rotated: x * cos + rotate_half(x) * sin, each product and the sum rounded to bf16
static void rope_row(const uint16_t* row, const uint16_t* c, const uint16_t* s, uint16_t* o, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float rot = d < half ? -from_bf16(row[d + half]) : from_bf16(row[d - half]);
    const float a = round_bf16(from_bf16(row[d]) * from_bf16(c[d]));
    const float bb = round_bf16(rot * from_bf16(s[d]));
    o[d] = to_bf16(a + bb);
  }
}

// x (B, H, T, D) bf16, cos/sin (B, T, D) bf16 -> the rotated x (B, H, T, D), contiguous.
torch::Tensor rope_bf16(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 &&
              sin.scalar_type() == at::kBFloat16, "rope_bf16: bf16 tensors");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
              cos.size(1) == x.size(2) && cos.size(2) == x.size(3) && x.size(3) % 2 == 0, "rope_bf16: shapes");
  auto xc = x.contiguous();
  auto cc = cos.contiguous(), sc = sin.contiguous();
  const int64_t B = xc.size(0), H = xc.size(1), T = xc.size(2), D = xc.size(3);
  auto out = torch::empty_like(xc);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(cc.data_ptr<at::BFloat16>());
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, B * H * T, std::max<int64_t>(1, 32768 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * T), t = r % T;
      const uint16_t* row = xp + r * D;
      const uint16_t* c = cp + (b * T + t) * D;
      const uint16_t* s = sp + (b * T + t) * D;
      uint16_t* o = op + r * D;
      rope_row(row, c, s, o, D);
    }
  });
  return out;
}

// x w^T into out (n, N), contiguous, by the product gemma.cpu.fastpath chose for w at this row count: bf16 w (qtype
// 0): ours below `rows`, PyTorch's (oneDNN, native bf16 / AMX where the CPU has them) from there on; GGUF blocks of
// ggml type qtype (quant.cpp): integer products below `rows`, dequantized from there on; exactly as the unfused
// module computes it.
static void product_into(const torch::Tensor& x, const torch::Tensor& w, int64_t qtype, int64_t rows,
                         torch::Tensor& out) {
  if (qtype) quant_linear(x, w, qtype, out, rows);
  else if (x.size(0) >= rows) out.copy_(at::linear(x, w));
  else linear_bf16(x, w, out);
}

// pool[slots[i]] = rows[i] for rows (n, Hkv, D) into a pool (P, Hkv, D), both bf16 with D contiguous, row i head h
// of `rows` at src + i * si + h * sh: the module's indexed assignment as plain row copies
static void write_kv(torch::Tensor& pool, const torch::Tensor& slots, const uint16_t* src, int64_t Hkv, int64_t D,
                     int64_t si, int64_t sh) {
  TORCH_CHECK(pool.dim() == 3 && pool.size(1) == Hkv && pool.size(2) == D && pool.stride(2) == 1 &&
              pool.scalar_type() == at::kBFloat16, "decode_layers: KV pools (P, Hkv, D) bf16 of the layer's heads");
  const int64_t n = slots.numel(), P = pool.size(0);
  const int64_t* s = slots.data_ptr<int64_t>();
  auto* dst = static_cast<uint16_t*>(pool.data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(s[i] >= 0 && s[i] < P, "decode_layers: write slot ", s[i], " out of [0, ", P, ")");
    for (int64_t h = 0; h < Hkv; ++h)
      std::memcpy(dst + s[i] * pool.stride(0) + h * pool.stride(1), src + i * si + h * sh, D * 2);
  }
}

// One decoder layer's constants: its norms ({input, post_attention, pre_feedforward, post_feedforward} with Gemma
// 2/3's sandwich norms, else {input, post_attention}: Gemma 1's post_attention is the MLP's norm), Gemma 3's
// per-head q/k norms, its products (q/k/v: counts[0] of them, o, gate/up: counts[1], and down, in that order, each
// with its ggml type (0: bf16) and the row count from which it takes the batched product), its head counts and
// attention settings, and which of a step's slot tables (its KV group) and rope tables it reads.
struct DecodeLayerPlan {
  std::vector<torch::Tensor> norms;
  c10::optional<torch::Tensor> q_norm, k_norm;
  std::vector<torch::Tensor> weights;
  std::vector<int64_t> qtypes, rows, counts;
  int64_t H, Hkv;
  double eps, scale, softcap;
  int64_t group, rope;
};

// A step's activations, reused from step to step while the row count stays. Making ~20 tensors a layer (outputs and
// views), each cold after the products have streamed megabytes of weights through the caches, cost ~0.7 ms of a
// ~22 ms single-stream 270M step on 2 cores of an Intel Xeon (2026-12-05, alternating processes).
struct DecodeWorkspace {
  enum { XN, QKV, Q, K, ATT, H, SUM, NORMED, GU, ACT, Y, XA, XB, kBuffers };
  torch::Tensor buf[kBuffers];
  std::vector<torch::Tensor> parts;  // a projection's parts' own outputs, by the part's index in the layer
  std::vector<float> scale[6], row;  // the layer's norms as 1 + w (input, post_attention, ..., q, k); one fp32 row
  std::vector<uint16_t> hn, qk;      // a normed row; a normed q or k head
  static torch::Tensor& sized(torch::Tensor& t, int64_t r, int64_t c, const torch::TensorOptions& o) {
    if (!t.defined() || t.size(0) != r || t.size(1) != c) t = torch::empty({r, c}, o);
    return t;
  }
  torch::Tensor& get(int which, int64_t r, int64_t c, const torch::TensorOptions& o) {
    return sized(buf[which], r, c, o);
  }
  torch::Tensor& part(size_t i, int64_t r, int64_t c, const torch::TensorOptions& o) {
    if (parts.size() <= i) parts.resize(i + 1);
    return sized(parts[i], r, c, o);
  }
};

inline uint16_t* bf16_ptr(const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// weights[first, first + count) of layer L applied to x into out (n, sum of their rows): each part into its own
// buffer, then copied into its columns (at::cat's values)
static void products_into(const torch::Tensor& x, const DecodeLayerPlan& L, size_t first, size_t count,
                          torch::Tensor& out, DecodeWorkspace& ws) {
  if (count == 1) return product_into(x, L.weights[first], L.qtypes[first], L.rows[first], out);
  const int64_t n = x.size(0), width = out.size(1);
  int64_t col = 0;
  for (size_t i = first; i < first + count; ++i) {
    const int64_t N = L.weights[i].size(0);
    TORCH_CHECK(col + N <= width, "decode_layers: a projection's parts wider than its output");
    auto& part = ws.part(i, n, N, x.options());
    product_into(x, L.weights[i], L.qtypes[i], L.rows[i], part);
    const uint16_t* src = bf16_ptr(part);
    uint16_t* dst = bf16_ptr(out);
    for (int64_t r = 0; r < n; ++r) std::memcpy(dst + r * width + col, src + r * N, N * 2);
    col += N;
  }
  TORCH_CHECK(col == width, "decode_layers: a projection's parts narrower than its output");
}

// One Gemma decoder layer for n single-token decodes over the engine's paged KV cache: what
// gemma.model.GemmaDecoderLayer.forward computes with the engine's PagedBatch when every sequence of a step decodes
// one token, without ~40 Python-level ops (~5 ms of a 270M decode step on 2 cores) and without making a tensor.
// It runs the same kernels (PyTorch's own product where gemma.cpu.fastpath chose it) on the same values, with the
// same roundings in the same order (its KV writes plain row copies), so it is the unfused path bit for bit
// (tests/gemma/test_cpu_fastpath.py). x, out (n, C) bf16, contiguous; the pools (P, Hkv, D); write_slots (n,)
// where this step's keys go; slots/allowed (n, S), contiguous: the keys each row attends; cos/sin (n, D).
static void decode_layer(const DecodeLayerPlan& L, DecodeWorkspace& ws, const torch::Tensor& x, torch::Tensor& out,
                         torch::Tensor& k_pool, torch::Tensor& v_pool, const torch::Tensor& write_slots,
                         const torch::Tensor& slots, const torch::Tensor& allowed, const uint16_t* cos,
                         const uint16_t* sin) {
  const int64_t n = x.size(0), C = x.size(1), H = L.H, Hkv = L.Hkv, D = k_pool.size(-1);
  const size_t nqkv = L.counts[0], ngu = L.counts[1];
  const double eps = L.eps;
  const auto opt = x.options();
  TORCH_CHECK(v_pool.sizes() == k_pool.sizes() && D % 8 == 0 && Hkv > 0 && H % Hkv == 0,
              "decode_layers: k and v pools (P, Hkv, D) alike, D % 8 == 0, H a multiple of Hkv");
  const bool sandwich = L.norms.size() == 4, qk_norms = L.q_norm.has_value();
  // the norms' 1 + w, made every step (~3.8k values a 270M layer): the plan holds the weights, which may be
  // loaded into in place, not copies of them
  for (size_t j = 0; j < L.norms.size(); ++j) norm_scale_into(L.norms[j], ws.scale[j]);
  if (qk_norms) norm_scale_into(*L.q_norm, ws.scale[4]), norm_scale_into(*L.k_norm, ws.scale[5]);
  for (size_t j = 0; j < L.norms.size(); ++j)
    TORCH_CHECK(int64_t(ws.scale[j].size()) == C, "decode_layers: norm weights (C,)");
  TORCH_CHECK(!qk_norms || (int64_t(ws.scale[4].size()) == D && int64_t(ws.scale[5].size()) == D),
              "decode_layers: q/k norm weights (D,)");
  ws.row.resize(std::max(C, D)), ws.hn.resize(C), ws.qk.resize(D);
  const uint16_t* xp = bf16_ptr(x);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));

  // input norm, then q/k/v
  auto& xn = ws.get(DecodeWorkspace::XN, n, C, opt);
  uint16_t* xnp = bf16_ptr(xn);
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(C);
    for (int64_t r = r0; r < r1; ++r) {
      widen_row(xp + r * C, nullptr, C, row.data());
      norm_row(row.data(), C, ws.scale[0].data(), eps, xnp + r * C, nullptr);
    }
  });
  const int64_t width = (H + 2 * Hkv) * D;
  auto& qkv = ws.get(DecodeWorkspace::QKV, n, width, opt);
  products_into(xn, L, 0, nqkv, qkv, ws);
  const uint16_t* qkvp = bf16_ptr(qkv);

  // q and k: each head normed (Gemma 3) and rotated, q into (n, H, D), k into (n, Hkv, D); v stays in qkv
  uint16_t* qp = bf16_ptr(ws.get(DecodeWorkspace::Q, n, H * D, opt));
  uint16_t* kp = bf16_ptr(ws.get(DecodeWorkspace::K, n, Hkv * D, opt));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < H + Hkv; ++h) {
      const uint16_t* src = qkvp + i * width + h * D;
      if (qk_norms) {
        widen_row(src, nullptr, D, ws.row.data());
        norm_row(ws.row.data(), D, ws.scale[h < H ? 4 : 5].data(), eps, ws.qk.data(), nullptr);
        src = ws.qk.data();
      }
      rope_row(src, cos + i * D, sin + i * D, h < H ? qp + (i * H + h) * D : kp + (i * Hkv + h - H) * D, D);
    }
  TORCH_CHECK(write_slots.numel() == n, "decode_layers: one write slot per row");
  write_kv(k_pool, write_slots, kp, Hkv, D, Hkv * D, D);
  write_kv(v_pool, write_slots, qkvp + (H + Hkv) * D, Hkv, D, width, D);

  // attention over the pools, then o
  auto& att = ws.get(DecodeWorkspace::ATT, n, H * D, opt);
  attention_rows({qp, H * D, D, bf16_ptr(k_pool), bf16_ptr(v_pool), 1, 0, k_pool.stride(0), k_pool.stride(1), 0,
                  v_pool.stride(0), v_pool.stride(1), n, H, Hkv, D, slots.data_ptr<int64_t>(),
                  allowed.data_ptr<bool>(), slots.size(1), L.scale, L.softcap, bf16_ptr(att)});
  auto& h = ws.get(DecodeWorkspace::H, n, C, opt);
  product_into(att, L.weights[nqkv], L.qtypes[nqkv], L.rows[nqkv], h);

  // the residual, the MLP's norm, the MLP, the residual
  auto& sum = ws.get(DecodeWorkspace::SUM, n, C, opt);
  auto& normed = ws.get(DecodeWorkspace::NORMED, n, C, opt);
  uint16_t *sp = bf16_ptr(sum), *np = bf16_ptr(normed);
  add_norm_rows(xp, bf16_ptr(h), n, C, sandwich ? ws.scale[1].data() : nullptr, ws.scale[sandwich ? 2 : 1].data(),
                eps, sp, np, ws.row.data(), ws.hn.data());
  const size_t d = nqkv + 1 + ngu;
  int64_t gu_width = 0;
  for (size_t i = nqkv + 1; i < d; ++i) gu_width += L.weights[i].size(0);
  auto& gu = ws.get(DecodeWorkspace::GU, n, gu_width, opt);
  products_into(normed, L, nqkv + 1, ngu, gu, ws);
  const int64_t inter = gu_width / 2;
  auto& act = ws.get(DecodeWorkspace::ACT, n, inter, opt);
  const uint16_t* gup = bf16_ptr(gu);
  uint16_t* ap = bf16_ptr(act);
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / std::max<int64_t>(inter, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) gelu_row(gup + r * gu_width, gup + r * gu_width + inter, ap + r * inter, inter);
  });
  auto& y = ws.get(DecodeWorkspace::Y, n, C, opt);
  product_into(act, L.weights[d], L.qtypes[d], L.rows[d], y);
  add_norm_rows(sp, bf16_ptr(y), n, C, sandwich ? ws.scale[3].data() : nullptr, nullptr, eps, bf16_ptr(out), nullptr,
                ws.row.data(), ws.hn.data());
}

// A model's layers for decode_layers, gathered once (gemma.cpu.fastpath), with the activations' buffers: one call
// runs every layer of a step, where a Python loop of one call per layer spent ~28 us a layer between the layers'
// kernels.
struct DecodePlan {
  std::vector<DecodeLayerPlan> layers;
  DecodeWorkspace ws;
  std::mutex lock;  // one step at a time through the buffers
  void add(std::vector<torch::Tensor> norms, c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
           std::vector<torch::Tensor> weights, std::vector<int64_t> qtypes, std::vector<int64_t> rows,
           std::vector<int64_t> counts, int64_t H, int64_t Hkv, double eps, double scale, double softcap,
           int64_t group, int64_t rope) {
    TORCH_CHECK(norms.size() == 2 || norms.size() == 4, "decode plan: 2 or 4 norms");
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "decode plan: both qk norms or neither");
    TORCH_CHECK(counts.size() == 2 && counts[0] >= 1 && counts[1] >= 1 &&
                weights.size() == size_t(counts[0] + counts[1] + 2) && qtypes.size() == weights.size() &&
                rows.size() == weights.size(), "decode plan: the products of qkv, o, gate_up and down");
    TORCH_CHECK(group >= 0 && rope >= 0 && H > 0 && Hkv > 0, "decode plan: group and rope indices, head counts");
    layers.push_back({std::move(norms), std::move(q_norm), std::move(k_norm), std::move(weights), std::move(qtypes),
                      std::move(rows), std::move(counts), H, Hkv, eps, scale, softcap, group, rope});
  }
};

// Every layer of `plan` for a step of n single-token decodes x (n, C) bf16: layer i reads the pools k_pools[i] and
// v_pools[i], its KV group's write_slots (n,), slots and allowed (n, S), and its rope type's cos and sin (1, n, D).
// Returns the last layer's output (n, C), a new tensor.
torch::Tensor decode_layers(DecodePlan& plan, torch::Tensor x, std::vector<torch::Tensor> k_pools,
                            std::vector<torch::Tensor> v_pools, std::vector<torch::Tensor> write_slots,
                            std::vector<torch::Tensor> slots, std::vector<torch::Tensor> allowed,
                            std::vector<torch::Tensor> cos, std::vector<torch::Tensor> sin) {
  const size_t L = plan.layers.size();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "decode_layers: x (n, C) bf16");
  TORCH_CHECK(k_pools.size() == L && v_pools.size() == L, "decode_layers: one k and one v pool per layer");
  TORCH_CHECK(slots.size() == write_slots.size() && allowed.size() == write_slots.size() && sin.size() == cos.size(),
              "decode_layers: write_slots, slots and allowed per KV group; cos and sin per rope type");
  const int64_t n = x.size(0), C = x.size(1);
  for (size_t g = 0; g < write_slots.size(); ++g) {
    TORCH_CHECK(write_slots[g].dim() == 1 && write_slots[g].scalar_type() == at::kLong, "decode_layers: write "
                "slots (n,) int64");
    TORCH_CHECK(slots[g].scalar_type() == at::kLong && allowed[g].scalar_type() == at::kBool && slots[g].dim() == 2 &&
                slots[g].size(0) == n && allowed[g].sizes() == slots[g].sizes(), "decode_layers: slots/allowed (n, S)");
    write_slots[g] = write_slots[g].contiguous(), slots[g] = slots[g].contiguous();
    allowed[g] = allowed[g].contiguous();
  }
  for (size_t r = 0; r < cos.size(); ++r) {
    TORCH_CHECK(cos[r].scalar_type() == at::kBFloat16 && sin[r].scalar_type() == at::kBFloat16 && cos[r].dim() == 3 &&
                cos[r].size(0) == 1 && cos[r].size(1) == n && sin[r].sizes() == cos[r].sizes(),
                "decode_layers: cos/sin (1, n, D) bf16");
    cos[r] = cos[r].contiguous(), sin[r] = sin[r].contiguous();
  }
  std::lock_guard<std::mutex> guard(plan.lock);
  DecodeWorkspace& ws = plan.ws;
  torch::Tensor in = x.contiguous();
  auto result = torch::empty({n, C}, x.options());
  for (size_t i = 0; i < L; ++i) {
    const DecodeLayerPlan& layer = plan.layers[i];
    TORCH_CHECK(size_t(layer.group) < write_slots.size() && size_t(layer.rope) < cos.size(),
                "decode_layers: layer ", i, " reads KV group ", layer.group, " and rope table ", layer.rope);
    TORCH_CHECK(cos[layer.rope].size(2) == k_pools[i].size(-1), "decode_layers: rope tables of the head size");
    torch::Tensor& out = i + 1 == L ? result : ws.get(i % 2 ? DecodeWorkspace::XB : DecodeWorkspace::XA, n, C,
                                                      x.options());
    decode_layer(layer, ws, in, out, k_pools[i], v_pools[i], write_slots[layer.group], slots[layer.group],
                 allowed[layer.group], bf16_ptr(cos[layer.rope]), bf16_ptr(sin[layer.rope]));
    in = out;
  }
  return L ? result : in.clone();
}

// x (S, V) fp32 -> (S,) int64: torch.argmax(x, -1) exactly (the first index of the largest value; a row with NaN
// gives its first NaN). ATen's reduction takes ~0.6 ms for one 262k-entry row here and ~10 ms for 32: a sixth of a
// decode step's non-matmul time at one sequence. One pass per row: each lane keeps its own first maximum (a later
// value must be strictly greater), then the lanes' ties go to the smaller index.
torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) > 0, "argmax_rows: x (S, V) fp32, V > 0");
  auto xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t S = xc.size(0), V = xc.size(1), rs = xc.stride(0);
  auto out = torch::empty({S}, x.options().dtype(at::kLong));
  const float* xp = xc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const float* row = xp + s * rs;
      __m256 best = _mm256_set1_ps(-INFINITY);
      __m256i best_i = _mm256_set1_epi32(-1), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i step = _mm256_set1_epi32(8);
      __m256 nan = _mm256_setzero_ps();
      int64_t v = 0;
      if (V < (int64_t(1) << 31))
        for (; v + 8 <= V; v += 8) {
          const __m256 a = _mm256_loadu_ps(row + v);
          const __m256 gt = _mm256_cmp_ps(a, best, _CMP_GT_OQ);
          nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
          best = _mm256_blendv_ps(best, a, gt);
          best_i = _mm256_blendv_epi8(best_i, idx, _mm256_castps_si256(gt));
          idx = _mm256_add_epi32(idx, step);
        }
      float bv[8];
      int32_t bi[8];
      _mm256_storeu_ps(bv, best);
      _mm256_storeu_si256((__m256i*)bi, best_i);
      float m = -INFINITY;
      int64_t arg = -1;
      for (int l = 0; l < 8; ++l)
        if (bi[l] >= 0 && (bv[l] > m || (bv[l] == m && bi[l] < arg) || arg < 0)) m = bv[l], arg = bi[l];
      if (arg < 0 && v > 0) m = row[0], arg = 0;  // every vector lane held -inf (or NaN, handled below)
      bool any_nan = _mm256_movemask_ps(nan) != 0;
      for (int64_t t = v; t < V && !any_nan; ++t) {  // the tail, past every vector lane's indices
        if (std::isnan(row[t])) any_nan = true;
        else if (arg < 0 || row[t] > m) m = row[t], arg = t;
      }
      if (any_nan) {  // rare: ATen treats NaN as the largest value, so the first NaN wins
        for (int64_t t = 0; t < V; ++t)
          if (std::isnan(row[t])) { arg = t; break; }
      }
      op[s] = arg < 0 ? 0 : arg;  // a row of only -inf: index 0, as ATen
    }
  });
  return out;
}

// The storages of CPU tensors ts (of 64 KiB or more, each once) moved, bytes unchanged, side by side into regions
// the kernel is asked to back with 2 MiB pages (transparent huge pages, madvise): every tensor sharing a storage
// then reads the new memory, and a region is freed with the last of them. A decode step streams every weight
// once, and through 4 KiB pages each 4 KiB costs a TLB miss: on 2 cores of an Intel Xeon (THP "madvise",
// 2026-12-05) the bf16 kernel read a 1 GiB matrix at 24-27 GB/s from 4 KiB pages and 29-31 GB/s from 2 MiB ones.
// Storages share regions of up to 256 MiB, so that matrices of 1-2 MiB (the 270M's q/k/v and o) need no padding to
// a page each, while moving needs at most 256 MiB (or the largest storage) beside the tensors. Returns the bytes
// moved: 0 where the storages come to less than a huge page or the OS refuses the advice (THP "never", or a kernel
// without THP). Storage moved before stays where it is.
namespace {
struct Region {  // owns p; never copied
  void* p;
  explicit Region(void* q) : p(q) {}
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
  ~Region() { std::free(p); }
};
void release(void* ctx) { delete static_cast<std::shared_ptr<Region>*>(ctx); }
}  // namespace

// storages moved into one region (sizes rounded up to `align`), or none where the OS gives no huge pages
static bool move_to_region(const std::vector<c10::StorageImpl*>& group, size_t total, size_t align) {
  const size_t page = size_t(2) << 20, len = (total + page - 1) / page * page;
  void* p = nullptr;
  if (posix_memalign(&p, page, len) != 0) return false;
  if (madvise(p, len, MADV_HUGEPAGE) != 0) {
    std::free(p);
    return false;
  }
  auto region = std::make_shared<Region>(p);
  size_t off = 0;
  for (auto* impl : group) {
    char* dst = static_cast<char*>(p) + off;
    std::memcpy(dst, impl->data(), impl->nbytes());  // first touch: the pages are faulted in as huge ones
    impl->set_data_ptr_noswap(at::DataPtr(dst, new std::shared_ptr<Region>(region), &release, at::Device(at::kCPU)));
    off += (impl->nbytes() + align - 1) / align * align;
  }
  return true;
}

int64_t huge_pages(std::vector<torch::Tensor> ts) {
  // regions of up to 256 MiB (or one storage), so that moving needs at most that much memory beside the tensors
  const size_t page = size_t(2) << 20, align = 64, least = size_t(64) << 10, cap = size_t(256) << 20;
  std::vector<c10::StorageImpl*> seen, group;
  size_t total = 0, moved = 0;  // total: the group's bytes with each storage's padding to `align`
  auto flush = [&] {
    if (total >= page && move_to_region(group, total, align))
      for (auto* impl : group) moved += impl->nbytes();
    group.clear(), total = 0;
  };
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().is_cpu(), "huge_pages: CPU tensors");
    auto* impl = t.storage().unsafeGetStorageImpl();
    if (impl->nbytes() < least || impl->data_ptr().get_deleter() == &release ||
        std::find(seen.begin(), seen.end(), impl) != seen.end())
      continue;
    seen.push_back(impl);
    const size_t size = (impl->nbytes() + align - 1) / align * align;
    if (total && total + size > cap) flush();
    group.push_back(impl), total += size;
  }
  flush();
  return int64_t(moved);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "x (M, K) @ w (N, K)^T for a bf16 w, fp32 accumulation, in x's dtype",
        py::arg("x"), py::arg("w"), py::arg("out") = py::none());
  m.def("bf16_set_isa", &bf16_set_isa, "the bf16 matmul's variant: 'auto', 'avx2' or 'avx512_bf16'");
  m.def("bf16_isa", &bf16_isa, "the bf16 matmul's variant: 'avx2' or 'avx512_bf16'");
  m.def("rms_norm", &rms_norm, "Gemma's RMSNorm (fp32, (1 + w)) of each row of x, in x's dtype");
  m.def("decode_attention", &decode_attention, "one query per row over keys read by slot from the KV pools");
  m.def("attention_set_isa", &attention_set_isa, "decode attention's variant: 'auto', 'avx2' or 'avx512'");
  m.def("attention_isa", &attention_isa, "decode attention's variant: 'avx2' or 'avx512'");
  m.def("gelu_mul", &gelu_mul, "gelu_tanh(gate) * up for bf16 gate and up, rounded as PyTorch's two ops round");
  py::class_<DecodePlan>(m, "DecodePlan", "a model's layers for decode_layers")
      .def(py::init<>())
      .def("add", &DecodePlan::add, "append a layer: norms, q_norm, k_norm, weights, qtypes, rows, counts, H, Hkv, "
           "eps, scale, softcap, KV group, rope table")
      .def("__len__", [](const DecodePlan& p) { return p.layers.size(); });
  m.def("decode_layers", &decode_layers, "every decoder layer for single-token decodes over the paged KV pools");
  m.def("huge_pages", &huge_pages, "move CPU tensors' storages into one region backed by 2 MiB pages (THP madvise)");
  m.def("argmax_rows", &argmax_rows, "torch.argmax(x, -1) of an fp32 (S, V) x, exactly");
  m.def("rope_bf16", &rope_bf16, "x * cos + rotate_half(x) * sin for bf16 x (B, H, T, D), cos/sin (B, T, D)");
}
