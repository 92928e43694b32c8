// AVX-512 instantiation of the quantized linear kernels (avx512 and avx512bf16 paths).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// As in moe_avx512.cpp: the target covers only this file's own code, not the system headers above.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")
#endif

#define MOECONV_QUANT_NS qavx512
#include "quant_x86.h"

namespace moeconv_cpu {
namespace qavx512 {
struct V {
  using reg = __m512;
  using lut_t = __m512;
  static constexpr int width = 16;
  static constexpr int rows = 4;  // 4 rows x 4 tokens = 16 accumulators of 32 zmm registers
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static inline reg set1(float v) { return _mm512_set1_ps(v); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float hsum(reg a) { return _mm512_reduce_add_ps(a); }
  static inline __m512i bytes(const uint8_t* p) {  // 16 bytes -> 16 int32 lanes
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline reg from_u8(const uint8_t* p) { return _mm512_cvtepi32_ps(bytes(p)); }
  // 8 entries in lanes 0..7, zeros above: symbols index the low 4 bits, and only 0..3 occur.
  static inline lut_t lut8(const float* table) { return _mm512_zextps256_ps512(_mm256_loadu_ps(table)); }
  static inline reg lookup(lut_t table, const uint8_t* p) { return _mm512_permutexvar_ps(bytes(p), table); }
  static constexpr bool has_f16c = true;
  static inline void half8(const uint16_t* p, float* dst) {
    _mm256_storeu_ps(dst, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // Fast path: 16 bytes widen to 16 dword lanes; VPERMPS indexes a 16-entry table by the low 4 bits of each
  // lane, so int4 needs no masking (lane >> 4 gives the high nibble) and int2 a table repeating every 4 entries.
  // Lane i of register k is then value per_byte * i + k of the chunk (permuted = true, x matches).
  static constexpr bool permuted = true;
  // sub1: the 28 2-bit symbols of a dictionary entry -> 32 bytes by 4 PDEPs (fast on every AVX-512 CPU; the table
  // picks this path only with BMI2).
  static constexpr bool has_spread = true;
  static inline void spread(uint64_t entry, uint8_t* dst) {
    for (int k = 0; k < 4; ++k) {
      const uint64_t v = _pdep_u64((entry >> (16 * k)) & 0xffffu, 0x0303030303030303ull);
      std::memcpy(dst + 8 * k, &v, 8);
    }
  }
  struct Group { reg s, z, table; };
  template <int BITS>
  static inline Group group(float s, float z) {
    const reg sv = set1(s), zv = set1(z);
    if constexpr (BITS == 8) return {sv, zv, sv};
    const __m512i idx = _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32((1 << BITS) - 1));
    return {sv, zv, mul(sub(_mm512_cvtepi32_ps(idx), zv), sv)};  // (code - zero) * scale, as the reference
  }
  static inline Group ternary(float lo, float hi) {  // {0, lo, hi, 0} repeated: symbols index the low 2 bits
    const reg t = _mm512_setr_ps(0.0f, lo, hi, 0.0f, 0.0f, lo, hi, 0.0f, 0.0f, lo, hi, 0.0f, 0.0f, lo, hi, 0.0f);
    return {t, t, t};
  }
  template <int BITS, bool TERN>
  static inline void dequant(const uint8_t* p, const Group& g, reg* out) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    if constexpr (BITS == 8 && !TERN) {
      out[0] = mul(sub(_mm512_cvtepi32_ps(d), g.z), g.s);
    } else {
      for (int k = 0; k < 8 / BITS; ++k) out[k] = _mm512_permutexvar_ps(_mm512_srli_epi32(d, k * BITS), g.table);
    }
  }
  static inline void unpack4(const uint8_t* src, int64_t nbytes, uint8_t* dst) { unpack4_x86(src, nbytes, dst); }
  static inline void unpack2(const uint8_t* src, int64_t nbytes, uint8_t* dst) { unpack2_x86(src, nbytes, dst); }
};
}  // namespace qavx512
}  // namespace moeconv_cpu
#include "quant_cpu_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

namespace moeconv_cpu {
const QuantTable* quant_table_avx512() {
  static const QuantTable table{"avx512", &qavx512::rows, &qavx512::prepare_x};
  return &table;
}
}  // namespace moeconv_cpu

#else
namespace moeconv_cpu {
const QuantTable* quant_table_avx512() { return nullptr; }
}  // namespace moeconv_cpu
#endif
