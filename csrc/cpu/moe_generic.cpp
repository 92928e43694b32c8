// Portable instantiation of the streaming kernels (any CPU; the compiler may auto-vectorize).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "moe_cpu.h"

#define MOECONV_ISA_NS generic
namespace moeconv_cpu {
namespace generic {
struct V {
  using reg = float;
  static constexpr int width = 1;
  static constexpr int rows = 4;
  static constexpr int rows_one = 4;
  static inline reg zero() { return 0.0f; }
  static inline reg load(const float* p) { return *p; }
  static inline reg load(const uint16_t* p) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static inline reg fma(reg a, reg b, reg c) { return a * b + c; }
  static inline float hsum(reg a) { return a; }
};
}  // namespace generic
}  // namespace moeconv_cpu
#include "moe_cpu_impl.h"

namespace moeconv_cpu {
const KernelTable* table_generic() {
  static const KernelTable table{"generic", &generic::up_rows, &generic::down_cols, false};
  return &table;
}
}  // namespace moeconv_cpu
