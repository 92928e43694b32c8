// Quantized linear kernels, written once against a small SIMD wrapper `V` and compiled per ISA: the
// including translation unit defines MOECONV_QUANT_NS and V first (quant_generic/avx2/avx512.cpp).
// V provides: reg, width, rows, zero, load, store, set1, sub, mul, fma, hsum, from_u8 (width bytes ->
// floats), lut_t + lut8 (8 floats -> a table), lookup (width symbol bytes -> table values), the fast path's
// Group / group / dequant / permuted (below), has_f16c / half8,
// unpack4 / unpack2 (packed bytes -> one code byte per value, in order).
//
// Decode is memory-bound: each output row's packed bytes are read once per call. For a block of RT
// rows and a column block of kCols values the codes are unpacked into bytes, dequantized into a float
// buffer that stays in L1 (exactly the reference's float32 arithmetic, so the weights are bit-equal to
// quant_linear.dequantize_buffers), and that buffer is dotted with every token (up to 4 at a time).
#include <algorithm>
#include <cstring>
#include <vector>

#include "quant_cpu.h"

namespace moeconv_cpu {
namespace MOECONV_QUANT_NS {

constexpr int64_t kCols = 512;   // most values per column block (a multiple of 64: whole int3 chunks)
constexpr int64_t kSlack = 64;
// Register tiles must be unrolled to stay in registers (an accumulator array indexed by a loop variable
// would live in memory, one store-to-load round trip per FMA).
#ifndef MOECONV_UNROLL
#define MOECONV_UNROLL _Pragma("GCC unroll 16")
#endif   // bytes written past a code buffer's end by vector unpacking / sub1 decode

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // Inf / NaN
  } else if (exp == 0) {
    const float f = static_cast<float>(mant) * 5.9604644775390625e-8f;  // subnormal: mant * 2^-24, exact
    return sign ? -f : f;
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Code i of a packed row (little-endian bit order inside each chunk, docs/quant-formats.md).
inline uint32_t code_at(const uint8_t* row, int bits, int64_t i) {
  switch (bits) {
    case 8: return row[i];
    case 4: return (row[i >> 1] >> ((i & 1) * 4)) & 15u;
    case 2: return (row[i >> 2] >> ((i & 3) * 2)) & 3u;
    default: {  // 3: 8 values in 3 bytes
      const uint8_t* c = row + (i >> 3) * 3;
      const uint32_t word = c[0] | (static_cast<uint32_t>(c[1]) << 8) | (static_cast<uint32_t>(c[2]) << 16);
      return (word >> (3 * (i & 7))) & 7u;
    }
  }
}

// Codes [c0, c0 + n) of a packed row as bytes (c0 a multiple of 8). int8 rows are their own codes.
inline const uint8_t* unpack_codes(const uint8_t* row, int bits, int64_t c0, int64_t n, uint8_t* buf) {
  switch (bits) {
    case 8: return row + c0;
    case 4: V::unpack4(row + c0 / 2, (n + 1) / 2, buf); return buf;
    case 2: V::unpack2(row + c0 / 4, (n + 3) / 4, buf); return buf;
    default:
      for (int64_t c = 0; c < n; c += 8) {  // 8 values per 3 bytes
        const uint8_t* p = row + (c0 + c) / 8 * 3;
        const uint32_t word = p[0] | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16);
        for (int k = 0; k < 8; ++k) buf[c + k] = (word >> (3 * k)) & 7u;
      }
      return buf;
  }
}

inline float zero_of(const QuantArgs& a, int64_t r, int64_t g) {
  switch (a.zero_mode) {
    case kZeroSymmetric: return static_cast<float>(1 << (a.bits - 1));
    case kZeroHalf: return half_to_float(a.zeros[r * a.n_groups + g]);
    default: return static_cast<float>(code_at(a.qzeros + r * a.zero_row_bytes, a.bits, g));
  }
}

// dst[i] = (codes[i] - zero) * scale, the reference's float32 operations in its order.
inline void dequant(const uint8_t* codes, int64_t n, float zero, float scale, float* dst) {
  const typename V::reg zv = V::set1(zero), sv = V::set1(scale);
  int64_t i = 0;
  for (; i + V::width <= n; i += V::width) V::store(dst + i, V::mul(V::sub(V::from_u8(codes + i), zv), sv));
  for (; i < n; ++i) dst[i] = (static_cast<float>(codes[i]) - zero) * scale;
}

// dst[i] = {0, lo, hi, 0}[symbols[i]] (ternary symbols; 3 never occurs in valid data and reads 0 like the reference).
inline void lookup(const uint8_t* symbols, int64_t n, float lo, float hi, float* dst) {
  alignas(64) const float table[8] = {0.0f, lo, hi, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  const typename V::lut_t lut = V::lut8(table);
  int64_t i = 0;
  for (; i + V::width <= n; i += V::width) V::store(dst + i, V::lookup(lut, symbols + i));
  for (; i < n; ++i) dst[i] = table[symbols[i] & 7];
}

// dots[r][j] = <w[r], xs[j]> over n values.
template <int RT, int NT>
inline void dot_tile(const float* const* w, const float* const* xs, int64_t n, float dots[RT][4]) {
  typename V::reg acc[RT][NT];
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NT; ++j) acc[r][j] = V::zero();
  int64_t i = 0;
  for (; i + V::width <= n; i += V::width) {
    typename V::reg xv[NT];
    MOECONV_UNROLL for (int j = 0; j < NT; ++j) xv[j] = V::load(xs[j] + i);
    MOECONV_UNROLL for (int r = 0; r < RT; ++r) {
      const typename V::reg wv = V::load(w[r] + i);
      MOECONV_UNROLL for (int j = 0; j < NT; ++j) acc[r][j] = V::fma(wv, xv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NT; ++j) dots[r][j] = V::hsum(acc[r][j]);
  for (; i < n; ++i)
    for (int r = 0; r < RT; ++r)
      for (int j = 0; j < NT; ++j) dots[r][j] += w[r][i] * xs[j][i];
}

// Rows [r0, r1) of y; fill(r, c0, c1, codes_buf, dst) dequantizes row r's columns [c0, c1) into dst. Column blocks
// are the outer loop, so each block of x (all T tokens, about 32 KiB) stays in L1 while every row of the panel
// [r0, r1) passes (RT rows at a time); each packed weight is still read once.
template <int RT, typename Fill>
void run_rows(const QuantArgs& a, int64_t r0, int64_t r1, Fill fill) {
  const int64_t cols = std::clamp<int64_t>(8192 / std::max<int64_t>(a.T, 1) / 64 * 64, 64, kCols);
  std::vector<float> wbuf(RT * kCols);
  std::vector<uint8_t> cbuf(kCols + kSlack);
  std::vector<float> acc((r1 - r0) * a.T, 0.0f);  // [rows of the panel, T]
  for (int64_t c0 = 0; c0 < a.in; c0 += cols) {
    const int64_t n = std::min(cols, a.in - c0);
    for (int64_t rb = r0; rb < r1; rb += RT) {
      const int64_t nr = std::min<int64_t>(RT, r1 - rb);
      const float* w[RT];
      for (int r = 0; r < RT; ++r) {
        if (r < nr) fill(rb + r, c0, c0 + n, cbuf.data(), wbuf.data() + r * kCols);
        w[r] = wbuf.data() + (r < nr ? r : 0) * kCols;  // rows past the end repeat row 0; ignored
      }
      float* acc_rows = acc.data() + (rb - r0) * a.T;
      for (int64_t j0 = 0; j0 < a.T; j0 += 4) {
        const int64_t nj = std::min<int64_t>(4, a.T - j0);
        const float* xs[4];
        for (int64_t j = 0; j < nj; ++j) xs[j] = a.x + (j0 + j) * a.in + c0;
        float dots[RT][4];
        switch (nj) {
          case 4: dot_tile<RT, 4>(w, xs, n, dots); break;
          case 3: dot_tile<RT, 3>(w, xs, n, dots); break;
          case 2: dot_tile<RT, 2>(w, xs, n, dots); break;
          default: dot_tile<RT, 1>(w, xs, n, dots); break;
        }
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t j = 0; j < nj; ++j) acc_rows[r * a.T + j0 + j] += dots[r][j];
      }
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const float b = a.bias ? a.bias[r] : 0.0f;
    for (int64_t t = 0; t < a.T; ++t) a.y[t * a.out + r] = acc[(r - r0) * a.T + t] + b;
  }
}

// One token or two keep 8 rows in flight (8 independent FMA chains); more tokens use V::rows x 4.
template <typename Fill>
void run(const QuantArgs& a, int64_t r0, int64_t r1, Fill fill) {
  if (a.T <= 2) run_rows<8>(a, r0, r1, fill);
  else run_rows<V::rows>(a, r0, r1, fill);
}

inline void halves(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  if constexpr (V::has_f16c)
    for (; i + 8 <= n; i += 8) V::half8(src + i, dst + i);
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

// Float scales and zero points of row r, all groups (vector conversions, once per row and call).
inline void row_params(const QuantArgs& a, int64_t r, float* scale, float* zero, uint8_t* zbuf) {
  halves(a.scales + r * a.n_groups, a.n_groups, scale);
  if (a.zero_mode == kZeroHalf) {
    halves(a.zeros + r * a.n_groups, a.n_groups, zero);
  } else if (a.zero_mode == kZeroSymmetric) {
    std::fill(zero, zero + a.n_groups, static_cast<float>(1 << (a.bits - 1)));
  } else {
    const uint8_t* z = unpack_codes(a.qzeros + r * a.zero_row_bytes, a.bits, 0, a.n_groups, zbuf);
    for (int64_t g = 0; g < a.n_groups; ++g) zero[g] = static_cast<float>(z[g]);
  }
}

// Decode-time fast path (T <= 4, 8/4/2 bits, groups made of whole chunks): RT rows are decoded straight into
// registers, one chunk of V::width bytes at a time, by V::dequant<BITS> (with the group's V::Group: scale, zero
// and, where V uses one, a table of (code - zero) * scale), and dotted with the NT tokens; nothing goes through
// memory. With V::permuted, register k of a chunk holds values per_byte * lane + k (no byte shuffles), and xp
// is x with each whole chunk of the row permuted to match (prepare_x); the row's last partial chunk is natural.
template <int BITS>
constexpr int64_t chunk_values() {
  return V::permuted ? V::width * (8 / BITS) : (8 / BITS);
}

inline float ternary_value(uint32_t symbol, float lo, float hi) { return symbol == 1 ? lo : (symbol == 2 ? hi : 0.0f); }

// TERN: ternary symbols (BITS = 2 packed, or BITS = 8: one decoded sub1 symbol per byte), scale/zero hold lo/hi.
template <int BITS, bool TERN, int RT, int NT>
void fused_block(const QuantArgs& a, const uint8_t* const* rows, int64_t nr, const float* const* xs, const float* scale,
                 const float* zero, float dots[RT][4]) {
  constexpr int per_byte = 8 / BITS;
  constexpr int64_t chunk = V::width * per_byte;
  typename V::reg acc[RT][NT];
  float tail[RT][NT];
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NT; ++j) acc[r][j] = V::zero(), tail[r][j] = 0.0f;
  for (int64_t g = 0; g < a.n_groups; ++g) {
    const int64_t s0 = g * a.group, e0 = s0 + a.group;
    typename V::Group params[RT];
    MOECONV_UNROLL for (int r = 0; r < RT; ++r) {
      const int64_t p = (r < nr ? r : 0) * a.n_groups + g;
      params[r] = TERN ? V::ternary(scale[p], zero[p]) : V::template group<BITS>(scale[p], zero[p]);
    }
    int64_t i = s0;
    for (; i + chunk <= e0; i += chunk) {
      MOECONV_UNROLL for (int r = 0; r < RT; ++r) {
        typename V::reg w[per_byte];
        V::template dequant<BITS, TERN>(rows[r] + i / per_byte, params[r], w);
        MOECONV_UNROLL for (int k = 0; k < per_byte; ++k) {
          MOECONV_UNROLL for (int j = 0; j < NT; ++j) acc[r][j] = V::fma(w[k], V::load(xs[j] + i + k * V::width), acc[r][j]);
        }
      }
    }
    for (; i < e0; ++i)
      for (int r = 0; r < RT; ++r) {
        const int64_t p = (r < nr ? r : 0) * a.n_groups + g;
        const uint32_t code = code_at(rows[r], BITS, i);
        const float wv = TERN ? ternary_value(code, scale[p], zero[p]) : (static_cast<float>(code) - zero[p]) * scale[p];
        for (int j = 0; j < NT; ++j) tail[r][j] += wv * xs[j][i];
      }
  }
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NT; ++j) dots[r][j] = V::hsum(acc[r][j]) + tail[r][j];
}

// Rows [r0, r1) by the fast path; row_src(r) is row r's packed codes (or decoded sub1 symbols).
template <int BITS, bool TERN, int RT, typename RowSrc>
void fused_rows(const QuantArgs& a, int64_t r0, int64_t r1, RowSrc row_src) {
  std::vector<float> scale(RT * a.n_groups), zero(RT * a.n_groups);
  std::vector<uint8_t> zbuf(a.n_groups + kSlack);
  const float* xs[4];
  for (int64_t j = 0; j < a.T; ++j) xs[j] = a.xp + j * a.in;
  for (int64_t rb = r0; rb < r1; rb += RT) {
    const int64_t nr = std::min<int64_t>(RT, r1 - rb);
    const uint8_t* rows[RT];
    for (int r = 0; r < RT; ++r) rows[r] = row_src(rb + (r < nr ? r : 0));  // rows past the end repeat row 0; ignored
    for (int64_t r = 0; r < nr; ++r) {
      if (TERN) scale[r] = a.lo_hi[2 * (rb + r)], zero[r] = a.lo_hi[2 * (rb + r) + 1];
      else row_params(a, rb + r, scale.data() + r * a.n_groups, zero.data() + r * a.n_groups, zbuf.data());
    }
    float dots[RT][4];
    switch (a.T) {
      case 4: fused_block<BITS, TERN, RT, 4>(a, rows, nr, xs, scale.data(), zero.data(), dots); break;
      case 3: fused_block<BITS, TERN, RT, 3>(a, rows, nr, xs, scale.data(), zero.data(), dots); break;
      case 2: fused_block<BITS, TERN, RT, 2>(a, rows, nr, xs, scale.data(), zero.data(), dots); break;
      default: fused_block<BITS, TERN, RT, 1>(a, rows, nr, xs, scale.data(), zero.data(), dots); break;
    }
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t t = 0; t < a.T; ++t) a.y[t * a.out + rb + r] = dots[r][t] + (a.bias ? a.bias[rb + r] : 0.0f);
  }
}

template <int BITS, bool TERN, typename RowSrc>
void fused(const QuantArgs& a, int64_t r0, int64_t r1, RowSrc row_src) {
  if (a.T <= 2) fused_rows<BITS, TERN, 8>(a, r0, r1, row_src);
  else fused_rows<BITS, TERN, V::rows>(a, r0, r1, row_src);
}

inline int64_t fused_chunk(int bits) {
  return bits == 8 ? chunk_values<8>() : (bits == 4 ? chunk_values<4>() : chunk_values<2>());
}

// (ternary: bits 2, one group per row; sub1: bits 8 over its decoded symbols, one group per row.)
inline bool fused_fits(const QuantArgs& a) {
  return a.T <= 4 && a.bits != 3 && (a.group % fused_chunk(a.bits) == 0 || a.n_groups == 1);
}

// xp [T, in]: x with every whole chunk of the fast path's order permuted (see above); a copy of x otherwise.
inline void prepare_x(const QuantArgs& a, float* xp) {
  const bool permute = V::permuted && fused_fits(a);
  const int64_t per_byte = permute ? 8 / a.bits : 1, chunk = permute ? fused_chunk(a.bits) : 1;
  const int64_t whole = permute ? a.in - a.in % chunk : 0;
  for (int64_t t = 0; t < a.T; ++t) {
    const float* x = a.x + t * a.in;
    float* out = xp + t * a.in;
    for (int64_t c = 0; c < whole; c += chunk)
      for (int64_t k = 0; k < per_byte; ++k)
        for (int64_t lane = 0; lane < V::width; ++lane) out[c + k * V::width + lane] = x[c + per_byte * lane + k];
    std::memcpy(out + whole, x + whole, (a.in - whole) * sizeof(float));
  }
}


}  // namespace MOECONV_QUANT_NS
}  // namespace moeconv_cpu

#include "quant_rows_impl.h"
