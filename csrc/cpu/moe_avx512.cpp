// AVX-512 instantiation of the streaming kernels (picked at run time when the CPU has avx512f+bw).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "moe_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// The target applies only to code below (this file's own namespace); system headers above keep
// the default target so no AVX-512 copy of a shared inline function can leak into other files.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
// GCC 12 flags the intrinsics' own `__Y = __Y` idiom as maybe-uninitialized (false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif

#define MOECONV_ISA_NS avx512
namespace moeconv_cpu {
namespace avx512 {
struct V {
  using reg = __m512;
  static constexpr int width = 16;
  static constexpr int rows = 4;  // 4 rows x 4 tokens = 16 accumulators of 32 zmm registers
  static constexpr int rows_one = 8;  // 8 rows x 1 token: 8 chains for a single token (decode)
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline reg load(const uint16_t* p) {  // bfloat16 -> float32 is a 16-bit shift
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float hsum(reg a) { return _mm512_reduce_add_ps(a); }
};
}  // namespace avx512
}  // namespace moeconv_cpu
#include "moe_cpu_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

namespace moeconv_cpu {
const KernelTable* table_avx512() {
  static const KernelTable table{"avx512", &avx512::up_rows, &avx512::down_cols, false};
  return &table;
}
}  // namespace moeconv_cpu

#else
namespace moeconv_cpu {
const KernelTable* table_avx512() { return nullptr; }
}  // namespace moeconv_cpu
#endif
