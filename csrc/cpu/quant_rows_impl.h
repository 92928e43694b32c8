// The quantized kernels' entry point per ISA (rows) and the sub1 stream decoder; part of quant_cpu_impl.h.
namespace moeconv_cpu {
namespace MOECONV_QUANT_NS {

// The 28 symbol slots of a sub1 dictionary entry as 32 bytes at dst (one symbol 0..3 per byte; slots past the
// entry's length are garbage the next code overwrites). V::spread where the ISA has a fast one (PDEP), else a table.
inline void spread(uint64_t entry, uint8_t* dst) {
  if constexpr (V::has_spread) {
    V::spread(entry, dst);
  } else {
    static const auto four = [] {  // byte of 4 symbols -> 4 bytes of one symbol each
      std::vector<uint32_t> t(256);
      for (uint32_t v = 0; v < 256; ++v) t[v] = (v & 3) | ((v >> 2 & 3) << 8) | ((v >> 4 & 3) << 16) | ((v >> 6 & 3) << 24);
      return t;
    }();
    for (int k = 0; k < 8; ++k) std::memcpy(dst + 4 * k, &four[(entry >> (8 * k)) & 255u], 4);
  }
}

// A block's codes [c, end) decode, one group of rows at a time, into `sym`: `filled` symbols are there, the first
// `target` are the rows asked for and any more (a code spanning into the next rows) are carried by the caller.
// False when the stream names a code outside the dictionary; `sym` has kSlack bytes of slack past target + 28.
inline bool decode_rows(const QuantArgs& a, int64_t& c, int64_t end, uint8_t* sym, int64_t& filled, int64_t target) {
  for (; filled < target && c < end; ++c) {
    const uint16_t code = a.codes[c];
    if (code >= a.dict_size) return false;
    const uint64_t entry = static_cast<uint64_t>(a.dictionary[code]);
    spread(entry, sym + filled);
    filled += 2 * static_cast<int64_t>((entry >> 56) & 15u);
  }
  return filled >= target;
}

// sub1 rows [begin, end) (block-aligned): blocks decode in groups of kSub1Rows rows, each group used while in cache.
constexpr int64_t kSub1Rows = 8;

template <typename Process>
inline bool sub1_blocks(const QuantArgs& a, int64_t begin, int64_t end, Process process) {
  const int64_t R = a.block_rows, padded = a.in + a.in % 2;  // a row is 2P symbols
  const int64_t n_blocks = (a.out + R - 1) / R;
  std::vector<uint8_t> sym(kSub1Rows * padded + 32 + kSlack);
  for (int64_t b = begin / R; b * R < end; ++b) {
    const int64_t first = b * R, last = std::min(a.out, first + R);
    int64_t c = a.block_offsets[b];
    const int64_t stop = b + 1 < n_blocks ? a.block_offsets[b + 1] : a.num_codes;
    if (c < 0 || c > stop || stop > a.num_codes) return false;
    int64_t filled = 0;
    for (int64_t r0 = first; r0 < last; r0 += kSub1Rows) {
      const int64_t r1 = std::min(last, r0 + kSub1Rows), target = (r1 - r0) * padded;
      if (!decode_rows(a, c, stop, sym.data(), filled, target) || filled - target > 28) return false;
      process(r0, r1, sym.data(), padded);
      std::memmove(sym.data(), sym.data() + target, filled - target);  // a code spanning into the next rows
      filled -= target;
    }
    if (c != stop || filled != 0) return false;  // the block's codes decode to exactly its rows
  }
  return true;
}

inline void rows(const QuantArgs& a, int64_t begin, int64_t end) {
  const auto packed = [&](int64_t r) { return a.qweight + r * a.row_bytes; };
  if (a.kind == kQuantInt && fused_fits(a)) {
    if (a.bits == 8) fused<8, false>(a, begin, end, packed);
    else if (a.bits == 4) fused<4, false>(a, begin, end, packed);
    else fused<2, false>(a, begin, end, packed);
  } else if (a.kind == kQuantInt) {
    const int64_t group = a.group;
    run(a, begin, end, [&](int64_t r, int64_t c0, int64_t c1, uint8_t* cbuf, float* dst) {
      const uint8_t* codes = unpack_codes(a.qweight + r * a.row_bytes, a.bits, c0, c1 - c0, cbuf);
      for (int64_t s = c0; s < c1;) {
        const int64_t g = s / group, e = std::min(c1, (g + 1) * group);
        dequant(codes + (s - c0), e - s, zero_of(a, r, g), half_to_float(a.scales[r * a.n_groups + g]), dst + (s - c0));
        s = e;
      }
    });
  } else if (a.kind == kQuantTernary && fused_fits(a)) {
    fused<2, true>(a, begin, end, packed);
  } else if (a.kind == kQuantTernary) {
    run(a, begin, end, [&](int64_t r, int64_t c0, int64_t c1, uint8_t* cbuf, float* dst) {
      const uint8_t* symbols = unpack_codes(a.qweight + r * a.row_bytes, 2, c0, c1 - c0, cbuf);
      lookup(symbols, c1 - c0, a.lo_hi[2 * r], a.lo_hi[2 * r + 1], dst);
    });
  } else {
    const bool ok = sub1_blocks(a, begin, end, [&](int64_t r0, int64_t r1, const uint8_t* sym, int64_t padded) {
      const auto row = [&](int64_t r) { return sym + (r - r0) * padded; };
      if (fused_fits(a)) {
        fused<8, true>(a, r0, r1, row);
      } else {
        run(a, r0, r1, [&](int64_t r, int64_t c0, int64_t c1, uint8_t*, float* dst) {
          lookup(row(r) + c0, c1 - c0, a.lo_hi[2 * r], a.lo_hi[2 * r + 1], dst);
        });
      }
    });
    if (!ok) a.error->store(1);
  }
}

}  // namespace MOECONV_QUANT_NS
}  // namespace moeconv_cpu
