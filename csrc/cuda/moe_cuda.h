// Launchers of the CUDA kernels (moe_cuda_kernels.cu), callable without torch headers so the
// .cu file compiles standalone with nvcc; moe_cuda_ops.cpp binds them to torch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace moeconv_cuda {

enum DType : int { kFloat32 = 0, kBFloat16 = 1 };
enum Scoring : int { kNone = 0, kSoftmax = 1, kSigmoid = 2 };
enum Activation : int { kSilu = 0, kGeluTanh = 1, kGelu = 2, kRelu = 3 };

// Top-k per token, one warp per token.  logits/weights in `dtype`, ids int64.
void launch_route(const void* logits, int64_t T, int E, int k, int scoring, bool renormalize, int dtype,
                  int64_t* ids, void* weights, cudaStream_t stream);

// Sorts the P = T*k pairs by expert (one block).  Writes counts[E], offsets[E+1],
// sorted_token[P] (token of each sorted pair) and pair_pos[P] (sorted position of pair t*k+j).
// Pairs whose expert id is outside [0, E) are dropped (they contribute nothing).
// `workspace` holds E int32 cursors.
void launch_align(const int64_t* ids, int64_t P, int k, int E, int32_t* counts, int32_t* offsets,
                  int32_t* sorted_token, int32_t* pair_pos, int32_t* workspace, cudaStream_t stream);

// Decode path.  h [P, s] float32: h[pos] = act(gate x + bg) * (up x + bu) for each sorted pair.
void launch_expert_up(const void* x, const void* w_gate, const void* w_up, const void* b_gate, const void* b_up,
                      const int32_t* counts, const int32_t* offsets, const int32_t* sorted_token, int64_t d,
                      int64_t s, int E, int activation, int dtype, float* h, cudaStream_t stream);

// y [P, d] float32: y[pos] = w_down[e] @ h[pos].
void launch_expert_down(const float* h, const void* w_down, const int32_t* counts, const int32_t* offsets,
                        int64_t d, int64_t s, int E, int dtype, float* y, cudaStream_t stream);

// out[t] = sum_j weights[t, j] * y[pair_pos[t*k+j]]  (y in `y_dtype`, out and weights in `dtype`).
void launch_combine(const void* y, int y_dtype, const int32_t* pair_pos, const int64_t* ids, const void* weights,
                    int64_t T, int k, int64_t d, int E, int dtype, void* out, cudaStream_t stream);

}  // namespace moeconv_cuda
