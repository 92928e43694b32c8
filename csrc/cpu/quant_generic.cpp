// Portable instantiation of the quantized linear kernels (any CPU; the compiler may auto-vectorize).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_cpu.h"

#define MOECONV_QUANT_NS qgeneric
namespace moeconv_cpu {
namespace qgeneric {
struct V {
  using reg = float;
  using lut_t = const float*;
  static constexpr int width = 1;
  static constexpr int rows = 4;
  static inline reg zero() { return 0.0f; }
  static inline reg load(const float* p) { return *p; }
  static inline void store(float* p, reg v) { *p = v; }
  static inline reg set1(float v) { return v; }
  static inline reg sub(reg a, reg b) { return a - b; }
  static inline reg mul(reg a, reg b) { return a * b; }
  static inline reg fma(reg a, reg b, reg c) { return a * b + c; }
  static inline float hsum(reg a) { return a; }
  static inline reg from_u8(const uint8_t* p) { return static_cast<float>(*p); }
  static inline lut_t lut8(const float* table) { return table; }
  static inline reg lookup(lut_t table, const uint8_t* p) { return table[*p & 7]; }
  static constexpr bool has_f16c = false;
  static inline void half8(const uint16_t*, float*) {}
  static constexpr bool permuted = false;
  static constexpr bool has_spread = false;
  static inline void spread(uint64_t, uint8_t*) {}
  struct Group { float s, z; };  // ternary: (lo, hi)
  template <int BITS>
  static inline Group group(float s, float z) { return {s, z}; }
  static inline Group ternary(float lo, float hi) { return {lo, hi}; }
  template <int BITS, bool TERN>  // one byte -> its 8 / BITS weights, in order
  static inline void dequant(const uint8_t* p, const Group& g, reg* out) {
    for (int k = 0; k < 8 / BITS; ++k) {
      const uint32_t c = (*p >> (k * BITS)) & ((1u << BITS) - 1);
      out[k] = TERN ? (c == 1 ? g.s : (c == 2 ? g.z : 0.0f)) : (static_cast<float>(c) - g.z) * g.s;
    }
  }
  static inline void unpack4(const uint8_t* src, int64_t nbytes, uint8_t* dst) {
    for (int64_t i = 0; i < nbytes; ++i) {
      dst[2 * i] = src[i] & 15;
      dst[2 * i + 1] = src[i] >> 4;
    }
  }
  static inline void unpack2(const uint8_t* src, int64_t nbytes, uint8_t* dst) {
    for (int64_t i = 0; i < nbytes; ++i)
      for (int k = 0; k < 4; ++k) dst[4 * i + k] = (src[i] >> (2 * k)) & 3;
  }
};
}  // namespace qgeneric
}  // namespace moeconv_cpu
#include "quant_cpu_impl.h"

namespace moeconv_cpu {
const QuantTable* quant_table_generic() {
  static const QuantTable table{"generic", &qgeneric::rows, &qgeneric::prepare_x};
  return &table;
}
}  // namespace moeconv_cpu
