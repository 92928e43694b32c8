// Plain-C++ interface between the torch bindings (moe_ops.cpp) and the per-ISA kernels.
// No torch headers here: the ISA translation units are compiled for different targets
// and must not instantiate torch inline code (one-definition-rule hazard).
#pragma once
#include <cstdint>

namespace moeconv_cpu {

// kIdentity is internal: the router product runs as a non-gated up pass with no activation (moe_block.cpp).
enum Activation : int { kSilu = 0, kGeluTanh = 1, kGelu = 2, kRelu = 3, kIdentity = 4 };
enum DType : int { kFloat32 = 0, kBFloat16 = 1 };

// Decode ("streaming") problem: every active expert's weights are read once for all the
// (token, slot) pairs routed to it.  Pairs are sorted by expert; active expert a owns the
// sorted pairs [pair_start[a], pair_start[a+1]).
struct DecodeArgs {
  int64_t T = 0, d = 0, s = 0, n_active = 0;
  int dtype = kFloat32;
  int activation = kSilu;
  const int64_t* active = nullptr;      // [n_active] expert ids
  const int64_t* pair_start = nullptr;  // [n_active + 1]
  const int64_t* pair_token = nullptr;  // [P] token of each sorted pair
  const float* pair_weight = nullptr;   // [P] routing weight of each sorted pair
  const float* x = nullptr;             // [T, d] float32 (null for bf16_operands kernels on bf16)
  const void* x_bf16 = nullptr;         // [T, d] bfloat16, set only for bf16_operands kernels on bf16
  const void* w_gate = nullptr;         // [E, s, d] dtype, or null (non-gated)
  const void* w_up = nullptr;           // [E, s, d] dtype
  const void* w_down = nullptr;         // [E, d, s] dtype
  const float* b_gate = nullptr;        // [E, s] float32 or null
  const float* b_up = nullptr;          // [E, s] float32 or null
  float* h = nullptr;                   // [P, s] float32 scratch (intermediate activations)
  void* h_bf16 = nullptr;               // [P, s] bfloat16 activations, only for bf16_operands kernels
  float* acc = nullptr;                 // [T, d] float32 accumulator (may alias out for float32)
  void* out = nullptr;                  // [T, d] dtype; null: the sum stays in acc for a later problem to add to
  // A block's shared expert is its own problem (its s differs) summed into the same acc before the routed one:
  bool accumulate = false;              // down_cols adds to acc instead of zeroing it first
  const float* out_bias = nullptr;      // [d] float32 added once as out is written, or null
};

struct KernelTable {
  const char* isa;
  // h rows for the flattened (active expert, intermediate row) range [begin, end) of n_active * s.
  void (*up_rows)(const DecodeArgs&, int64_t begin, int64_t end);
  // out columns [begin, end) of d: zero (unless accumulate), add every active expert, write out (if any).
  void (*down_cols)(const DecodeArgs&, int64_t begin, int64_t end);
  // bf16 problems: the kernel reads x_bf16 and writes/reads h_bf16 (dot products of bf16 pairs)
  // instead of the float32 x; the caller then allocates h_bf16.
  bool bf16_operands = false;
};

const KernelTable* table_generic();
const KernelTable* table_avx2();    // null when not compiled for x86
const KernelTable* table_avx512();  // null when not compiled for x86
const KernelTable* table_avx512bf16();  // null when not compiled for x86 (GCC/clang)

}  // namespace moeconv_cpu
