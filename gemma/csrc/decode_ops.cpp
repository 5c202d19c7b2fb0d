// Fused forms of the small elementwise ops of a Gemma layer, for the same CPUs as bf16_linear.cpp. A decode step
// runs ~3000 PyTorch ops on a few hundred numbers each, and on 2 slow cores each costs ~10 us of dispatch: these
// replace ~11 ops per RMSNorm and ~8 per rotary embedding with one call, computing exactly what those ops compute.
// - rms_norm: Gemma's RMSNorm in fp32, (x * rsqrt(mean(x^2) + eps)) * (1 + w), rounded to x's dtype once; the
//   mean's additions run in another order than PyTorch's (a difference of fp32 rounding before the bf16 one).
// - rope_bf16: x * cos + rotate_half(x) * sin with each product and the sum rounded to bf16, as PyTorch's three
//   bf16 ops round them: bit-identical to gemma.layers.apply_rope.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w);  // bf16_linear.cpp

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

}  // namespace

// x (..., D) float/bf16, w (D,) zero-centred -> Gemma's RMSNorm of each row, in x's dtype.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(w.dim() == 1 && x.size(-1) == w.size(0), "rms_norm: w must be (D,) for x (..., D)");
  auto xf = x.to(at::kFloat).contiguous();
  auto scale = (w.to(at::kFloat) + 1.0).contiguous();  // PyTorch's 1.0 + weight.float(), the same fp32 values
  const int64_t D = xf.size(-1), R = D ? xf.numel() / D : 0;
  auto out = torch::empty_like(xf);
  const float* xp = xf.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + r * D;
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
      float* o = op + r * D;
      for (d = 0; d < D; ++d) o[d] = (row[d] * inv) * sp[d];
    }
  });
  return out.to(x.scalar_type());
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "x (M, K) @ w (N, K)^T for a bf16 w, fp32 accumulation, in x's dtype");
  m.def("rms_norm", &rms_norm, "Gemma's RMSNorm (fp32, (1 + w)) of each row of x, in x's dtype");
  m.def("rope_bf16", &rope_bf16, "x * cos + rotate_half(x) * sin for bf16 x (B, H, T, D), cos/sin (B, T, D)");
}
