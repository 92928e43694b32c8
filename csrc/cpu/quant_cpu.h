// Plain-C++ interface between the quantized-linear torch bindings (quant_ops.cpp) and the per-ISA
// kernels (quant_<isa>.cpp). No torch headers, for the same reason as moe_cpu.h.
#pragma once
#include <atomic>
#include <cstdint>

namespace moeconv_cpu {

enum QuantKind : int { kQuantInt = 0, kQuantTernary = 1, kQuantSub1 = 2 };
enum ZeroMode : int { kZeroSymmetric = 0, kZeroPacked = 1, kZeroHalf = 2 };

// y[T, out] = x[T, in] W^T (+ bias) with W in a stored format of docs/quant-formats.md, read as stored
// (layout version 1): each weight is dequantized exactly as the reference does it, in float32, into a
// small L1 buffer of rows x column block, and dotted with every token there.
struct QuantArgs {
  int64_t T = 0, in = 0, out = 0;
  int kind = kQuantInt;
  // intN
  int bits = 4;                       // 8, 4, 3, 2
  int64_t group = 0;                  // columns per group (in for one group per row)
  int64_t n_groups = 1;
  int zero_mode = kZeroPacked;
  const uint8_t* qweight = nullptr;   // [out, row_bytes] packed codes (intN, ternary at 2 bits)
  int64_t row_bytes = 0;
  const uint16_t* scales = nullptr;   // [out, n_groups] float16 bits
  const uint16_t* zeros = nullptr;    // [out, n_groups] float16 bits (kZeroHalf)
  const uint8_t* qzeros = nullptr;    // [out, zero_row_bytes] packed zero codes (kZeroPacked)
  int64_t zero_row_bytes = 0;
  // ternary / sub1
  const float* lo_hi = nullptr;       // [out, 2] (lo, hi)
  // sub1
  const uint16_t* codes = nullptr;    // [num_codes]
  const int32_t* block_offsets = nullptr;  // [n_blocks]
  const int64_t* dictionary = nullptr;     // [dict_size]
  int64_t num_codes = 0, dict_size = 0, block_rows = 1;
  // all
  const float* x = nullptr;           // [T, in] float32
  const float* xp = nullptr;          // [T, in] x in the ISA's fast-path order (QuantTable::prepare_x)
  const float* bias = nullptr;        // [out] float32 or null
  float* y = nullptr;                 // [T, out] float32
  std::atomic<int>* error = nullptr;  // set to 1 when a sub1 stream does not decode to its block
};

struct QuantTable {
  const char* isa;
  // y columns for output rows [begin, end); for sub1, begin is a multiple of block_rows.
  void (*rows)(const QuantArgs&, int64_t begin, int64_t end);
  // Writes xp [T, in] for `rows` (once per call, before the parallel rows).
  void (*prepare_x)(const QuantArgs&, float* xp);
};

const QuantTable* quant_table_generic();
const QuantTable* quant_table_avx2();    // null when not compiled for x86
const QuantTable* quant_table_avx512();  // null when not compiled for x86

// The vector path the MoE kernels dispatch to (moe_ops.cpp; set_cpu_isa / MOECONV_CPU_ISA move both).
const char* active_isa_name();

}  // namespace moeconv_cpu
