// Streaming (decode) MoE kernels, written once against a small SIMD wrapper `V` and compiled
// per ISA: the including translation unit defines MOECONV_ISA_NS and the vector type first.
// Memory-bound design: each weight row is loaded once and dotted with up to 4 token vectors
// held in L1, with RT rows in flight so that even one token has independent FMA chains.
#include <cmath>
#include <cstring>

#include "moe_cpu.h"

namespace moeconv_cpu {
namespace MOECONV_ISA_NS {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if (std::isnan(f)) return 0x7fc0;
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

inline float load_scalar(const float* p) { return *p; }
inline float load_scalar(const uint16_t* p) { return bf16_to_float(*p); }

inline float activate(float g, int activation) {
  switch (activation) {
    case kSilu: return g / (1.0f + std::exp(-g));
    case kGeluTanh: {
      const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
      return 0.5f * g * (1.0f + std::tanh(inner));
    }
    case kGelu: return 0.5f * g * (1.0f + std::erf(g * 0.7071067811865476f));
    case kIdentity: return g;
    default: return g > 0.0f ? g : (g < 0.0f ? 0.0f : g);  // keeps NaN as NaN
  }
}

inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#endif
}

// dots[r][j] = <w_rows[r], xs[j]> for r < RT, j < NT; rows and vectors have length n.  Each cache line read is also
// prefetched `ahead` elements further on (the next row block): an expert's rows are short streams that the hardware
// prefetcher ramps up on too late, and decode reads them from DRAM.
template <int RT, int NT, typename W>
inline void dot_tile(const W* const* w_rows, const float* const* xs, int64_t n, float dots[RT][NT], int64_t ahead) {
  constexpr int64_t kLine = 64 / sizeof(W);  // elements per cache line
  typename V::reg acc[RT][NT];
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NT; ++j) acc[r][j] = V::zero();
  int64_t i = 0;
  for (; i + V::width <= n; i += V::width) {
    if (i % kLine == 0)
      for (int r = 0; r < RT; ++r) prefetch(w_rows[r] + i + ahead);
    typename V::reg xv[NT];
    for (int j = 0; j < NT; ++j) xv[j] = V::load(xs[j] + i);
    for (int r = 0; r < RT; ++r) {
      const typename V::reg wv = V::load(w_rows[r] + i);
      for (int j = 0; j < NT; ++j) acc[r][j] = V::fma(wv, xv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NT; ++j) dots[r][j] = V::hsum(acc[r][j]);
  for (; i < n; ++i)
    for (int r = 0; r < RT; ++r) {
      const float wv = load_scalar(w_rows[r] + i);
      for (int j = 0; j < NT; ++j) dots[r][j] += wv * xs[j][i];
    }
}

template <int RT, int NT, typename W>
inline void copy_dots(const W* const* w_rows, const float* const* xs, int64_t n, float dots[RT][4], int64_t ahead) {
  float t[RT][NT];
  dot_tile<RT, NT>(w_rows, xs, n, t, ahead);
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NT; ++j) dots[r][j] = t[r][j];
}

// Calls fn(r0, nrows, j0, ntokens, dots) over all RT-row blocks of `rows` x 4-vector blocks of `nvec`.
template <int RT, typename W, typename Fn>
inline void tiles_of(const W* w, int64_t ldw, int64_t rows, const float* const* xs, int64_t nvec, int64_t n, Fn fn) {
  for (int64_t r0 = 0; r0 < rows; r0 += RT) {
    const int64_t nr = rows - r0 < RT ? rows - r0 : RT;
    const W* w_rows[RT];
    for (int r = 0; r < RT; ++r) w_rows[r] = w + (r0 + (r < nr ? r : 0)) * ldw;  // [RT] row pointers
    for (int64_t j0 = 0; j0 < nvec; j0 += 4) {
      const int64_t nj = nvec - j0 < 4 ? nvec - j0 : 4;
      // Rows past the end repeat row r0 (valid, in cache); their results are ignored.
      float dots[RT][4];
      const int64_t ahead = RT * ldw;  // the same place in the next row block
      switch (nj) {
        case 4: dot_tile<RT, 4>(w_rows, xs + j0, n, dots, ahead); break;
        case 3: copy_dots<RT, 3>(w_rows, xs + j0, n, dots, ahead); break;
        case 2: copy_dots<RT, 2>(w_rows, xs + j0, n, dots, ahead); break;
        default: copy_dots<RT, 1>(w_rows, xs + j0, n, dots, ahead); break;
      }
      fn(r0, nr, j0, nj, dots);
    }
  }
}

// tiles_of with V::rows rows a block, or V::rows_one for a single vector: at decode an expert sees one token, and the
// independent FMA chains that hide the FMA latency then come from rows alone (AVX2's 2 rows left it latency-bound).
template <typename W, typename Fn>
inline void for_tiles(const W* w, int64_t ldw, int64_t rows, const float* const* xs, int64_t nvec, int64_t n, Fn fn) {
  if (nvec == 1) tiles_of<V::rows_one>(w, ldw, rows, xs, nvec, n, fn);
  else tiles_of<V::rows>(w, ldw, rows, xs, nvec, n, fn);
}

constexpr int kMaxPairsPerTile = 64;  // token pointers gathered on the stack per block

template <typename W>
void up_rows_t(const DecodeArgs& a, int64_t begin, int64_t end) {
  const float* xs_all[kMaxPairsPerTile];
  while (begin < end) {
    const int64_t ai = begin / a.s, r_begin = begin % a.s;
    const int64_t r_end = (ai + 1) * a.s < end ? a.s : end - ai * a.s;
    const int64_t e = a.active[ai];
    const int64_t p0 = a.pair_start[ai], np = a.pair_start[ai + 1] - p0;
    const W* wu = static_cast<const W*>(a.w_up) + (e * a.s + r_begin) * a.d;
    const W* wg = a.w_gate ? static_cast<const W*>(a.w_gate) + (e * a.s + r_begin) * a.d : nullptr;
    const float* bu = a.b_up ? a.b_up + e * a.s : nullptr;
    const float* bg = a.b_gate ? a.b_gate + e * a.s : nullptr;
    const int64_t rows = r_end - r_begin;
    for (int64_t q0 = 0; q0 < np; q0 += kMaxPairsPerTile) {
      const int64_t nq = np - q0 < kMaxPairsPerTile ? np - q0 : kMaxPairsPerTile;
      for (int64_t q = 0; q < nq; ++q) xs_all[q] = a.x + a.pair_token[p0 + q0 + q] * a.d;
      float* h = a.h + (p0 + q0) * a.s + r_begin;  // h[q * s + r]
      // Pass 1 (up) stores up x + b; pass 2 (gate) combines in place: h = act(gate x + b) * h.
      for_tiles(wu, a.d, rows, xs_all, nq, a.d, [&](int64_t r0, int64_t nr, int64_t j0, int64_t nj, float (*dots)[4]) {
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t j = 0; j < nj; ++j) {
            const float u = dots[r][j] + (bu ? bu[r_begin + r0 + r] : 0.0f);
            h[(j0 + j) * a.s + r0 + r] = wg ? u : activate(u, a.activation);
          }
      });
      if (wg) {
        for_tiles(wg, a.d, rows, xs_all, nq, a.d, [&](int64_t r0, int64_t nr, int64_t j0, int64_t nj, float (*dots)[4]) {
          for (int64_t r = 0; r < nr; ++r)
            for (int64_t j = 0; j < nj; ++j) {
              const float g = dots[r][j] + (bg ? bg[r_begin + r0 + r] : 0.0f);
              float& hv = h[(j0 + j) * a.s + r0 + r];
              hv = activate(g, a.activation) * hv;
            }
        });
      }
    }
    begin = ai * a.s + r_end;
  }
}

// down_cols' first step: zero acc's columns [begin, end), unless an earlier problem's sum is there to add to.
inline void start_cols(const DecodeArgs& a, int64_t begin, int64_t end) {
  if (a.accumulate) return;
  for (int64_t t = 0; t < a.T; ++t)
    for (int64_t i = begin; i < end; ++i) a.acc[t * a.d + i] = 0.0f;
}

// down_cols' last step: acc's columns [begin, end) (+ out_bias) to out in its dtype; no out: a later problem adds.
inline void finish_cols(const DecodeArgs& a, int64_t begin, int64_t end) {
  if (a.out == nullptr || (a.out_bias == nullptr && a.dtype == kFloat32 && static_cast<void*>(a.acc) == a.out)) return;
  for (int64_t t = 0; t < a.T; ++t)
    for (int64_t i = begin; i < end; ++i) {
      const float v = a.acc[t * a.d + i] + (a.out_bias ? a.out_bias[i] : 0.0f);
      if (a.dtype == kBFloat16) static_cast<uint16_t*>(a.out)[t * a.d + i] = float_to_bf16(v);
      else static_cast<float*>(a.out)[t * a.d + i] = v;
    }
}

template <typename W>
void down_cols_t(const DecodeArgs& a, int64_t begin, int64_t end) {
  const float* hs[kMaxPairsPerTile];
  start_cols(a, begin, end);
  for (int64_t ai = 0; ai < a.n_active; ++ai) {
    const int64_t e = a.active[ai];
    const int64_t p0 = a.pair_start[ai], np = a.pair_start[ai + 1] - p0;
    const W* wd = static_cast<const W*>(a.w_down) + (e * a.d + begin) * a.s;
    for (int64_t q0 = 0; q0 < np; q0 += kMaxPairsPerTile) {
      const int64_t nq = np - q0 < kMaxPairsPerTile ? np - q0 : kMaxPairsPerTile;
      for (int64_t q = 0; q < nq; ++q) hs[q] = a.h + (p0 + q0 + q) * a.s;
      for_tiles(wd, a.s, end - begin, hs, nq, a.s, [&](int64_t r0, int64_t nr, int64_t j0, int64_t nj, float (*dots)[4]) {
        for (int64_t j = 0; j < nj; ++j) {
          const int64_t p = p0 + q0 + j0 + j;
          float* acc = a.acc + a.pair_token[p] * a.d + begin + r0;
          const float w = a.pair_weight[p];
          for (int64_t r = 0; r < nr; ++r) acc[r] += w * dots[r][j];
        }
      });
    }
  }
  finish_cols(a, begin, end);
}

inline void up_rows(const DecodeArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == kBFloat16) up_rows_t<uint16_t>(a, begin, end);
  else up_rows_t<float>(a, begin, end);
}

inline void down_cols(const DecodeArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == kBFloat16) down_cols_t<uint16_t>(a, begin, end);
  else down_cols_t<float>(a, begin, end);
}

}  // namespace MOECONV_ISA_NS
}  // namespace moeconv_cpu
