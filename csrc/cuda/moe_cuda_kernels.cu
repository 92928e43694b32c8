// CUDA kernels of moeconv's MoE ops: warp-per-token top-k routing, a one-block "align" that sorts
// (token, slot) pairs by expert, expert GEMV kernels that read each active expert's weights once
// for all its pairs (decode), and a deterministic weighted combine.  No torch headers here.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "moe_cuda.h"

namespace moeconv_cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kPairGroup = 4;  // pairs dotted against one weight row per pass

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Total order of the routing: larger first, NaN above every number, ties to the lower index.
__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib) {
  const bool na = isnan(a), nb = isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

__device__ __forceinline__ float activate(float g, int activation) {
  switch (activation) {
    case kSilu: return g / (1.0f + expf(-g));
    case kGeluTanh: return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    case kGelu: return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
    default: return g > 0.0f ? g : (g < 0.0f ? 0.0f : g);
  }
}

template <typename T>
__global__ void route_kernel(const T* __restrict__ logits, int64_t n_tokens, int E, int k, int scoring,
                             bool renormalize, int64_t* __restrict__ ids, T* __restrict__ weights) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (t >= n_tokens) return;  // whole warps exit together: t is uniform within a warp
  const T* row = logits + t * E;
  float row_max = -INFINITY, denom = 1.0f;
  if (scoring == kSoftmax) {
    for (int e = lane; e < E; e += kWarp) row_max = fmaxf(row_max, to_float(row[e]));
    for (int o = kWarp / 2; o > 0; o /= 2) row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, o));
    float sum = 0.0f;
    for (int e = lane; e < E; e += kWarp) sum += expf(to_float(row[e]) - row_max);
    denom = warp_sum(sum);
  }
  // The j-th choice is the best element ranked strictly after the (j-1)-th: no "taken" flags needed.
  float prev_v = NAN;
  int prev_i = -1;
  float total = 0.0f;
  for (int j = 0; j < k; ++j) {
    float best_v = 0.0f;
    int best_i = -1;
    for (int e = lane; e < E; e += kWarp) {
      const float v = to_float(row[e]);
      if (prev_i >= 0 && !ranks_before(prev_v, prev_i, v, e)) continue;
      if (best_i < 0 || ranks_before(v, e, best_v, best_i)) best_v = v, best_i = e;
    }
    for (int o = kWarp / 2; o > 0; o /= 2) {
      const float ov = __shfl_xor_sync(0xffffffffu, best_v, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
      if (oi >= 0 && (best_i < 0 || ranks_before(ov, oi, best_v, best_i))) best_v = ov, best_i = oi;
    }
    prev_v = best_v, prev_i = best_i;
    float w = 1.0f;
    if (scoring == kSoftmax) w = expf(best_v - row_max) / denom;
    if (scoring == kSigmoid) w = 1.0f / (1.0f + expf(-best_v));
    total += w;
    if (lane == 0) {
      ids[t * k + j] = best_i;
      weights[t * k + j] = from_float<T>(w);
    }
  }
  if (renormalize && lane == 0) {
    // Re-reads the stored weights: in bfloat16 they are rounded twice (well within bf16 tolerance).
    for (int j = 0; j < k; ++j) weights[t * k + j] = from_float<T>(to_float(weights[t * k + j]) / total);
  }
}

__global__ void align_kernel(const int64_t* __restrict__ ids, int64_t P, int k, int E, int32_t* __restrict__ counts,
                             int32_t* __restrict__ offsets, int32_t* __restrict__ sorted_token,
                             int32_t* __restrict__ pair_pos, int32_t* __restrict__ cursor) {
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0, cursor[e] = 0;
  __syncthreads();
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) {
    const int64_t e = ids[p];
    if (e >= 0 && e < E) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // E is small (experts per layer): a serial scan is cheapest
    int32_t run = 0;
    for (int e = 0; e < E; ++e) offsets[e] = run, run += counts[e];
    offsets[E] = run;
  }
  __syncthreads();
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) {
    const int64_t e = ids[p];
    if (e < 0 || e >= E) {
      pair_pos[p] = -1;
      continue;
    }
    const int32_t pos = offsets[e] + atomicAdd(&cursor[e], 1);
    sorted_token[pos] = static_cast<int32_t>(p / k);
    pair_pos[p] = pos;
  }
}

// out[0..VEC) = float(p[0..VEC)), with 16-byte loads where VEC elements span 16 or 32 bytes.
template <int VEC>
__device__ __forceinline__ void load_vec(const float* p, float* out) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int v = 0; v < VEC; v += 4) {
      const float4 q = *reinterpret_cast<const float4*>(p + v);
      out[v] = q.x, out[v + 1] = q.y, out[v + 2] = q.z, out[v + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = p[v];
  }
}

template <int VEC>
__device__ __forceinline__ void load_vec(const __nv_bfloat16* p, float* out) {
  if constexpr (VEC == 8) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&q);
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const float2 f = __bfloat1622float2(pairs[v]);
      out[2 * v] = f.x, out[2 * v + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = __bfloat162float(p[v]);
  }
}

// One warp per weight row; each pass dots the row with up to kPairGroup pairs' inputs.
// VEC elements per load (16 bytes when the caller checked alignment, else 1).
template <typename T, int VEC, typename In>
__device__ __forceinline__ void dot_row_pairs(const T* __restrict__ w_row, const In* const* in_rows, int n_in,
                                              int64_t len, float acc[kPairGroup]) {
  const int lane = threadIdx.x % kWarp;
  for (int q = 0; q < kPairGroup; ++q) acc[q] = 0.0f;
  for (int64_t i = static_cast<int64_t>(lane) * VEC; i < len; i += kWarp * VEC) {
    float w[VEC];
    load_vec<VEC>(w_row + i, w);
#pragma unroll
    for (int q = 0; q < kPairGroup; ++q) {
      if (q < n_in) {
        float xv[VEC];
        load_vec<VEC>(in_rows[q] + i, xv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[q] += w[v] * xv[v];
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kPairGroup; ++q) acc[q] = warp_sum(acc[q]);
}

template <typename T, int VEC>
__global__ void expert_up_kernel(const T* __restrict__ x, const T* __restrict__ w_gate, const T* __restrict__ w_up,
                                 const T* __restrict__ b_gate, const T* __restrict__ b_up,
                                 const int32_t* __restrict__ counts, const int32_t* __restrict__ offsets,
                                 const int32_t* __restrict__ sorted_token, int64_t d, int64_t s, int activation,
                                 float* __restrict__ h) {
  const int e = blockIdx.y;
  const int n = counts[e];
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (n == 0 || r >= s) return;
  const int lane = threadIdx.x % kWarp;
  const T* up_row = w_up + (static_cast<int64_t>(e) * s + r) * d;
  const T* gate_row = w_gate ? w_gate + (static_cast<int64_t>(e) * s + r) * d : nullptr;
  const float bu = b_up ? to_float(b_up[e * s + r]) : 0.0f;
  const float bg = b_gate ? to_float(b_gate[e * s + r]) : 0.0f;
  const int32_t base = offsets[e];
  for (int q0 = 0; q0 < n; q0 += kPairGroup) {
    const int nq = min(kPairGroup, n - q0);
    const T* xs[kPairGroup];
    for (int q = 0; q < kPairGroup; ++q) xs[q] = x + static_cast<int64_t>(sorted_token[base + q0 + min(q, nq - 1)]) * d;
    float up[kPairGroup], gate[kPairGroup];
    dot_row_pairs<T, VEC>(up_row, xs, nq, d, up);
    if (gate_row) dot_row_pairs<T, VEC>(gate_row, xs, nq, d, gate);
    if (lane < nq) {
      float u = 0.0f, g = 0.0f;
#pragma unroll
      for (int q = 0; q < kPairGroup; ++q)
        if (q == lane) u = up[q], g = gate_row ? gate[q] : 0.0f;
      const float hv = gate_row ? activate(g + bg, activation) * (u + bu) : activate(u + bu, activation);
      h[static_cast<int64_t>(base + q0 + lane) * s + r] = hv;
    }
  }
}

template <typename T, int VEC>
__global__ void expert_down_kernel(const float* __restrict__ h, const T* __restrict__ w_down,
                                   const int32_t* __restrict__ counts, const int32_t* __restrict__ offsets, int64_t d,
                                   int64_t s, float* __restrict__ y) {
  const int e = blockIdx.y;
  const int n = counts[e];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (n == 0 || i >= d) return;
  const int lane = threadIdx.x % kWarp;
  const T* row = w_down + (static_cast<int64_t>(e) * d + i) * s;
  const int32_t base = offsets[e];
  for (int q0 = 0; q0 < n; q0 += kPairGroup) {
    const int nq = min(kPairGroup, n - q0);
    const float* hs[kPairGroup];
    for (int q = 0; q < kPairGroup; ++q) hs[q] = h + static_cast<int64_t>(base + q0 + min(q, nq - 1)) * s;
    float acc[kPairGroup];
    dot_row_pairs<T, VEC>(row, hs, nq, s, acc);
    if (lane < nq) {
      float v = 0.0f;
#pragma unroll
      for (int q = 0; q < kPairGroup; ++q)
        if (q == lane) v = acc[q];
      y[static_cast<int64_t>(base + q0 + lane) * d + i] = v;
    }
  }
}

template <typename T, typename Y>
__global__ void combine_kernel(const Y* __restrict__ y, const int32_t* __restrict__ pair_pos,
                               const int64_t* __restrict__ ids, const T* __restrict__ weights, int64_t n_tokens, int k,
                               int64_t d, int E, T* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_tokens * d) return;
  const int64_t t = idx / d, i = idx % d;
  float acc = 0.0f;
  for (int j = 0; j < k; ++j) {  // slot order: the same sum on every run
    const int32_t pos = pair_pos[t * k + j];
    if (pos < 0) continue;
    acc += to_float(weights[t * k + j]) * to_float(y[static_cast<int64_t>(pos) * d + i]);
  }
  out[idx] = from_float<T>(acc);
}

template <typename T>
bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace

void launch_route(const void* logits, int64_t T, int E, int k, int scoring, bool renormalize, int dtype, int64_t* ids,
                  void* weights, cudaStream_t stream) {
  if (T == 0) return;
  const dim3 grid(static_cast<unsigned>((T + kWarpsPerBlock - 1) / kWarpsPerBlock));
  if (dtype == kBFloat16) {
    route_kernel<__nv_bfloat16><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(logits), T, E, k, scoring, renormalize, ids, static_cast<__nv_bfloat16*>(weights));
  } else {
    route_kernel<float><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(static_cast<const float*>(logits), T, E, k,
                                                                      scoring, renormalize, ids, static_cast<float*>(weights));
  }
}

void launch_align(const int64_t* ids, int64_t P, int k, int E, int32_t* counts, int32_t* offsets,
                  int32_t* sorted_token, int32_t* pair_pos, int32_t* workspace, cudaStream_t stream) {
  align_kernel<<<1, 1024, 0, stream>>>(ids, P, k, E, counts, offsets, sorted_token, pair_pos, workspace);
}

template <typename T>
static void up_typed(const void* x, const void* wg, const void* wu, const void* bg, const void* bu,
                     const int32_t* counts, const int32_t* offsets, const int32_t* sorted_token, int64_t d, int64_t s,
                     int E, int activation, float* h, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>((s + kWarpsPerBlock - 1) / kWarpsPerBlock), E);
  const bool vec = d % kVec == 0 && aligned16<T>(x) && aligned16<T>(wg) && aligned16<T>(wu);
  auto args = [&](auto kernel) {
    kernel<<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(wg), static_cast<const T*>(wu), static_cast<const T*>(bg),
        static_cast<const T*>(bu), counts, offsets, sorted_token, d, s, activation, h);
  };
  if (vec) args(expert_up_kernel<T, kVec>);
  else args(expert_up_kernel<T, 1>);
}

void launch_expert_up(const void* x, const void* w_gate, const void* w_up, const void* b_gate, const void* b_up,
                      const int32_t* counts, const int32_t* offsets, const int32_t* sorted_token, int64_t d, int64_t s,
                      int E, int activation, int dtype, float* h, cudaStream_t stream) {
  if (dtype == kBFloat16)
    up_typed<__nv_bfloat16>(x, w_gate, w_up, b_gate, b_up, counts, offsets, sorted_token, d, s, E, activation, h, stream);
  else
    up_typed<float>(x, w_gate, w_up, b_gate, b_up, counts, offsets, sorted_token, d, s, E, activation, h, stream);
}

template <typename T>
static void down_typed(const float* h, const void* wd, const int32_t* counts, const int32_t* offsets, int64_t d,
                       int64_t s, int E, float* y, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>((d + kWarpsPerBlock - 1) / kWarpsPerBlock), E);
  // h rows are float32 at a stride of s: vector loads need s to keep every row 16-byte aligned too.
  const bool vec = s % kVec == 0 && s % 4 == 0 && aligned16<T>(wd) && aligned16<float>(h);
  if (vec)
    expert_down_kernel<T, kVec><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(h, static_cast<const T*>(wd), counts, offsets, d, s, y);
  else
    expert_down_kernel<T, 1><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(h, static_cast<const T*>(wd), counts, offsets, d, s, y);
}

void launch_expert_down(const float* h, const void* w_down, const int32_t* counts, const int32_t* offsets, int64_t d,
                        int64_t s, int E, int dtype, float* y, cudaStream_t stream) {
  if (dtype == kBFloat16) down_typed<__nv_bfloat16>(h, w_down, counts, offsets, d, s, E, y, stream);
  else down_typed<float>(h, w_down, counts, offsets, d, s, E, y, stream);
}

void launch_combine(const void* y, int y_dtype, const int32_t* pair_pos, const int64_t* ids, const void* weights,
                    int64_t T, int k, int64_t d, int E, int dtype, void* out, cudaStream_t stream) {
  if (T == 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((T * d + threads - 1) / threads);
  if (dtype == kBFloat16 && y_dtype == kBFloat16)
    combine_kernel<__nv_bfloat16, __nv_bfloat16><<<blocks, threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(y), pair_pos, ids, static_cast<const __nv_bfloat16*>(weights), T, k, d, E,
        static_cast<__nv_bfloat16*>(out));
  else if (dtype == kBFloat16)
    combine_kernel<__nv_bfloat16, float><<<blocks, threads, 0, stream>>>(
        static_cast<const float*>(y), pair_pos, ids, static_cast<const __nv_bfloat16*>(weights), T, k, d, E,
        static_cast<__nv_bfloat16*>(out));
  else
    combine_kernel<float, float><<<blocks, threads, 0, stream>>>(static_cast<const float*>(y), pair_pos, ids,
                                                                  static_cast<const float*>(weights), T, k, d, E,
                                                                  static_cast<float*>(out));
}

}  // namespace moeconv_cuda
