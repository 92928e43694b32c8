// Torch-side pieces shared by the CPU op bindings: moe_ops.cpp (route, moe_ffn) and moe_block.cpp (a whole MoE block
// at decode).  The ISA kernels stay behind moe_cpu.h, which includes no torch header.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "moe_cpu.h"

namespace moeconv_cpu {

const KernelTable* active_kernels();  // the table of the dispatched ISA (MOECONV_CPU_ISA / set_cpu_isa)
int activation_code(c10::string_view name);

struct Pairs {
  std::vector<int64_t> active, start, token, src;  // src = t * k + j of each sorted pair
  std::vector<float> weight;
  int64_t max_per_expert = 0;
};

// Counting sort of the T * k (token, slot) pairs ids/weights [T, k] by expert; order inside an expert is (t, j).
Pairs sort_pairs(const int64_t* ids, const float* weights, int64_t T, int64_t k, int64_t E);

// TORCH_CHECKs that x [T, d] and the stacks w_up/w_gate [E, s, d], w_down [E, d, s] fit moe_ffn, in x's dtype.
void check_experts(const at::Tensor& x, const c10::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                   const at::Tensor& w_down);

at::Tensor float_bias(const c10::optional<at::Tensor>& b, int64_t E, int64_t s, const char* name);  // [E, s] fp32

// One weight-streaming problem: its DecodeArgs and the tensors they point into (the caller keeps `pairs` alive and
// sets a.acc / a.out before down()).  Each phase is one parallel_for over output rows.
struct StreamProblem {
  at::Tensor xf, h, hb;  // x in fp32 (unless the table reads bf16 x), h [P, s] fp32, h [P, s] bf16 (bf16_operands)
  at::Tensor operands[5];  // wg, wu, wd, bg, bu: a temporary (an fp32 copy of a bias) lives as long as `a` points to it
  DecodeArgs a;
  StreamProblem(const KernelTable* table, const at::Tensor& x, const Pairs& pairs, const at::Tensor& wg,
                const at::Tensor& wu, const at::Tensor& wd, const at::Tensor& bg, const at::Tensor& bu, int activation);
  void up(const KernelTable* table) const;    // h of every pair
  void down(const KernelTable* table) const;  // acc (and out) from h
};

}  // namespace moeconv_cpu
