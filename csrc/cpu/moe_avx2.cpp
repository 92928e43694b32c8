// AVX2+FMA instantiation of the streaming kernels (picked at run time on x86 without AVX-512).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "moe_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// See moe_avx512.cpp: the target covers only this file's own namespace.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
// GCC 12 flags the intrinsics' own `__Y = __Y` idiom as maybe-uninitialized (false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define MOECONV_ISA_NS avx2
namespace moeconv_cpu {
namespace avx2 {
struct V {
  using reg = __m256;
  static constexpr int width = 8;
  static constexpr int rows = 2;  // 2 rows x 4 tokens = 8 accumulators of 16 ymm registers
  static constexpr int rows_one = 8;  // 8 rows x 1 token: 8 chains for a single token (decode)
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline reg load(const uint16_t* p) {  // bfloat16 -> float32 is a 16-bit shift
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
}  // namespace avx2
}  // namespace moeconv_cpu
#include "moe_cpu_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

namespace moeconv_cpu {
const KernelTable* table_avx2() {
  static const KernelTable table{"avx2", &avx2::up_rows, &avx2::down_cols, false};
  return &table;
}
}  // namespace moeconv_cpu

#else
namespace moeconv_cpu {
const KernelTable* table_avx2() { return nullptr; }
}  // namespace moeconv_cpu
#endif
