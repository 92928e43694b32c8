// AVX512-BF16 streaming kernels (picked at run time when the CPU has avx512_bf16): bfloat16 weight
// rows dotted with bfloat16 activations by vdpbf16ps (fp32 accumulation), twice the multiply-adds
// per instruction of the widen-to-fp32 AVX-512 tile.  float32 problems use the AVX-512 FMA tile.
//
// No weight repacking: vdpbf16ps multiplies adjacent bf16 pairs of both operands and adds both
// products into one fp32 lane, so a dot product along the contiguous reduction axis (d for
// gate/up, s for down) consumes the weights in their stored [E, s, d] / [E, d, s] layout.  The
// pair interleave (and a cached pre-packed copy) would only be needed for a broadcast-outer-product
// tile.  Each 16-lane accumulator is reduced at the end of a dot product; a 4x4 tile's 16 of them
// are reduced together by a shuffle tree into one vector of 16 dots, whose epilogue (bias,
// activation, bf16 rounding, weighted accumulation) is vectorized too.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "moe_cpu.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

// As in moe_avx512.cpp: the target covers only this file's own namespace, never shared inline code.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
// GCC 12 flags the intrinsics' own `__Y = __Y` idiom as maybe-uninitialized (false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
#endif

// The float32 problems reuse the shared AVX-512 FMA tile, instantiated in this namespace.
#define MOECONV_ISA_NS avx512bf16
namespace moeconv_cpu {
namespace avx512bf16 {
struct V {
  using reg = __m512;
  static constexpr int width = 16;
  static constexpr int rows = 4;
  static constexpr int rows_one = 8;  // fp32 problems, a single token: 8 rows = 8 chains
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline reg load(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float hsum(reg a) { return _mm512_reduce_add_ps(a); }
};
}  // namespace avx512bf16
}  // namespace moeconv_cpu
#include "moe_cpu_impl.h"

namespace moeconv_cpu {
namespace avx512bf16 {

constexpr int kRows = 4;    // weight rows per tile
constexpr int kTokens = 4;  // activation vectors per tile: 16 accumulators + 8 operands of 32 zmm

inline __m512bh load_pairs(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_pairs(const uint16_t* p, __mmask32 keep) { return (__m512bh)_mm512_maskz_loadu_epi16(keep, p); }

// Lane i of the result = sum of the 16 lanes of v[i].  Four levels, each halving the vectors:
// within 64-bit halves, within 128-bit lanes, across lane pairs, across the 512-bit vector.
inline __m512 reduce16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v0 part, v1 part, v0 part, v1 part]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [v0, v1, v2, v3] lane sums
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes [b0 (lanes 0+1), b0 (2+3), b1 (0+1), b1 (2+3)]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// Lane j * 4 + r (token-major) = <w_rows[r], xs[j]> for r < 4, j < NT (both bf16, length n); other j are 0.
template <int NT>
inline __m512 dot_tile_bf16(const uint16_t* const* w_rows, const uint16_t* const* xs, int64_t n) {
  __m512 acc[kRows][NT];
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < NT; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512bh xv[NT];
    for (int j = 0; j < NT; ++j) xv[j] = load_pairs(xs[j] + i);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh wv = load_pairs(w_rows[r] + i);
      for (int j = 0; j < NT; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);
    }
  }
  if (i < n) {  // masked tail: the zeroed lanes add 0 * 0
    const __mmask32 keep = _cvtu32_mask32((1u << (n - i)) - 1u);
    __m512bh xv[NT];
    for (int j = 0; j < NT; ++j) xv[j] = load_pairs(xs[j] + i, keep);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh wv = load_pairs(w_rows[r] + i, keep);
      for (int j = 0; j < NT; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);
    }
  }
  __m512 all[16];
  for (int j = 0; j < kTokens; ++j)
    for (int r = 0; r < kRows; ++r) all[j * kRows + r] = j < NT ? acc[r][j < NT ? j : 0] : _mm512_setzero_ps();
  return reduce16(all);
}

// Calls fn(r0, nrows, j0, ntokens, dots) over 4-row blocks of `rows` x 4-vector blocks of `nvec`;
// dots lane j * 4 + r holds row r0 + r . vector j0 + j.
template <typename Fn>
inline void for_tiles_bf16(const uint16_t* w, int64_t ldw, int64_t rows, const uint16_t* const* xs, int64_t nvec,
                           int64_t n, Fn fn) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t nr = rows - r0 < kRows ? rows - r0 : kRows;
    const uint16_t* w_rows[kRows];
    for (int r = 0; r < kRows; ++r) w_rows[r] = w + (r0 + (r < nr ? r : 0)) * ldw;  // extra rows repeat r0
    for (int64_t j0 = 0; j0 < nvec; j0 += kTokens) {
      const int64_t nj = nvec - j0 < kTokens ? nvec - j0 : kTokens;
      __m512 dots;
      switch (nj) {
        case 4: dots = dot_tile_bf16<4>(w_rows, xs + j0, n); break;
        case 3: dots = dot_tile_bf16<3>(w_rows, xs + j0, n); break;
        case 2: dots = dot_tile_bf16<2>(w_rows, xs + j0, n); break;
        default: dots = dot_tile_bf16<1>(w_rows, xs + j0, n); break;
      }
      fn(r0, nr, j0, nj, dots);
    }
  }
}

// e^x: 2^n * p(f) with n = round(x / ln 2), f = x - n ln 2 in [-ln2/2, ln2/2], p the degree-6
// Taylor polynomial (relative error ~1e-7, below fp32 rounding of the callers' products).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));  // NaN -> finite; callers keep it
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts (Cody-Waite)
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// activate() on 16 lanes: silu and relu vectorized (NaN stays NaN), the erf/tanh GELUs per lane.
inline __m512 activate_ps(__m512 g, int activation) {
  if (activation == kSilu) return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
  if (activation == kIdentity) return g;
  if (activation == kRelu) return _mm512_mask_mov_ps(g, _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps());
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, g);
  for (float& v : lanes) v = activate(v, activation);
  return _mm512_load_ps(lanes);
}

// 4 bias values of rows r0.. (the first nr), repeated for each token: lane j * 4 + r = b[r].
inline __m512 bias_lanes(const float* b, __mmask8 rows) {
  return b ? _mm512_broadcast_f32x4(_mm_maskz_loadu_ps(rows, b)) : _mm512_setzero_ps();
}

// h_bf16 rows for the flattened (active expert, intermediate row) range [begin, end) of n_active * s.
void up_rows_bf16(const DecodeArgs& a, int64_t begin, int64_t end) {
  const uint16_t* const x = static_cast<const uint16_t*>(a.x_bf16);
  uint16_t* const hb = static_cast<uint16_t*>(a.h_bf16);
  const uint16_t* xs_all[kMaxPairsPerTile];
  while (begin < end) {
    const int64_t ai = begin / a.s, r_begin = begin % a.s;
    const int64_t r_end = (ai + 1) * a.s < end ? a.s : end - ai * a.s;
    const int64_t e = a.active[ai];
    const int64_t p0 = a.pair_start[ai], np = a.pair_start[ai + 1] - p0;
    const uint16_t* wu = static_cast<const uint16_t*>(a.w_up) + (e * a.s + r_begin) * a.d;
    const uint16_t* wg = a.w_gate ? static_cast<const uint16_t*>(a.w_gate) + (e * a.s + r_begin) * a.d : nullptr;
    const float* bu = a.b_up ? a.b_up + e * a.s + r_begin : nullptr;
    const float* bg = a.b_gate ? a.b_gate + e * a.s + r_begin : nullptr;
    const int64_t rows = r_end - r_begin;
    for (int64_t q0 = 0; q0 < np; q0 += kMaxPairsPerTile) {
      const int64_t nq = np - q0 < kMaxPairsPerTile ? np - q0 : kMaxPairsPerTile;
      for (int64_t q = 0; q < nq; ++q) xs_all[q] = x + a.pair_token[p0 + q0 + q] * a.d;
      float* h = a.h + (p0 + q0) * a.s + r_begin;      // fp32 up x + b while the gate pass runs
      uint16_t* hq = hb + (p0 + q0) * a.s + r_begin;  // [q * s + r] final activations, bf16
      // Pass 1 (up): gated stores up x + b in fp32; non-gated writes act(up x + b) as bf16.
      for_tiles_bf16(wu, a.d, rows, xs_all, nq, a.d, [&](int64_t r0, int64_t nr, int64_t j0, int64_t nj, __m512 dots) {
        const __mmask8 rmask = static_cast<__mmask8>((1u << nr) - 1u);
        const __m512 u = _mm512_add_ps(dots, bias_lanes(bu ? bu + r0 : nullptr, rmask));
        if (wg) {
          alignas(64) float lanes[16];
          _mm512_store_ps(lanes, u);
          for (int64_t j = 0; j < nj; ++j) _mm_mask_storeu_ps(h + (j0 + j) * a.s + r0, rmask, _mm_load_ps(lanes + 4 * j));
        } else {
          alignas(32) uint16_t lanes[16];
          _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), (__m256i)_mm512_cvtneps_pbh(activate_ps(u, a.activation)));
          for (int64_t j = 0; j < nj; ++j)
            _mm_mask_storeu_epi16(hq + (j0 + j) * a.s + r0, rmask, _mm_loadl_epi64(reinterpret_cast<const __m128i*>(lanes + 4 * j)));
        }
      });
      if (wg) {  // Pass 2 (gate): h = act(gate x + b) * (up x + b), rounded once to bf16.
        for_tiles_bf16(wg, a.d, rows, xs_all, nq, a.d, [&](int64_t r0, int64_t nr, int64_t j0, int64_t nj, __m512 dots) {
          const __mmask8 rmask = static_cast<__mmask8>((1u << nr) - 1u);
          const __m512 g = _mm512_add_ps(dots, bias_lanes(bg ? bg + r0 : nullptr, rmask));
          alignas(64) float ups[16] = {};
          for (int64_t j = 0; j < nj; ++j) _mm_store_ps(ups + 4 * j, _mm_maskz_loadu_ps(rmask, h + (j0 + j) * a.s + r0));
          const __m512 hv = _mm512_mul_ps(activate_ps(g, a.activation), _mm512_load_ps(ups));
          alignas(32) uint16_t lanes[16];
          _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), (__m256i)_mm512_cvtneps_pbh(hv));
          for (int64_t j = 0; j < nj; ++j)
            _mm_mask_storeu_epi16(hq + (j0 + j) * a.s + r0, rmask, _mm_loadl_epi64(reinterpret_cast<const __m128i*>(lanes + 4 * j)));
        });
      }
    }
    begin = ai * a.s + r_end;
  }
}

// out columns [begin, end) of d: zero (unless accumulating), add every active expert's down rows . h_bf16, write bf16.
void down_cols_bf16(const DecodeArgs& a, int64_t begin, int64_t end) {
  const uint16_t* const hb = static_cast<const uint16_t*>(a.h_bf16);
  const uint16_t* hs[kMaxPairsPerTile];
  start_cols(a, begin, end);
  for (int64_t ai = 0; ai < a.n_active; ++ai) {
    const int64_t e = a.active[ai];
    const int64_t p0 = a.pair_start[ai], np = a.pair_start[ai + 1] - p0;
    const uint16_t* wd = static_cast<const uint16_t*>(a.w_down) + (e * a.d + begin) * a.s;
    for (int64_t q0 = 0; q0 < np; q0 += kMaxPairsPerTile) {
      const int64_t nq = np - q0 < kMaxPairsPerTile ? np - q0 : kMaxPairsPerTile;
      for (int64_t q = 0; q < nq; ++q) hs[q] = hb + (p0 + q0 + q) * a.s;
      for_tiles_bf16(wd, a.s, end - begin, hs, nq, a.s, [&](int64_t r0, int64_t nr, int64_t j0, int64_t nj, __m512 dots) {
        const __mmask8 rmask = static_cast<__mmask8>((1u << nr) - 1u);
        alignas(64) float lanes[16];
        _mm512_store_ps(lanes, dots);
        for (int64_t j = 0; j < nj; ++j) {
          const int64_t p = p0 + q0 + j0 + j;
          float* acc = a.acc + a.pair_token[p] * a.d + begin + r0;
          const __m128 sum = _mm_fmadd_ps(_mm_set1_ps(a.pair_weight[p]), _mm_load_ps(lanes + 4 * j), _mm_maskz_loadu_ps(rmask, acc));
          _mm_mask_storeu_ps(acc, rmask, sum);
        }
      });
    }
  }
  finish_cols(a, begin, end);
}

void up_rows_any(const DecodeArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == kBFloat16) up_rows_bf16(a, begin, end);
  else up_rows_t<float>(a, begin, end);
}

void down_cols_any(const DecodeArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == kBFloat16) down_cols_bf16(a, begin, end);
  else down_cols_t<float>(a, begin, end);
}

}  // namespace avx512bf16
}  // namespace moeconv_cpu

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

namespace moeconv_cpu {
const KernelTable* table_avx512bf16() {
  static const KernelTable table{"avx512bf16", &avx512bf16::up_rows_any, &avx512bf16::down_cols_any, true};
  return &table;
}
}  // namespace moeconv_cpu

#else
namespace moeconv_cpu {
const KernelTable* table_avx512bf16() { return nullptr; }
}  // namespace moeconv_cpu
#endif
