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
  a.bits = 8, a.group = std::max<int64_t>(a.in, 1), a.n_groups = 1;  // decoded symbols are bytes; lo/hi per row
  a.kind = kQuantSub1, a.codes = reinterpret_cast<const uint16_t*>(cc.data_ptr());
  a.block_offsets = bo.data_ptr<int32_t>(), a.dictionary = dc.data_ptr<int64_t>();
  a.num_codes = cc.size(0), a.dict_size = dc.size(0), a.block_rows = block_rows, a.lo_hi = lh.data_ptr<float>();
  launch(a, block_rows * std::max<int64_t>(1, kRowsPerTask / block_rows), out);
}

}  // namespace
}  // namespace moeconv_cpu

TORCH_LIBRARY_FRAGMENT(moeconv_C, m) {
  m.def("quant_linear_out(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits, int group_size, "
        "Tensor(a!) out) -> ()");
  m.def("ternary_linear_out(Tensor x, Tensor qweight, Tensor lo_hi, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("sub1_linear_out(Tensor x, Tensor codes, Tensor block_offsets, Tensor dictionary, Tensor lo_hi, Tensor? bias, "
        "int block_rows, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(moeconv_C, CPU, m) {
  m.impl("quant_linear_out", &moeconv_cpu::quant_linear_out);
  m.impl("ternary_linear_out", &moeconv_cpu::ternary_linear_out);
  m.impl("sub1_linear_out", &moeconv_cpu::sub1_linear_out);
}
