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
#include <vector>

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> out);  // bf16_linear.cpp
std::string bf16_set_isa(const std::string& name, int64_t prefetch);  // bf16_linear.cpp
std::string bf16_isa();
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, c10::optional<torch::Tensor> out,
                           int64_t dense_rows);  // quant.cpp
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots,
                               torch::Tensor allowed, double scale, double softcap);  // attention.cpp
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

// PyTorch's 1.0 + weight.float() for a norm's weight w (D,): the same fp32 values, made here (two ATen ops per call
// cost more than the norm)
static std::vector<float> norm_scale(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 1, "rms_norm: w must be (D,)");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, "rms_norm: fp32 or bf16 w");
  auto wc = w.contiguous();
  const int64_t D = w.size(0);
  std::vector<float> scale(D);
  for (int64_t d = 0; d < D; ++d)
    scale[d] = (w.scalar_type() == at::kFloat ? wc.data_ptr<float>()[d]
                                              : from_bf16(reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>())[d])) + 1.0f;
  return scale;
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
  const std::vector<float> scale = norm_scale(w);
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

// The residual step of a sandwich-normed layer: x + rms_norm(h, w) for bf16 x, h (n, C), the norm rounded to bf16
// before the addition, as `x + norm(h)` rounds it; with `next`, also rms_norm of the sum with that weight (the
// following norm). {sum, the next norm or an undefined tensor}: what rms_norm and at::add give, in one pass.
static std::pair<torch::Tensor, torch::Tensor> add_norm(const torch::Tensor& x, const torch::Tensor& h,
                                                        const torch::Tensor& w, const torch::Tensor* next,
                                                        double eps) {
  TORCH_CHECK(x.dim() == 2 && h.sizes() == x.sizes() && x.scalar_type() == at::kBFloat16 &&
              h.scalar_type() == at::kBFloat16, "decode_layer: the residual and the output (n, C) bf16");
  const int64_t n = x.size(0), D = x.size(1);
  auto xc = x.contiguous(), hc = h.contiguous();
  const std::vector<float> s1 = norm_scale(w), s2 = next ? norm_scale(*next) : std::vector<float>();
  TORCH_CHECK(int64_t(s1.size()) == D && (!next || int64_t(s2.size()) == D), "decode_layer: norm weights (C,)");
  auto sum = torch::empty_like(xc);
  auto normed = next ? torch::empty_like(xc) : torch::Tensor();
  const auto* xp = static_cast<const uint16_t*>(xc.data_ptr());
  const auto* hp = static_cast<const uint16_t*>(hc.data_ptr());
  auto* sp = static_cast<uint16_t*>(sum.data_ptr());
  std::vector<float> row(D);
  std::vector<uint16_t> hn(D);
  for (int64_t o = 0; o < n * D; o += D) {
    widen_row(hp + o, nullptr, D, row.data());
    norm_row(row.data(), D, s1.data(), eps, hn.data(), nullptr);
    for (int64_t d = 0; d < D; ++d) sp[o + d] = to_bf16(from_bf16(xp[o + d]) + from_bf16(hn[d]));
    if (next) {
      widen_row(sp + o, nullptr, D, row.data());
      norm_row(row.data(), D, s2.data(), eps, static_cast<uint16_t*>(normed.data_ptr()) + o, nullptr);
    }
  }
  return {sum, normed};
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
  // ATen's own choice of vector width: AVX512 where the CPU has AVX-512 F, BW, VL and DQ, unless ATEN_CPU_CAPABILITY
  // names another
  static const bool wide = [] {
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    if (env && *env && std::string(env) != "avx512") return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(I, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (wide) gelu_mul_avx512(gp + r * gs, upp + r * us, op + r * I, I);
      else gelu_mul_avx2(gp + r * gs, upp + r * us, op + r * I, I);
    }
  });
  return out.view(gate.sizes());
}

// x (B, H, T, D) bf16, cos/sin (B, T, D) bf16 -> the rotated x (B, H, T, D), contiguous.
torch::Tensor rope_bf16(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 &&
              sin.scalar_type() == at::kBFloat16, "rope_bf16: bf16 tensors");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
              cos.size(1) == x.size(2) && cos.size(2) == x.size(3) && x.size(3) % 2 == 0, "rope_bf16: shapes");
  auto xc = x.contiguous();
  auto cc = cos.contiguous(), sc = sin.contiguous();
  const int64_t B = xc.size(0), H = xc.size(1), T = xc.size(2), D = xc.size(3), half = D / 2;
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
      for (int64_t d = 0; d < D; ++d) {
        const float rot = d < half ? -from_bf16(row[d + half]) : from_bf16(row[d - half]);
        const float a = round_bf16(from_bf16(row[d]) * from_bf16(c[d]));
        const float bb = round_bf16(rot * from_bf16(s[d]));
        o[d] = to_bf16(a + bb);
      }
    }
  });
  return out;
}

// x w^T by the product gemma.cpu.fastpath chose for w at this row count. bf16 w (qtype 0): ours below `rows`,
// PyTorch's (oneDNN, native bf16 / AMX where the CPU has them) from there on; GGUF blocks of ggml type qtype
// (quant.cpp): integer products below `rows`, dequantized from there on; exactly as the unfused module computes it.
static torch::Tensor product(const torch::Tensor& x, const torch::Tensor& w, int64_t qtype, int64_t rows) {
  if (qtype) return quant_linear(x, w, qtype, c10::nullopt, rows);
  return x.size(0) >= rows ? at::linear(x, w) : linear_bf16(x, w, c10::nullopt);
}

// weights[first, first + count): one projection's products, their outputs side by side (fastpath.run_parts)
static torch::Tensor products(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                              const std::vector<int64_t>& qtypes, const std::vector<int64_t>& rows, size_t first,
                              size_t count) {
  if (count == 1) return product(x, weights[first], qtypes[first], rows[first]);
  std::vector<torch::Tensor> ys;
  for (size_t i = first; i < first + count; ++i) ys.push_back(product(x, weights[i], qtypes[i], rows[i]));
  return at::cat(ys, 1);
}

// pool[slots[i]] = rows[i] for rows (n, Hkv, D) into a pool (P, Hkv, D), both bf16 with D contiguous, row i head h
// of `rows` at its data + i * si + h * sh: the module's indexed assignment as plain row copies (index_copy_ and the
// views it takes cost ~5 us of dispatch per call at one sequence)
static void write_kv(torch::Tensor& pool, const torch::Tensor& slots, const torch::Tensor& rows, int64_t Hkv,
                     int64_t D, int64_t si, int64_t sh) {
  TORCH_CHECK(pool.dim() == 3 && pool.size(1) == Hkv && pool.size(2) == D && pool.stride(2) == 1 &&
              pool.scalar_type() == rows.scalar_type() && pool.element_size() == 2,
              "decode_layer: KV pools (P, Hkv, D) of the layer's heads, in the activations' 16-bit dtype");
  const int64_t n = slots.numel(), P = pool.size(0);
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "decode_layer: write slots (n,) int64");
  const int64_t* s = slots.data_ptr<int64_t>();
  auto* dst = static_cast<uint16_t*>(pool.data_ptr());
  const auto* src = static_cast<const uint16_t*>(rows.data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(s[i] >= 0 && s[i] < P, "decode_layer: write slot ", s[i], " out of [0, ", P, ")");
    for (int64_t h = 0; h < Hkv; ++h)
      std::memcpy(dst + s[i] * pool.stride(0) + h * pool.stride(1), src + i * si + h * sh, D * 2);
  }
}

// One decoder layer's constants for decode_layer: its norms ({input, post_attention, pre_feedforward,
// post_feedforward} with Gemma 2/3's sandwich norms, else {input, post_attention}: Gemma 1's post_attention is the
// MLP's norm), Gemma 3's per-head q/k norms, its products (q/k/v: counts[0] of them, o, gate/up: counts[1], and
// down, in that order, each with its ggml type (0: bf16) and the row count from which it takes the batched product),
// its head counts and attention settings, and which of a step's slot tables (its KV group) and rope tables it reads.
struct DecodeLayerPlan {
  std::vector<torch::Tensor> norms;
  c10::optional<torch::Tensor> q_norm, k_norm;
  std::vector<torch::Tensor> weights;
  std::vector<int64_t> qtypes, rows, counts;
  int64_t H, Hkv;
  double eps, scale, softcap;
  int64_t group, rope;
};

// A model's layers for decode_layers, gathered once (gemma.cpu.fastpath): one call runs every layer of a step, where
// a Python loop of one call per layer spent ~25 us a layer between the layers' kernels.
struct DecodePlan {
  std::vector<DecodeLayerPlan> layers;
  void add(std::vector<torch::Tensor> norms, c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
           std::vector<torch::Tensor> weights, std::vector<int64_t> qtypes, std::vector<int64_t> rows,
           std::vector<int64_t> counts, int64_t H, int64_t Hkv, double eps, double scale, double softcap,
           int64_t group, int64_t rope) {
    TORCH_CHECK(norms.size() == 2 || norms.size() == 4, "decode plan: 2 or 4 norms");
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "decode plan: both qk norms or neither");
    TORCH_CHECK(counts.size() == 2 && counts[0] >= 1 && counts[1] >= 1 &&
                weights.size() == size_t(counts[0] + counts[1] + 2) && qtypes.size() == weights.size() &&
                rows.size() == weights.size(), "decode plan: the products of qkv, o, gate_up and down");
    TORCH_CHECK(group >= 0 && rope >= 0, "decode plan: group and rope table indices");
    layers.push_back({std::move(norms), std::move(q_norm), std::move(k_norm), std::move(weights), std::move(qtypes),
                      std::move(rows), std::move(counts), H, Hkv, eps, scale, softcap, group, rope});
  }
};

// One Gemma decoder layer for n single-token decodes over the engine's paged KV cache: what
// gemma.model.GemmaDecoderLayer.forward computes with the engine's PagedBatch when every sequence of a step decodes
// one token, without ~40 Python-level ops (~5 ms of a 270M decode step on 2 cores). It calls the same kernels and
// ATen ops (its KV writes plain row copies), in the same order, on the same values, so it is the unfused path bit
// for bit (tests/gemma/test_cpu_fastpath.py). x (n, C) bf16; the pools (P, Hkv, D); write_slots (n,) where this
// step's keys go; slots/allowed (n, S): the keys each row attends; cos/sin (1, n, D). Returns the layer's output.
static torch::Tensor decode_layer(torch::Tensor x, const DecodeLayerPlan& L, torch::Tensor k_pool,
                                  torch::Tensor v_pool, const torch::Tensor& write_slots, const torch::Tensor& slots,
                                  const torch::Tensor& allowed, const torch::Tensor& cos, const torch::Tensor& sin) {
  const auto &norms = L.norms, &weights = L.weights;
  const auto &qtypes = L.qtypes, &rows = L.rows, &counts = L.counts;
  const int64_t H = L.H, Hkv = L.Hkv;
  const double eps = L.eps;
  TORCH_CHECK(x.dim() == 2, "decode_layer: x (n, C)");
  const size_t nqkv = counts[0], ngu = counts[1];
  const int64_t n = x.size(0), D = k_pool.size(-1);
  auto qkv = products(rms_norm(x, norms[0], eps), weights, qtypes, rows, 0, nqkv);  // (n, (H + 2 Hkv) D)
  TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * D && qkv.stride(1) == 1, "decode_layer: qkv weight rows");
  // the module's views of q (1, H, n, D), k (1, Hkv, n, D) and v (n, Hkv, D), each one op
  const int64_t row = qkv.stride(0), at0 = qkv.storage_offset();
  auto q = qkv.as_strided({1, H, n, D}, {n * row, D, row, 1}, at0);
  auto k = qkv.as_strided({1, Hkv, n, D}, {n * row, D, row, 1}, at0 + H * D);
  auto v = qkv.as_strided({n, Hkv, D}, {row, D, 1}, at0 + (H + Hkv) * D);
  if (L.q_norm.has_value()) {
    q = rms_norm(q, *L.q_norm, eps);
    k = rms_norm(k, *L.k_norm, eps);
  }
  q = rope_bf16(q, cos, sin);
  k = rope_bf16(k, cos, sin);
  TORCH_CHECK(write_slots.numel() == n, "decode_layer: one write slot per row");
  // the module's pool[slots] = ...: the same values. k is (1, Hkv, n, D) contiguous; v a view into qkv
  write_kv(k_pool, write_slots, k, Hkv, D, D, n * D);
  write_kv(v_pool, write_slots, v, Hkv, D, row, D);
  auto o = decode_attention(q[0].transpose(0, 1), k_pool.unsqueeze(0), v_pool.unsqueeze(0), slots, allowed, L.scale,
                            L.softcap);  // (n, H, D)
  auto h = product(o.view({n, H * D}), weights[nqkv], qtypes[nqkv], rows[nqkv]);
  auto mlp = [&](const torch::Tensor& in) {
    auto gu = products(in, weights, qtypes, rows, nqkv + 1, ngu);
    const int64_t I = gu.size(1) / 2;
    const size_t d = nqkv + 1 + ngu;
    return product(gelu_mul(gu.narrow(1, 0, I), gu.narrow(1, I, I)), weights[d], qtypes[d], rows[d]);
  };
  if (norms.size() == 4) {  // x + norm(h), then the next norm of that, in one pass
    auto [sum, normed] = add_norm(x, h, norms[1], &norms[2], eps);
    return add_norm(sum, mlp(normed), norms[3], nullptr, eps).first;
  }
  x = at::add(x, h);
  return at::add(x, mlp(rms_norm(x, norms[1], eps)));
}

// Every layer of `plan` for a step of n single-token decodes x (n, C): layer i reads the pools k_pools[i] and
// v_pools[i], its KV group's write_slots, slots and allowed, and its rope type's cos and sin.
torch::Tensor decode_layers(const DecodePlan& plan, torch::Tensor x, const std::vector<torch::Tensor>& k_pools,
                            const std::vector<torch::Tensor>& v_pools, const std::vector<torch::Tensor>& write_slots,
                            const std::vector<torch::Tensor>& slots, const std::vector<torch::Tensor>& allowed,
                            const std::vector<torch::Tensor>& cos, const std::vector<torch::Tensor>& sin) {
  const size_t n = plan.layers.size();
  TORCH_CHECK(k_pools.size() == n && v_pools.size() == n, "decode_layers: one k and one v pool per layer");
  TORCH_CHECK(slots.size() == write_slots.size() && allowed.size() == write_slots.size() && sin.size() == cos.size(),
              "decode_layers: write_slots, slots and allowed per KV group; cos and sin per rope type");
  for (size_t i = 0; i < n; ++i) {
    const DecodeLayerPlan& L = plan.layers[i];
    TORCH_CHECK(size_t(L.group) < write_slots.size() && size_t(L.rope) < cos.size(),
                "decode_layers: layer ", i, " reads KV group ", L.group, " and rope table ", L.rope);
    x = decode_layer(x, L, k_pools[i], v_pools[i], write_slots[L.group], slots[L.group], allowed[L.group],
                     cos[L.rope], sin[L.rope]);
  }
  return x;
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
