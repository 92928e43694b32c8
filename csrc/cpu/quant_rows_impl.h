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
// (Loop state lives in locals: the byte stores may alias anything, which would keep references in memory.)
inline bool decode_rows(const QuantArgs& a, int64_t& c_ref, int64_t end, uint8_t* sym, int64_t& filled_ref, int64_t target) {
  const uint16_t* codes = a.codes;
  const int64_t* dictionary = a.dictionary;
  const int64_t dict_size = a.dict_size;
  int64_t c = c_ref, filled = filled_ref;
  bool ok = true;
  for (; filled < target && c < end; ++c) {
    const uint16_t code = codes[c];
    if (code >= dict_size) {
      ok = false;
      break;
    }
    const uint64_t entry = static_cast<uint64_t>(dictionary[code]);
    spread(entry, sym + filled);
    filled += 2 * static_cast<int64_t>((entry >> 56) & 15u);
  }
  c_ref = c, filled_ref = filled;
  return ok && filled >= target;
}

// As decode_rows, into 2-bit symbols packed 4 per byte (the ternary layout) by a bit writer: each code's symbols
// are already 2-bit fields of its entry, so a code is an OR, a shift and an 8-byte store, and a block of rows is a
// quarter of the bytes (L1-sized). `acc` holds the written bits of the byte at `out` (nb of them, < 8).
struct BitWriter {
  uint8_t* out;
  uint64_t acc = 0;
  int nb = 0;
};

inline bool decode_rows_packed(const QuantArgs& a, int64_t& c_ref, int64_t end, BitWriter& w, int64_t& filled_ref,
                               int64_t target) {
  const uint16_t* codes = a.codes;
  const int64_t* dictionary = a.dictionary;
  const int64_t dict_size = a.dict_size;
  int64_t c = c_ref, filled = filled_ref;
  uint8_t* out = w.out;
  uint64_t acc = w.acc;
  int nb = w.nb;
  bool ok = true;
  for (; filled < target && c < end; ++c) {
    const uint16_t code = codes[c];
    const uint64_t entry = code < dict_size ? static_cast<uint64_t>(dictionary[code]) : ~0ull;
    const int count = 2 * static_cast<int>((entry >> 56) & 15u);  // symbols, <= 28 in a valid entry
    if (code >= dict_size || count > 28) {
      ok = false;
      break;
    }
    acc |= (entry & ((1ull << (2 * count)) - 1)) << nb;  // nb + 2 count <= 63
    nb += 2 * count;
    std::memcpy(out, &acc, 8);
    const int bytes = nb >> 3;
    out += bytes, acc >>= 8 * bytes, nb &= 7;
    filled += count;
  }
  c_ref = c, filled_ref = filled, w.out = out, w.acc = acc, w.nb = nb;
  return ok && filled >= target;
}

// sub1 rows [begin, end) (block-aligned): blocks decode in groups of kSub1Rows rows, each group used while in cache.
// Rows of a whole number of bytes at 2 bits (2P % 4 == 0, the torch side then sets bits = 2) decode packed;
// otherwise one symbol per byte.
constexpr int64_t kSub1Rows = 8;

template <typename Process>
inline bool sub1_blocks(const QuantArgs& a, int64_t begin, int64_t end, Process process) {
  const int64_t R = a.block_rows, padded = a.in + a.in % 2;  // a row is 2P symbols
  const bool packed = a.bits == 2;
  const int64_t stride = packed ? padded / 4 : padded;  // bytes per decoded row
  const int64_t n_blocks = (a.out + R - 1) / R;
  std::vector<uint8_t> sym(kSub1Rows * stride + 32 + kSlack);
  for (int64_t b = begin / R; b * R < end; ++b) {
    const int64_t first = b * R, last = std::min(a.out, first + R);
    int64_t c = a.block_offsets[b];
    const int64_t stop = b + 1 < n_blocks ? a.block_offsets[b + 1] : a.num_codes;
    if (c < 0 || c > stop || stop > a.num_codes) return false;
    int64_t filled = 0;
    BitWriter w{sym.data()};
    for (int64_t r0 = first; r0 < last; r0 += kSub1Rows) {
      const int64_t r1 = std::min(last, r0 + kSub1Rows), target = (r1 - r0) * padded;
      const bool ok = packed ? decode_rows_packed(a, c, stop, w, filled, target) : decode_rows(a, c, stop, sym.data(), filled, target);
      if (!ok || filled - target > 28) return false;
      process(r0, r1, sym.data(), stride);
      const int64_t over = filled - target;  // symbols of a code spanning into the next rows: carried
      if (packed) {
        std::memmove(sym.data(), sym.data() + target / 4, (over + 3) / 4);
        w.out = sym.data() + over / 4, w.nb = static_cast<int>(2 * (over % 4));
        w.acc = w.nb ? (*w.out & ((1u << w.nb) - 1)) : 0;
      } else {
        std::memmove(sym.data(), sym.data() + target, over);
      }
      filled = over;
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
    const bool ok = sub1_blocks(a, begin, end, [&](int64_t r0, int64_t r1, const uint8_t* sym, int64_t stride) {
      const auto row = [&](int64_t r) { return sym + (r - r0) * stride; };
      if (fused_fits(a) && a.bits == 2) {
        fused<2, true>(a, r0, r1, row);  // the ternary fast path over the packed symbols
      } else if (fused_fits(a)) {
        fused<8, true>(a, r0, r1, row);
      } else {
        run(a, r0, r1, [&](int64_t r, int64_t c0, int64_t c1, uint8_t* cbuf, float* dst) {
          const uint8_t* symbols = a.bits == 2 ? unpack_codes(row(r), 2, c0, c1 - c0, cbuf) : row(r) + c0;
          lookup(symbols, c1 - c0, a.lo_hi[2 * r], a.lo_hi[2 * r + 1], dst);
        });
      }
    });
    if (!ok) a.error->store(1);
  }
}

}  // namespace MOECONV_QUANT_NS
}  // namespace moeconv_cpu
