// SSE2 code unpacking shared by the x86 quantized kernels: included inside each ISA file's target region,
// after it defines MOECONV_QUANT_NS, so each ISA gets its own copy (no inline function shared across targets).
namespace moeconv_cpu {
namespace MOECONV_QUANT_NS {

// 4-bit codes: byte i holds values 2i (low nibble) and 2i+1 -> dst[0 .. 2 * nbytes).
inline void unpack4_x86(const uint8_t* src, int64_t nbytes, uint8_t* dst) {
  const __m128i mask = _mm_set1_epi8(15);
  int64_t i = 0;
  for (; i + 16 <= nbytes; i += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), _mm_unpacklo_epi8(lo, hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i + 16), _mm_unpackhi_epi8(lo, hi));
  }
  for (; i < nbytes; ++i) {
    dst[2 * i] = src[i] & 15;
    dst[2 * i + 1] = src[i] >> 4;
  }
}

// 2-bit codes: byte i holds values 4i .. 4i+3 from the low bits up -> dst[0 .. 4 * nbytes).
inline void unpack2_x86(const uint8_t* src, int64_t nbytes, uint8_t* dst) {
  const __m128i mask = _mm_set1_epi8(3);
  int64_t i = 0;
  for (; i + 16 <= nbytes; i += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i v0 = _mm_and_si128(b, mask), v1 = _mm_and_si128(_mm_srli_epi16(b, 2), mask);
    const __m128i v2 = _mm_and_si128(_mm_srli_epi16(b, 4), mask), v3 = _mm_and_si128(_mm_srli_epi16(b, 6), mask);
    const __m128i a_lo = _mm_unpacklo_epi8(v0, v1), a_hi = _mm_unpackhi_epi8(v0, v1);  // (v0, v1) pairs
    const __m128i b_lo = _mm_unpacklo_epi8(v2, v3), b_hi = _mm_unpackhi_epi8(v2, v3);  // (v2, v3) pairs
    __m128i* out = reinterpret_cast<__m128i*>(dst + 4 * i);
    _mm_storeu_si128(out, _mm_unpacklo_epi16(a_lo, b_lo));
    _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(a_lo, b_lo));
    _mm_storeu_si128(out + 2, _mm_unpacklo_epi16(a_hi, b_hi));
    _mm_storeu_si128(out + 3, _mm_unpackhi_epi16(a_hi, b_hi));
  }
  for (; i < nbytes; ++i)
    for (int k = 0; k < 4; ++k) dst[4 * i + k] = (src[i] >> (2 * k)) & 3;
}

}  // namespace MOECONV_QUANT_NS
}  // namespace moeconv_cpu
