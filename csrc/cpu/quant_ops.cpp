// Torch bindings of the quantized linear kernels, registered as moeconv_C::quant_linear_out,
// ternary_linear_out and sub1_linear_out (the public moeconv:: ops in moeconv/kernels/quant_ops.py
// call these). The vector path follows the MoE kernels' (set_cpu_isa / MOECONV_CPU_ISA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "quant_cpu.h"

namespace moeconv_cpu {
namespace {

constexpr int64_t kRowsPerTask = 32;  // output rows per parallel work item (intN, ternary)

bool has_bmi2() {  // the AVX-512 sub1 decoder uses PDEP
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("bmi2");
#else
  return false;
#endif
}

const QuantTable* quant_table() {
  const std::string isa = active_isa_name();
  const QuantTable* t = nullptr;
  if (isa == "avx512" || isa == "avx512bf16") t = has_bmi2() ? quant_table_avx512() : quant_table_avx2();
  else if (isa == "avx2") t = quant_table_avx2();
  return t ? t : quant_table_generic();
}

// x [T, in] float32/bfloat16 and out [T, rows] in x's dtype; fills the shared fields of `a`.
at::Tensor prepare(const char* op, const at::Tensor& x, int64_t rows, const c10::optional<at::Tensor>& bias,
                   const at::Tensor& out, QuantArgs& a, at::Tensor& bias_f) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [T, in], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, " (CPU): float32 or bfloat16 x only");
  TORCH_CHECK(out.sizes() == at::IntArrayRef({x.size(0), rows}) && out.scalar_type() == x.scalar_type(), op,
              ": out must be [T, out_features] in x's dtype");
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // [T, in]
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == rows, op, ": bias must be [out_features]");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  a.T = x.size(0), a.in = x.size(1), a.out = rows;
  a.x = xf.data_ptr<float>();
  a.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  return xf;
}

// Runs the kernel over output rows in tasks of `unit` rows and writes out (converting when needed).
void launch(QuantArgs& a, int64_t unit, at::Tensor& out) {
  at::Tensor y = out.scalar_type() == at::kFloat && out.is_contiguous() ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
  if (a.T == 0 || a.out == 0) return;
  std::atomic<int> error{0};
  a.y = y.data_ptr<float>(), a.error = &error;
  const QuantTable* table = quant_table();
  const at::Tensor xp = at::empty({a.T, a.in}, y.options());  // [T, in]
  table->prepare_x(a, xp.data_ptr<float>());
  a.xp = xp.data_ptr<float>();
  const int64_t tasks = (a.out + unit - 1) / unit;
  at::parallel_for(0, tasks, 1, [&](int64_t b0, int64_t b1) { table->rows(a, b0 * unit, std::min(b1 * unit, a.out)); });
  TORCH_CHECK(error.load() == 0, "sub1_linear: the code stream does not decode to its blocks (corrupt codes, offsets or dictionary)");
  if (!y.is_same(out)) out.copy_(y);
}

int64_t packed_bytes(int64_t n, int64_t bits) {
  const int64_t values = bits == 3 ? 8 : 8 / bits, nbytes = bits == 3 ? 3 : 1;
  return (n + values - 1) / values * nbytes;
}

void quant_linear_out(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                      int64_t group_size, at::Tensor& out) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 3 || bits == 2, "quant_linear: bits must be 8, 4, 3 or 2, got ", bits);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte, "quant_linear: qweight must be uint8 [out, bytes]");
  QuantArgs a;
  at::Tensor bias_f;
  const at::Tensor xf = prepare("quant_linear", x, qweight.size(0), bias, out, a, bias_f);
  const int64_t in = a.in, rows = a.out;
  TORCH_CHECK(qweight.size(1) == packed_bytes(in, bits), "quant_linear: qweight has ", qweight.size(1),
              " bytes per row, ", in, " values at ", bits, " bits take ", packed_bytes(in, bits));
  TORCH_CHECK(group_size == -1 || (group_size > 0 && in % group_size == 0), "quant_linear: group_size ", group_size,
              " must be -1 or divide in_features ", in);
  const int64_t n_groups = group_size == -1 ? 1 : in / group_size;
  TORCH_CHECK(scales.sizes() == at::IntArrayRef({rows, n_groups}) && scales.scalar_type() == at::kHalf,
              "quant_linear: scales must be float16 [out, n_groups] = [", rows, ", ", n_groups, "]");
  const at::Tensor qw = qweight.contiguous(), sc = scales.contiguous();
  at::Tensor zc;
  a.kind = kQuantInt, a.bits = static_cast<int>(bits), a.group = group_size == -1 ? std::max<int64_t>(in, 1) : group_size;
  a.n_groups = n_groups, a.qweight = qw.data_ptr<uint8_t>(), a.row_bytes = qw.size(1);
  a.scales = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  a.zero_mode = kZeroSymmetric;
  if (zeros.has_value()) {
    zc = zeros->contiguous();
    if (zc.scalar_type() == at::kHalf) {
      TORCH_CHECK(zc.sizes() == sc.sizes(), "quant_linear: float zeros must be float16 [out, n_groups] like scales");
      a.zero_mode = kZeroHalf, a.zeros = reinterpret_cast<const uint16_t*>(zc.data_ptr<at::Half>());
    } else {
      TORCH_CHECK(zc.scalar_type() == at::kByte && zc.sizes() == at::IntArrayRef({rows, packed_bytes(n_groups, bits)}),
                  "quant_linear: packed zeros must be uint8 [out, packed_bytes(n_groups, bits)]");
      a.zero_mode = kZeroPacked, a.qzeros = zc.data_ptr<uint8_t>(), a.zero_row_bytes = zc.size(1);
    }
  }
  launch(a, kRowsPerTask, out);
}

at::Tensor lo_hi_float(const char* op, const at::Tensor& lo_hi, int64_t rows) {
  TORCH_CHECK(lo_hi.sizes() == at::IntArrayRef({rows, 2}), op, ": lo_hi must be [out, 2]");
  return lo_hi.to(at::kFloat).contiguous();
}

void ternary_linear_out(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& lo_hi,
                        const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte, "ternary_linear: qweight must be uint8 [out, bytes]");
  QuantArgs a;
  at::Tensor bias_f;
  const at::Tensor xf = prepare("ternary_linear", x, qweight.size(0), bias, out, a, bias_f);
  TORCH_CHECK(qweight.size(1) == packed_bytes(a.in, 2), "ternary_linear: qweight must be [out, ceil(in / 4)]");
  const at::Tensor qw = qweight.contiguous(), lh = lo_hi_float("ternary_linear", lo_hi, a.out);
  a.bits = 2, a.group = std::max<int64_t>(a.in, 1), a.n_groups = 1;  // one "group" per row: lo/hi
  a.kind = kQuantTernary, a.qweight = qw.data_ptr<uint8_t>(), a.row_bytes = qw.size(1), a.lo_hi = lh.data_ptr<float>();
  launch(a, kRowsPerTask, out);
}

void sub1_linear_out(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& block_offsets,
                     const at::Tensor& dictionary, const at::Tensor& lo_hi, const c10::optional<at::Tensor>& bias,
                     int64_t block_rows, at::Tensor& out) {
  TORCH_CHECK(block_rows >= 1, "sub1_linear: block_rows must be >= 1, got ", block_rows);
  TORCH_CHECK(codes.dim() == 1 && codes.scalar_type() == at::kUInt16, "sub1_linear: codes must be uint16 [num_codes]");
  TORCH_CHECK(dictionary.dim() == 1 && dictionary.scalar_type() == at::kLong, "sub1_linear: dictionary must be int64 [N]");
  TORCH_CHECK(block_offsets.dim() == 1 && block_offsets.scalar_type() == at::kInt, "sub1_linear: block_offsets must be int32");
  QuantArgs a;
  at::Tensor bias_f;
  const at::Tensor xf = prepare("sub1_linear", x, lo_hi.size(0), bias, out, a, bias_f);
  TORCH_CHECK(block_offsets.size(0) == (a.out + block_rows - 1) / block_rows, "sub1_linear: block_offsets must be [ceil(out / block_rows)]");
  const at::Tensor cc = codes.contiguous(), bo = block_offsets.contiguous(), dc = dictionary.contiguous();
  const at::Tensor lh = lo_hi_float("sub1_linear", lo_hi, a.out);
  // Rows decode to 2-bit symbols when they fill whole bytes (2P % 4 == 0), else to bytes; lo/hi per row.
  a.bits = (a.in + a.in % 2) % 4 == 0 ? 2 : 8, a.group = std::max<int64_t>(a.in, 1), a.n_groups = 1;
  a.kind = kQuantSub1, a.codes = reinterpret_cast<const uint16_t*>(cc.data_ptr());
  a.block_offsets = bo.data_ptr<int32_t>(), a.dictionary = dc.data_ptr<int64_t>();
  a.num_codes = cc.size(0), a.dict_size = dc.size(0), a.block_rows = block_rows, a.lo_hi = lh.data_ptr<float>();
  launch(a, block_rows * std::max<int64_t>(1, kRowsPerTask / block_rows), out);
}

// One projection of expert e: its `per` tensors in `list` (int: qweight, scales, zeros or an empty tensor;
// ternary: qweight, lo_hi; sub1: codes, block_offsets, dictionary, lo_hi) applied to xe [n, in] -> [n, rows] float32.
at::Tensor expert_linear(c10::string_view kind, const at::TensorList& list, int64_t e, const at::Tensor& xe, int64_t bits,
                         int64_t group, int64_t block_rows) {
  if (kind == "int") {
    const at::Tensor& zeros = list[3 * e + 2];
    at::Tensor y = at::empty({xe.size(0), list[3 * e].size(0)}, xe.options());
    quant_linear_out(xe, list[3 * e], list[3 * e + 1], zeros.numel() ? c10::optional<at::Tensor>(zeros) : c10::nullopt,
                     c10::nullopt, bits, group, y);
    return y;
  }
  if (kind == "ternary") {
    at::Tensor y = at::empty({xe.size(0), list[2 * e].size(0)}, xe.options());
    ternary_linear_out(xe, list[2 * e], list[2 * e + 1], c10::nullopt, y);
    return y;
  }
  at::Tensor y = at::empty({xe.size(0), list[4 * e + 3].size(0)}, xe.options());
  sub1_linear_out(xe, list[4 * e], list[4 * e + 1], list[4 * e + 2], list[4 * e + 3], c10::nullopt, block_rows, y);
  return y;
}

// out [T, d] = sum_j weights[t, j] expert_{ids[t, j]}(x[t]) with quantized experts, all pairs in one call: pairs are
// grouped by expert (in expert order, tokens in order) and each active expert's gathered tokens go through its
// projections (gate and up read the same gathered x) by the quantized linear kernels; float32 throughout.
void quant_moe_ffn_out(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, at::TensorList gate,
                       at::TensorList up, at::TensorList down, c10::string_view kind, int64_t bits, int64_t group_size,
                       int64_t block_rows, c10::string_view activation, at::Tensor& out) {
  TORCH_CHECK(kind == "int" || kind == "ternary" || kind == "sub1", "quant_moe_ffn: kind must be int, ternary or sub1");
  const int64_t per = kind == "int" ? 3 : (kind == "ternary" ? 2 : 4);
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong &&
                  weights.sizes() == ids.sizes(), "quant_moe_ffn: expected x [T, d], ids int64 [T, k], weights [T, k]");
  TORCH_CHECK(!up.empty() && up.size() % per == 0 && down.size() == up.size() && (gate.empty() || gate.size() == up.size()),
              "quant_moe_ffn: up, down (and gate) must hold ", per, " tensors per expert, the same number of experts");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(), "quant_moe_ffn: out must be like x");
  const int64_t E = static_cast<int64_t>(up.size()) / per;
  const at::Tensor xf = x.to(at::kFloat).contiguous();                                  // [T, d]
  const at::Tensor flat = ids.reshape(-1), wf = weights.to(at::kFloat).reshape(-1);     // [T k]
  TORCH_CHECK(flat.numel() == 0 || (flat.min().item<int64_t>() >= 0 && flat.max().item<int64_t>() < E),
              "quant_moe_ffn: expert ids must be in [0, ", E, ")");
  const at::Tensor order = std::get<1>(flat.sort(c10::optional<bool>(true), 0));                    // pairs by expert, then (t, j)
  const at::Tensor counts = at::bincount(flat, {}, E).cpu();                             // [E]
  at::Tensor acc = at::zeros({x.size(0), x.size(1)}, xf.options());                     // [T, d]
  const int64_t k = ids.size(1);
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = counts[e].item<int64_t>();
    if (n == 0) continue;
    const at::Tensor pairs = order.narrow(0, start, n);                                  // [n] flat pair indices
    start += n;
    const at::Tensor tokens = at::floor_divide(pairs, k);                                 // [n]
    const at::Tensor xe = xf.index_select(0, tokens);                                     // [n, d]
    at::Tensor h = expert_linear(kind, up, e, xe, bits, group_size, block_rows);          // [n, s]
    at::Tensor g = gate.empty() ? h : expert_linear(kind, gate, e, xe, bits, group_size, block_rows);
    if (activation == "silu") g = at::silu(g);
    else if (activation == "gelu_tanh") g = at::gelu(g, "tanh");
    else if (activation == "gelu") g = at::gelu(g);
    else if (activation == "relu") g = at::relu(g);
    else TORCH_CHECK(false, "quant_moe_ffn: unknown activation '", std::string(activation), "'");
    h = gate.empty() ? g : g * h;
    const at::Tensor y = expert_linear(kind, down, e, h, bits, group_size, block_rows);  // [n, d]
    acc.index_add_(0, tokens, y * wf.index_select(0, pairs).unsqueeze(1));
  }
  out.copy_(acc);
}

}  // namespace
}  // namespace moeconv_cpu

TORCH_LIBRARY_FRAGMENT(moeconv_C, m) {
  m.def("quant_linear_out(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits, int group_size, "
        "Tensor(a!) out) -> ()");
  m.def("ternary_linear_out(Tensor x, Tensor qweight, Tensor lo_hi, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("sub1_linear_out(Tensor x, Tensor codes, Tensor block_offsets, Tensor dictionary, Tensor lo_hi, Tensor? bias, "
        "int block_rows, Tensor(a!) out) -> ()");
  m.def("quant_moe_ffn_out(Tensor x, Tensor ids, Tensor weights, Tensor[] gate, Tensor[] up, Tensor[] down, str kind, "
        "int bits, int group_size, int block_rows, str activation, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(moeconv_C, CPU, m) {
  m.impl("quant_linear_out", &moeconv_cpu::quant_linear_out);
  m.impl("ternary_linear_out", &moeconv_cpu::ternary_linear_out);
  m.impl("sub1_linear_out", &moeconv_cpu::sub1_linear_out);
  m.impl("quant_moe_ffn_out", &moeconv_cpu::quant_moe_ffn_out);
}
