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

}  // namespace gemma_cpu
