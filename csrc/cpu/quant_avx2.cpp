// AVX2+FMA instantiation of the quantized linear kernels (picked at run time on x86 without AVX-512).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// As in moe_avx2.cpp: the target covers only this file's own code, not the system headers above.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define MOECONV_QUANT_NS qavx2
#include "quant_x86.h"

namespace moeconv_cpu {
namespace qavx2 {
struct V {
  using reg = __m256;
  using lut_t = __m256;
  static constexpr int width = 8;
  static constexpr int rows = 2;  // 2 rows x 4 tokens = 8 accumulators of 16 ymm registers
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static inline reg set1(float v) { return _mm256_set1_ps(v); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline __m256i bytes(const uint8_t* p) {  // 8 bytes -> 8 int32 lanes
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static inline reg from_u8(const uint8_t* p) { return _mm256_cvtepi32_ps(bytes(p)); }
  static inline lut_t lut8(const float* table) { return _mm256_loadu_ps(table); }
  static inline reg lookup(lut_t table, const uint8_t* p) { return _mm256_permutevar8x32_ps(table, bytes(p)); }
  static constexpr bool has_f16c = true;
  static inline void half8(const uint16_t* p, float* dst) {
    _mm256_storeu_ps(dst, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static inline reg cvt8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }  // low 8 bytes
  static constexpr bool permuted = false;
  static constexpr bool has_spread = false;
  static inline void spread(uint64_t, uint8_t*) {}
  struct Group { reg s, z, lut; };
  template <int BITS>
  static inline Group group(float s, float z) { return {set1(s), set1(z), zero()}; }
  static inline Group ternary(float lo, float hi) {
    const reg t = _mm256_setr_ps(0.0f, lo, hi, 0.0f, 0.0f, lo, hi, 0.0f);
    return {t, t, t};
  }
  template <int BITS, bool TERN>  // 8 bytes -> 8 / BITS registers of weights, in order
  static inline void dequant(const uint8_t* p, const Group& g, reg* out) {
    __m256i c[8 / BITS];
    codes<BITS>(p, c);
    for (int k = 0; k < 8 / BITS; ++k)
      out[k] = TERN ? _mm256_permutevar8x32_ps(g.lut, c[k]) : mul(sub(_mm256_cvtepi32_ps(c[k]), g.z), g.s);
  }
  static inline __m256i wide(__m128i b) { return _mm256_cvtepu8_epi32(b); }  // low 8 bytes -> 8 dwords
  template <int BITS>  // 8 bytes -> 8 / BITS registers of codes (dwords), in order
  static inline void codes(const uint8_t* p, __m256i* out) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    if constexpr (BITS == 8) {
      out[0] = wide(b);
    } else if constexpr (BITS == 4) {
      const __m128i m = _mm_set1_epi8(15);
      const __m128i v = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
      out[0] = wide(v), out[1] = wide(_mm_srli_si128(v, 8));
    } else {
      const __m128i m = _mm_set1_epi8(3);
      const __m128i v01 = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 2), m));
      const __m128i v23 = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(_mm_srli_epi16(b, 6), m));
      const __m128i lo = _mm_unpacklo_epi16(v01, v23), hi = _mm_unpackhi_epi16(v01, v23);
      out[0] = wide(lo), out[1] = wide(_mm_srli_si128(lo, 8)), out[2] = wide(hi), out[3] = wide(_mm_srli_si128(hi, 8));
    }
  }
  static inline void unpack4(const uint8_t* src, int64_t nbytes, uint8_t* dst) { unpack4_x86(src, nbytes, dst); }
  static inline void unpack2(const uint8_t* src, int64_t nbytes, uint8_t* dst) { unpack2_x86(src, nbytes, dst); }
};
}  // namespace qavx2
}  // namespace moeconv_cpu
#include "quant_cpu_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

namespace moeconv_cpu {
const QuantTable* quant_table_avx2() {
  static const QuantTable table{"avx2", &qavx2::rows, &qavx2::prepare_x};
  return &table;
}
}  // namespace moeconv_cpu

#else
namespace moeconv_cpu {
const QuantTable* quant_table_avx2() { return nullptr; }
}  // namespace moeconv_cpu
#endif
