// A fused mixture-of-experts SwiGLU for XLA:CPU as an XLA FFI custom call: the probe behind
// benchmarks/native_moe.py, which builds and measures it against the engine's XLA path. It asks what
// closing the MoE gap to vLLM's CPU kernels would take; the engine does not use it.
//
// x [T, H] and the expert weights (w_gate, w_up [E, H, F], w_down [E, F, H]) are float32 or bfloat16;
// experts [T, K] int32 (ids outside [0, E), another shard's, contribute nothing); weights [T, K] float32;
// the result [T, H] is float32. Two phases over the assignments sorted by expert, each parallel over
// XLA's intra-op thread pool: (1) h = silu(x W_gate) * (x W_up) per (expert, column block of F);
// (2) out += weight * h W_down per column block of H, so every output element has one writer and the
// result does not depend on the thread count. A register-blocked microkernel (GCC vector extensions,
// 64-byte vectors for AVX-512, 32-byte for AVX2) streams each weight block once per block of rows.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#ifndef SLJ_VEC_BYTES
#define SLJ_VEC_BYTES 64
#endif
constexpr int kLanes = SLJ_VEC_BYTES / 4;
typedef float vf __attribute__((vector_size(SLJ_VEC_BYTES)));
typedef uint16_t vh __attribute__((vector_size(SLJ_VEC_BYTES / 2)));
typedef uint32_t vu __attribute__((vector_size(SLJ_VEC_BYTES)));
#if SLJ_VEC_BYTES == 64
constexpr int kMR = 6, kNV = 4;
#else
constexpr int kMR = 4, kNV = 3;
#endif
constexpr int kNB = kNV * kLanes;

static inline vf load_w(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
static inline vf load_w(const uint16_t* p) {
  vh h; std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf f; std::memcpy(&f, &u, sizeof f); return f;
}
static inline float to_f32(float v) { return v; }
static inline float to_f32(uint16_t v) { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; }

// c[r][0:kNB] = sum_k a[r][k] * b[k * ldb + 0:kNB], r < MR.
template <typename W, int MR>
static inline void micro(const float* const* a, const W* b, int64_t ldb, int64_t K, float* c) {
  vf acc[MR][kNV];
  for (int r = 0; r < MR; ++r) for (int j = 0; j < kNV; ++j) acc[r][j] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const W* row = b + k * ldb;
    vf w[kNV];
    for (int j = 0; j < kNV; ++j) w[j] = load_w(row + j * kLanes);
    for (int r = 0; r < MR; ++r) {
      vf x = vf{} + a[r][k];
      for (int j = 0; j < kNV; ++j) acc[r][j] += x * w[j];
    }
  }
  for (int r = 0; r < MR; ++r) std::memcpy(c + r * kNB, acc[r], sizeof acc[r]);
}

template <typename W>
static void block(const float* const* a, int mr, const W* b, int64_t ldb, int64_t K, int n, float* c) {
  if (n == kNB) {
    switch (mr) {
      case 1: return micro<W, 1>(a, b, ldb, K, c);
      case 2: return micro<W, 2>(a, b, ldb, K, c);
      case 3: if constexpr (kMR >= 3) return micro<W, 3>(a, b, ldb, K, c); break;
      case 4: if constexpr (kMR >= 4) return micro<W, 4>(a, b, ldb, K, c); break;
      case 5: if constexpr (kMR >= 5) return micro<W, 5>(a, b, ldb, K, c); break;
      case 6: if constexpr (kMR >= 6) return micro<W, 6>(a, b, ldb, K, c); break;
    }
  }
  for (int r = 0; r < mr; ++r) {
    float* cr = c + r * kNB;
    for (int j = 0; j < n; ++j) cr[j] = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      float x = a[r][k];
      const W* row = b + k * ldb;
      for (int j = 0; j < n; ++j) cr[j] += x * to_f32(row[j]);
    }
  }
}

template <typename Fn>
static void parallel_for(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  if (n <= 0) return;
  struct State { std::atomic<int64_t> next{0}, done{0}; };
  auto st = std::make_shared<State>();
  const Fn* f = &fn;
  auto work = [st, n, f]() {
    for (int64_t i; (i = st->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      (*f)(i);  // only reached while the caller waits below
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

template <typename T>
static ffi::Error Run(ffi::ThreadPool& pool, const T* x, const int32_t* experts, const float* weights,
                      const T* wg, const T* wu, const T* wd, float* out, int64_t tokens, int64_t top_k,
                      int64_t E, int64_t H, int64_t F) {
  const int64_t A = tokens * top_k;
  // Counting sort of the assignments by expert; ids outside [0, E) (another shard's) are skipped.
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t i = 0; i < A; ++i) if (experts[i] >= 0 && experts[i] < E) ++start[experts[i] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> order(start[E]);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < A; ++i) if (experts[i] >= 0 && experts[i] < E) order[fill[experts[i]]++] = i;
  }
  const int64_t R = start[E];
  std::vector<float> xf;
  std::vector<const float*> xrow(R);
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t s = 0; s < R; ++s) xrow[s] = x + (order[s] / top_k) * H;
  } else {
    xf.resize(tokens * H);
    for (int64_t i = 0; i < tokens * H; ++i) xf[i] = to_f32(x[i]);
    for (int64_t s = 0; s < R; ++s) xrow[s] = xf.data() + (order[s] / top_k) * H;
  }
  std::vector<float> h(R * F);
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e) if (start[e + 1] > start[e]) active.push_back(e);
  const int64_t fblocks = (F + kNB - 1) / kNB;
  // Phase 1: h = silu(x @ wg) * (x @ wu), one (expert, column block of F) per item.
  parallel_for(pool, int64_t(active.size()) * fblocks, [&](int64_t item) {
    int64_t e = active[item / fblocks], f0 = (item % fblocks) * kNB;
    int n = int(std::min<int64_t>(kNB, F - f0));
    alignas(64) float g[kMR * kNB], u[kMR * kNB];
    for (int64_t r0 = start[e]; r0 < start[e + 1]; r0 += kMR) {
      int mr = int(std::min<int64_t>(kMR, start[e + 1] - r0));
      block(xrow.data() + r0, mr, wg + e * H * F + f0, F, H, n, g);
      block(xrow.data() + r0, mr, wu + e * H * F + f0, F, H, n, u);
      for (int r = 0; r < mr; ++r) {
        float* hr = h.data() + (r0 + r) * F + f0;
        const float* gr = g + r * kNB; const float* ur = u + r * kNB;
#pragma omp simd
        for (int j = 0; j < n; ++j) hr[j] = gr[j] / (1.f + std::exp(-gr[j])) * ur[j];
      }
    }
  });
  std::memset(out, 0, sizeof(float) * tokens * H);
  std::vector<const float*> hrow(R);
  for (int64_t s = 0; s < R; ++s) hrow[s] = h.data() + s * F;
  const int64_t hblocks = (H + kNB - 1) / kNB;
  // Phase 2: out[token] += weight * (h @ wd), one column block of H per item (disjoint outputs).
  parallel_for(pool, hblocks, [&](int64_t hb) {
    int64_t c0 = hb * kNB;
    int n = int(std::min<int64_t>(kNB, H - c0));
    alignas(64) float d[kMR * kNB];
    for (int64_t e : active) {
      for (int64_t r0 = start[e]; r0 < start[e + 1]; r0 += kMR) {
        int mr = int(std::min<int64_t>(kMR, start[e + 1] - r0));
        block(hrow.data() + r0, mr, wd + e * F * H + c0, H, F, n, d);
        for (int r = 0; r < mr; ++r) {
          int64_t a = order[r0 + r];
          float w = weights[a];
          float* o = out + (a / top_k) * H + c0;
          const float* dr = d + r * kNB;
          for (int j = 0; j < n; ++j) o[j] += w * dr[j];
        }
      }
    }
  });
  return ffi::Error::Success();
}

static ffi::Error Moe(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> experts,
                      ffi::Buffer<ffi::F32> weights, ffi::AnyBuffer wg, ffi::AnyBuffer wu, ffi::AnyBuffer wd,
                      ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto xd = x.dimensions(), gd = wg.dimensions(), ed = experts.dimensions();
  if (xd.size() != 2 || gd.size() != 3 || ed.size() != 2 || ed[0] != xd[0] || gd[1] != xd[1])
    return ffi::Error::InvalidArgument("cpu_moe: expects x [T, H], experts [T, K], w_gate [E, H, F]");
  int64_t T = xd[0], H = xd[1], K = ed[1], E = gd[0], F = gd[2];
  auto dt = x.element_type();
  if (wg.element_type() != dt || wu.element_type() != dt || wd.element_type() != dt)
    return ffi::Error::InvalidArgument("cpu_moe: x and the expert weights must share a dtype");
  if (dt == ffi::DataType::F32)
    return Run<float>(pool, static_cast<const float*>(x.untyped_data()), experts.typed_data(), weights.typed_data(),
                      static_cast<const float*>(wg.untyped_data()), static_cast<const float*>(wu.untyped_data()),
                      static_cast<const float*>(wd.untyped_data()), out->typed_data(), T, K, E, H, F);
  if (dt == ffi::DataType::BF16)
    return Run<uint16_t>(pool, static_cast<const uint16_t*>(x.untyped_data()), experts.typed_data(),
                         weights.typed_data(), static_cast<const uint16_t*>(wg.untyped_data()),
                         static_cast<const uint16_t*>(wu.untyped_data()), static_cast<const uint16_t*>(wd.untyped_data()),
                         out->typed_data(), T, K, E, H, F);
  return ffi::Error::InvalidArgument("cpu_moe: float32 or bfloat16 only");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalellmCpuMoe, Moe,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
