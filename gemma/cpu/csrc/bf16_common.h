// What the bf16 and the GGUF kernels share: bf16 rounding and widening, the output writer, and the threads' chunking.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

namespace gemma_cpu {

inline uint16_t to_bf16(float f) {  // round to nearest even, as c10::BFloat16 does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float widen(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Out {  // y (M, N): bf16, or fp32 (`round`: the fp32 value of the bf16 result, as x's dtype then .float())
  float* f;
  uint16_t* h;
  int64_t N;
  bool round;
  Out at_row(int64_t m) const {  // the same output from row m on
    return {f ? f + m * N : nullptr, h ? h + m * N : nullptr, N, round};
  }
  void put(int64_t m, int64_t n, float v) const {
    if (h) h[m * N + n] = to_bf16(v);
    else f[m * N + n] = round ? widen(to_bf16(v)) : v;
  }
};

// f(b0, b1) over [0, n) in chunks of `chunk`, the threads pulling chunks from a shared counter instead of taking
// fixed shares: on a machine whose cores the OS also gives to other processes (a Serve node's proxy and ingress
// next to the model), a preempted thread delays only the chunk it holds while the others take the rest, instead
// of every thread waiting at the end for its fixed share. Which thread computes a row never changes the row.
template <typename F>
void pull_chunks(int64_t n, int64_t chunk, const F& f) {
  std::atomic<int64_t> next{0};
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    for (int64_t b; (b = next.fetch_add(chunk)) < n;) f(b, std::min(n, b + chunk));
  });
}

// f(b0, b1) over [0, n) for kernels bound by streaming memory: each thread owns one contiguous share and walks it
// in chunks of `chunk` from its start (one sequential stream, which the prefetchers follow from chunk to chunk);
// a thread done with its share takes the back half (at least a chunk) of what is left of the fullest share.
// Pulling every chunk from one counter (pull_chunks) starts a new stream at each chunk: on 2 cores of an Intel Xeon
// (2026-12-05) the 270M's 72 layer matrices took ~7% longer one after another, and a single-stream decode step
// ~0.8 ms longer (bf16 and GGUF alike). Taking from the others keeps pull_chunks' tolerance of a preempted thread.
// Which thread computes a row never changes the row.
template <typename F>
void stream_chunks(int64_t n, int64_t chunk, const F& f) {
  if (n <= 0) return;
  const int64_t tasks = std::min<int64_t>(std::min<int64_t>(at::get_num_threads(), 64), (n + chunk - 1) / chunk);
  if (n >= (int64_t(1) << 31)) return pull_chunks(n, chunk, f);  // beyond the packed ranges' 32 bits
  if (tasks <= 1) {
    for (int64_t b = 0; b < n; b += chunk) f(b, std::min(n, b + chunk));
    return;
  }
  struct alignas(64) Share {
    std::atomic<uint64_t> range;  // lo << 32 | hi: what is left of the share
  };
  Share shares[64];
  for (int64_t t = 0; t < tasks; ++t) {
    const uint64_t lo = uint64_t(n * t / tasks), hi = uint64_t(n * (t + 1) / tasks);
    shares[t].range.store(lo << 32 | hi, std::memory_order_relaxed);
  }
  auto take = [&](int64_t t, bool from_end, int64_t& b0, int64_t& b1) {
    uint64_t r = shares[t].range.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t lo = int64_t(r >> 32), hi = int64_t(r & 0xFFFFFFFFu);
      if (lo >= hi) return false;
      b0 = from_end ? std::max(lo, hi - std::max(chunk, (hi - lo) / 2 / 4 * 4)) : lo;
      b1 = from_end ? hi : std::min(hi, lo + chunk);
      const uint64_t left = from_end ? uint64_t(lo) << 32 | uint64_t(b0) : uint64_t(b1) << 32 | uint64_t(hi);
      if (shares[t].range.compare_exchange_weak(r, left, std::memory_order_relaxed)) return true;
    }
  };
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    int64_t b0, b1;
    for (int64_t t = t0; t < t1; ++t)
      while (take(t, false, b0, b1)) f(b0, b1);
    for (;;) {  // the others' shares, from their ends, the fullest first
      int64_t victim = -1, most = 0;
      for (int64_t t = 0; t < tasks; ++t) {
        const uint64_t r = shares[t].range.load(std::memory_order_relaxed);
        const int64_t left = int64_t(r & 0xFFFFFFFFu) - int64_t(r >> 32);
        if (left > most) most = left, victim = t;
      }
      if (victim < 0) return;
      if (take(victim, true, b0, b1)) f(b0, b1);
    }
  });
}

// decode attention's inputs as pointers and strides (attention.cpp: attention_rows): q (n, H, D) at q + i * qs0 +
// h * qs1; the KV pools (Bp, P, Hkv, D), Bp 1 or n; slots/allowed (n, S) contiguous; out (n, H, D) contiguous
struct AttentionArgs {
  const uint16_t* q;
  int64_t qs0, qs1;
  const uint16_t *k, *v;
  int64_t Bp, kb, ks, kh, vb, vs, vh;
  int64_t n, H, Hkv, D;
  const int64_t* slots;
  const bool* allowed;
  int64_t S;
  double scale, softcap;
  uint16_t* out;
};

}  // namespace gemma_cpu
