// Decode attention over the engine's paged KV pools, read in place: one query per row (a sequence's next token),
// each row attending the keys at its own slots, in fp32 (every bf16 key and value widened exactly), the result
// rounded to bf16 once. For x86 CPUs with AVX2 and, where the CPU has it, AVX-512F (chosen at run time:
// `attention_set_isa`).
//
// Work is split into items of one row, one KV head and a chunk of at most kChunk of the row's keys (the allowed
// slots in their order): each item computes its chunk's scores for the G query heads that share the KV head
// (each key widened once for all of them), their maximum, the softmax numerators exp(s - max) (a vector exp
// within 2 ulp), their sum and the numerators' weighted sum of the values. A second pass merges a row's chunks in
// order (flash-decoding's rescaling by exp(max_c - max)). The chunks are cut by position in the row's own keys, so
// a row's result depends neither on the other rows nor on the thread count (batched decode equals one sequence
// at a time, bit for bit), and one long sequence's keys still spread over every core.
//
// Measured on 2 cores of an Intel Xeon with AVX-512 (2026-12-05), 32 rows of 4 query heads over one KV head of 256
// dims with 300 keys each (the 270M's shapes at 32 streams): 0.40 ms a layer for this kernel's first build, against
// 1.01 ms for the single-pass kernel it replaced (one head and one thread per row and KV head, each key widened once
// per query head, scalar exp); one row of 300 keys: 0.017 ms against 0.060. `python benchmarks/attention.py` gives
// its current figures against PyTorch.
//
// The vector code is written once and compiled twice (namespaces avx2 and avx512, the latter under
// `#pragma GCC target`), by including this file into itself with ATTN_PASS set, as quant.cpp does.
#ifndef ATTN_PASS
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16_common.h"

namespace gemma_attn {

constexpr int64_t kChunk = 64;  // keys per work item: a sequence of 300 keys gives 5 items for 2 cores

constexpr int64_t kAhead = 4;  // keys whose rows are prefetched ahead of the one being scored

struct Pools {  // one KV head's keys and values: row `slot` of the pools at k + slot * ks (bf16, D contiguous)
  const uint16_t* k;
  const uint16_t* v;
  int64_t ks, vs;
};

struct Item {  // keys[first, first + count) of row `row` (indices into its compacted keys), KV head `head`
  int64_t row, head, first, count;
};

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define ATTN_PASS 1
#include __FILE__
#undef ATTN_PASS
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
namespace avx512 {
#define ATTN_PASS 2
#include __FILE__
#undef ATTN_PASS
}  // namespace avx512
#pragma GCC pop_options

bool has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }
int g_isa = -1;  // 1: AVX2, 2: AVX-512; -1: not chosen yet (the best the CPU has)
int isa() {
  if (g_isa < 0) g_isa = has_avx512() ? 2 : 1;
  return g_isa;
}

}  // namespace gemma_attn

using namespace gemma_attn;
using gemma_cpu::AttentionArgs;

void attention_rows(const AttentionArgs& a);

// "avx2" or "avx512": which variant decode attention runs ("auto": the best this CPU has). Raises where the CPU
// lacks it. The two differ only in the order of fp32 additions.
std::string attention_set_isa(const std::string& name) {
  if (name == "auto") g_isa = has_avx512() ? 2 : 1;
  else if (name == "avx2") g_isa = 1;
  else if (name == "avx512") {
    TORCH_CHECK(has_avx512(), "this CPU has no AVX-512F/BW");
    g_isa = 2;
  } else TORCH_CHECK(false, "isa must be 'auto', 'avx2' or 'avx512', got ", name);
  return isa() == 2 ? "avx512" : "avx2";
}

std::string attention_isa() { return isa() == 2 ? "avx512" : "avx2"; }

// q (n, H, D) bf16 (D contiguous), k/v (B, P, Hkv, D) bf16 pools (B == 1: one for every row, B == n: one per row),
// slots/allowed (n, S): row i attends the keys at slots[i, j] where allowed[i, j]. Returns (n, H, D) bf16: the
// softmax over scale * (q . k) (soft-capped to softcap * tanh(s / softcap) when softcap > 0) of the values.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots,
                               torch::Tensor allowed, double scale, double softcap) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
              v.scalar_type() == at::kBFloat16, "decode_attention: bf16 q, k, v");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(),
              "decode_attention: q (n, H, D), k/v (B, P, Hkv, D)");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), Bp = k.size(0), Hkv = k.size(2);
  TORCH_CHECK(k.size(3) == D && D % 8 == 0 && H % Hkv == 0, "decode_attention: head sizes");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: D contiguous");
  TORCH_CHECK(Bp == 1 || Bp == n, "decode_attention: one pool, or one per row");
  TORCH_CHECK(slots.scalar_type() == at::kLong && allowed.scalar_type() == at::kBool && slots.dim() == 2 &&
              slots.size(0) == n && allowed.sizes() == slots.sizes(), "decode_attention: slots/allowed (n, S)");
  auto sl = slots.contiguous();
  auto al = allowed.contiguous();
  auto out = torch::empty({n, H, D}, q.options());
  if (n == 0 || H == 0) return out;
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  attention_rows({reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>()), q.stride(0), q.stride(1), kp, vp,
                  Bp, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), n, H, Hkv, D,
                  sl.data_ptr<int64_t>(), al.data_ptr<bool>(), sl.size(1), scale, softcap,
                  reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>())});
  return out;
}

// decode_attention on raw pointers, its arguments checked by the caller (decode_attention, or decode_layers, which
// runs it for every layer of a step without making a tensor); the result into a.out (n, H, D), contiguous
void attention_rows(const AttentionArgs& a) {
  const int64_t n = a.n, H = a.H, Hkv = a.Hkv, D = a.D, S = a.S, G = H / Hkv, Bp = a.Bp;
  const int64_t* slp = a.slots;
  const bool* alp = a.allowed;
  const uint16_t *kp = a.k, *vp = a.v;
  uint16_t* op = a.out;
  const double scale = a.scale, softcap = a.softcap;

  // each row's keys (its allowed slots, in order), and the work items: (row, KV head, chunk of keys)
  // buffers reused from call to call (a layer's partials are ~2 MB at 32 sequences: fresh ones cost their pages
  // and a zero fill every call); every element read is written first
  thread_local std::vector<int64_t> keys_buf, first_buf;
  thread_local std::vector<Item> items_buf;
  thread_local std::vector<float> partial_buf, qf_buf;
  // the calling thread's (a thread_local named inside the workers' lambda would be the worker's own)
  auto &keys = keys_buf, &first_item = first_buf;
  auto& items = items_buf;
  auto &partial = partial_buf, &qf = qf_buf;
  keys.resize(std::max(keys.size(), size_t(n * S)));
  first_item.resize(n * Hkv + 1);
  items.clear();
  for (int64_t i = 0; i < n; ++i) {
    int64_t nk = 0;
    for (int64_t j = 0; j < S; ++j)
      if (alp[i * S + j]) keys[i * S + nk++] = slp[i * S + j];
    for (int64_t h = 0; h < Hkv; ++h) {
      first_item[i * Hkv + h] = int64_t(items.size());
      for (int64_t c = 0; c < nk; c += kChunk) items.push_back({i, h, c, std::min(kChunk, nk - c)});
    }
  }
  first_item[n * Hkv] = int64_t(items.size());
  // per item: the chunk's maximum and sum per query head, and its weighted values (G, D) in fp32
  const int64_t stride = G * (D + 2);
  partial.resize(std::max(partial.size(), items.size() * stride));
  const bool wide = isa() == 2 && D % 16 == 0;
  const float sc = float(scale), cap = float(softcap);
  // q widened to fp32 once, (n, H, D): every chunk of a row reads its heads from here
  qf.resize(std::max(qf.size(), size_t(n * H * D)));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < H; ++h) {
      const uint16_t* qr = a.q + i * a.qs0 + h * a.qs1;
      for (int64_t d = 0; d < D; ++d) qf[(i * H + h) * D + d] = gemma_cpu::widen(qr[d]);
    }
  const int64_t kb = a.kb, kh = a.kh, vb = a.vb, vh = a.vh, ks = a.ks, vs = a.vs;
  gemma_cpu::pull_chunks(int64_t(items.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> score(G * kChunk);
    for (int64_t t = t0; t < t1; ++t) {
      const Item& it = items[t];
      const int64_t pool = Bp == 1 ? 0 : it.row;
      const Pools pl{kp + pool * kb + it.head * kh, vp + pool * vb + it.head * vh, ks, vs};
      const float* q_heads = qf.data() + (it.row * H + it.head * G) * D;
      float* part = partial.data() + t * stride;
      const int64_t* chunk_keys = keys.data() + it.row * S + it.first;
      if (wide) avx512::chunk(q_heads, pl, chunk_keys, it.count, G, D, sc, cap, score.data(), part);
      else avx2::chunk(q_heads, pl, chunk_keys, it.count, G, D, sc, cap, score.data(), part);
    }
  });
  // merge each (row, KV head)'s chunks in order: rescale to the largest maximum, sum, divide, round to bf16
  at::parallel_for(0, n * Hkv, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> acc(D);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t i = w / Hkv, h = w % Hkv, i0 = first_item[w], i1 = first_item[w + 1];
      for (int64_t g = 0; g < G; ++g) {
        uint16_t* o = op + (i * H + h * G + g) * D;
        if (i1 == i0) {  // no key allowed: zeros
          std::fill(o, o + D, uint16_t(0));
          continue;
        }
        float mx = -INFINITY;
        for (int64_t t = i0; t < i1; ++t) mx = std::max(mx, partial[t * stride + g * (D + 2)]);
        float total = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = i0; t < i1; ++t) {
          const float* p = partial.data() + t * stride + g * (D + 2);
          const float f = i1 - i0 == 1 ? 1.f : std::exp(p[0] - mx);  // one chunk: its own values, unscaled
          total += p[1] * f;
          for (int64_t d = 0; d < D; ++d) acc[d] += p[2 + d] * f;
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < D; ++d) o[d] = gemma_cpu::to_bf16(acc[d] * inv);
      }
    }
  });
}

#else  // ATTN_PASS: the vector code of one instruction set

#if ATTN_PASS == 1
using V = __m256;
constexpr int64_t W = 8;   // fp32 lanes
constexpr int DN = 2;      // vectors of values per head held in registers (16 ymm in all)
constexpr int64_t GS = 4;  // query heads scored together (2 accumulators each)
inline V zero() { return _mm256_setzero_ps(); }
inline V set1(float f) { return _mm256_set1_ps(f); }
inline V loadf(const float* p) { return _mm256_loadu_ps(p); }
inline void storef(float* p, V a) { _mm256_storeu_ps(p, a); }
inline V widen(const uint16_t* p) {  // W bf16 -> W fp32, exactly
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline float reduce(V a) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 s = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline V round_int(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V pow2(V n) {  // 2^n for integral n in [-126, 127]
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#else
using V = __m512;
constexpr int64_t W = 16;
constexpr int DN = 4;      // 4 heads x 4 vectors of 16 values: 16 of the 32 zmm registers
constexpr int64_t GS = 8;  // gemma-2b's 8 query heads per KV head scored together: 16 accumulators
inline V zero() { return _mm512_setzero_ps(); }
inline V set1(float f) { return _mm512_set1_ps(f); }
inline V loadf(const float* p) { return _mm512_loadu_ps(p); }
inline void storef(float* p, V a) { _mm512_storeu_ps(p, a); }
inline V widen(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline float reduce(V a) { return _mm512_reduce_add_ps(a); }
inline V round_int(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V pow2(V n) { return _mm512_scalef_ps(set1(1.0f), n); }
#endif

// exp(x) for x <= 0 (a score minus its chunk's maximum): Cephes' expf, exp(r) * 2^n with |r| <= ln2 / 2 and a
// degree-6 polynomial, within 2 ulp of the true value; below -87 (exp < 2^-125, nothing next to the maximum's 1)
// it returns exp(-87).
inline V exp_neg(V x) {
  x = vmax(set1(-87.0f), x);  // the second operand wins for NaN: a NaN score stays NaN
  const V n = round_int(mul(x, set1(1.44269504088896341f)));
  V r = fma(n, set1(-0.693359375f), x);  // x - n ln2, ln2 split in two for accuracy
  r = fma(n, set1(2.12194440e-4f), r);
  V p = set1(1.9875691500e-4f);
  p = fma(p, r, set1(1.3981999507e-3f));
  p = fma(p, r, set1(8.3334519073e-3f));
  p = fma(p, r, set1(4.1665795894e-2f));
  p = fma(p, r, set1(1.6666665459e-1f));
  p = fma(p, r, set1(5.0000001201e-1f));
  p = fma(p, mul(r, r), add(r, set1(1.0f)));
  return mul(p, pow2(n));
}

// Scores of `nk` keys for GN query heads from head g0: two chains of FMAs per head (alternate vectors of D), each
// key's vectors widened once for all GN heads.
template <int GN>
inline void scores(const float* q, const Pools& pl, const int64_t* keys, int64_t nk, int64_t g0, int64_t D, float sc,
                   float* score) {
  for (int64_t j = 0; j < nk; ++j) {
    const uint16_t* kr = pl.k + keys[j] * pl.ks;
    if (g0 == 0) {  // the pools are rows scattered by slot: fetch the next keys and this key's values ahead
      const uint16_t* kn = pl.k + keys[std::min(j + kAhead, nk - 1)] * pl.ks;
      const uint16_t* vr = pl.v + keys[j] * pl.vs;
      for (int64_t d = 0; d < D; d += 32) {
        _mm_prefetch((const char*)(kn + d), _MM_HINT_T0);
        _mm_prefetch((const char*)(vr + d), _MM_HINT_T1);
      }
    }
    V a[GN][2];
    for (int g = 0; g < GN; ++g) a[g][0] = a[g][1] = zero();
    for (int64_t d = 0; d < D; d += 2 * W) {
      const V k0 = widen(kr + d);
      const bool two = d + W < D;
      const V k1 = two ? widen(kr + d + W) : zero();
      for (int g = 0; g < GN; ++g) {
        const float* qg = q + (g0 + g) * D + d;
        a[g][0] = fma(k0, loadf(qg), a[g][0]);
        if (two) a[g][1] = fma(k1, loadf(qg + W), a[g][1]);
      }
    }
    for (int g = 0; g < GN; ++g) score[(g0 + g) * kChunk + j] = reduce(add(a[g][0], a[g][1])) * sc;
  }
}

// acc[g][d .. d + W * DN) = sum over the keys, in order, of e[g][j] * v_j[d ..] for GN heads from g0, held in
// registers while every key passes.
template <int GN, int N>
inline void values(const Pools& pl, const int64_t* keys, int64_t nk, const float* e, int64_t g0, int64_t d,
                   float* acc, int64_t D) {
  V a[GN][N];
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < N; ++c) a[g][c] = zero();
  for (int64_t j = 0; j < nk; ++j) {
    const uint16_t* vr = pl.v + keys[j] * pl.vs + d;
    V vv[N];
    for (int c = 0; c < N; ++c) vv[c] = widen(vr + W * c);
    for (int g = 0; g < GN; ++g) {
      const V w = set1(e[(g0 + g) * kChunk + j]);
      for (int c = 0; c < N; ++c) a[g][c] = fma(w, vv[c], a[g][c]);
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < N; ++c) storef(acc + (g0 + g) * (D + 2) + d + W * c, a[g][c]);
}

template <int GN>
inline void values_all(const Pools& pl, const int64_t* keys, int64_t nk, const float* e, int64_t g0, float* acc,
                       int64_t D) {
  int64_t d = 0;
  for (; d + W * DN <= D; d += W * DN) values<GN, DN>(pl, keys, nk, e, g0, d, acc, D);
  for (; d < D; d += W) values<GN, 1>(pl, keys, nk, e, g0, d, acc, D);
}

// One work item: keys[0, nk) (nk <= kChunk) of one KV head against its G query heads q (G, D) fp32. Writes, per
// head g, part[g * (D + 2)] = the scores' maximum, [+ 1] = the sum of exp(s - max), [+ 2 ..] = the weighted values.
// D % W == 0.
void chunk(const float* q, const Pools& pl, const int64_t* keys, int64_t nk, int64_t G, int64_t D, float sc,
           float cap, float* score, float* part) {
  for (int64_t g0 = 0; g0 < G;) {  // blocks of GS, 4, 3, 2 or 1 heads
    const int64_t gn = G - g0;
    if constexpr (GS == 8) {
      if (gn >= 8) {
        scores<8>(q, pl, keys, nk, g0, D, sc, score);
        g0 += 8;
        continue;
      }
    }
    if (gn >= 4) scores<4>(q, pl, keys, nk, g0, D, sc, score), g0 += 4;
    else if (gn == 3) scores<3>(q, pl, keys, nk, g0, D, sc, score), g0 += 3;
    else if (gn == 2) scores<2>(q, pl, keys, nk, g0, D, sc, score), g0 += 2;
    else scores<1>(q, pl, keys, nk, g0, D, sc, score), g0 += 1;
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = score + g * kChunk;
    if (cap > 0)
      for (int64_t j = 0; j < nk; ++j) s[j] = cap * std::tanh(s[j] / cap);
    float mx = s[0];
    for (int64_t j = 1; j < nk; ++j) mx = std::max(mx, s[j]);
    const V m = set1(mx);
    V total = zero();
    int64_t j = 0;
    for (; j + W <= nk; j += W) {
      const V e = exp_neg(sub(loadf(s + j), m));
      storef(s + j, e);
      total = add(total, e);
    }
    if (j < nk) {  // the tail, through a padded copy whose padding adds zeros
      alignas(64) float t[W];
      for (int64_t l = 0; l < W; ++l) t[l] = j + l < nk ? s[j + l] - mx : 0.f;
      storef(t, exp_neg(loadf(t)));
      for (int64_t l = 0; l < W; ++l) {
        if (j + l < nk) s[j + l] = t[l];
        else t[l] = 0.f;
      }
      total = add(total, loadf(t));
    }
    part[g * (D + 2)] = mx;
    part[g * (D + 2) + 1] = reduce(total);
  }
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const int64_t gn = std::min<int64_t>(4, G - g0);
    float* acc = part + 2;
    if (gn == 4) values_all<4>(pl, keys, nk, score, g0, acc, D);
    else if (gn == 3) values_all<3>(pl, keys, nk, score, g0, acc, D);
    else if (gn == 2) values_all<2>(pl, keys, nk, score, g0, acc, D);
    else values_all<1>(pl, keys, nk, score, g0, acc, D);
  }
}

#endif  // ATTN_PASS
