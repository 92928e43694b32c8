// Torch bindings of the CPU kernels: top-k routing and the MoE feed-forward, registered as
// moeconv_C::route_out / moeconv_C::moe_ffn_out (the public moeconv:: ops call these); moe_block.cpp adds
// moeconv_C::moe_block, a whole MoE block at decode, on the pieces declared in moe_ops.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "moe_ops.h"

namespace moeconv_cpu {
namespace {

// Below this many (token, slot) pairs per active expert the weight-streaming kernel wins
// over gather + GEMM: measured crossover on AMD EPYC (Zen 5, AVX-512), SmolLM2 shapes, fp32:
// 26 pairs 0.68 vs 0.99 ms, 37 pairs 1.49 vs 1.29 ms.
constexpr int64_t kStreamMaxPairsPerExpert = 32;
// The same crossover for bf16 on a bf16_operands kernel (AVX512-BF16 dot products), one thread,
// SmolLM2 gated shapes, stream vs oneDNN bf16 GEMM: 137 pairs 1.78 vs 2.10 ms, 272 pairs 3.65 vs
// 3.77 ms, 537 pairs 7.61 vs 7.29 ms.
constexpr int64_t kStreamMaxPairsPerExpertBf16Dot = 256;
constexpr int64_t kBlock = 16;  // rows / columns per parallel work item

bool cpu_has(const char* feature) {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (std::string(feature) == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (std::string(feature) == "avx512bf16") return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16");
  if (std::string(feature) == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::string(feature) == "generic";
}

const KernelTable* table_for(const std::string& isa) {
  if (isa == "avx512bf16" && cpu_has("avx512bf16")) return table_avx512bf16();
  if (isa == "avx512" && cpu_has("avx512")) return table_avx512();
  if (isa == "avx2" && cpu_has("avx2")) return table_avx2();
  if (isa == "generic") return table_generic();
  return nullptr;
}

const KernelTable*& active_table() {
  static const KernelTable* table = [] {
    for (const char* isa : {"avx512bf16", "avx512", "avx2"})
      if (const KernelTable* t = table_for(isa)) return t;
    return table_generic();
  }();
  return table;
}

void activate_(at::Tensor& t, int activation) {
  switch (activation) {
    case kSilu: at::silu_(t); break;
    case kGeluTanh: at::gelu_(t, "tanh"); break;
    case kGelu: at::gelu_(t); break;
    default: at::relu_(t); break;
  }
}

// Stable top-k: larger logit first, NaN above every number, ties to the lower index.
inline bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

void route_out(const at::Tensor& logits, int64_t k, c10::string_view scoring, bool renormalize, at::Tensor& ids,
               at::Tensor& weights) {
  TORCH_CHECK(logits.dim() == 2, "route: logits must be [T, E], got ", logits.sizes());
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "route: k=", k, " must be between 1 and E=", E);
  TORCH_CHECK(scoring == "none" || scoring == "softmax" || scoring == "sigmoid", "route: unknown scoring '",
              std::string(scoring), "'");
  TORCH_CHECK(ids.sizes() == at::IntArrayRef({T, k}) && ids.scalar_type() == at::kLong, "route: ids must be int64 [T, k]");
  TORCH_CHECK(weights.sizes() == at::IntArrayRef({T, k}) && weights.scalar_type() == logits.scalar_type(),
              "route: weights must be [T, k] in the logits' dtype");
  const at::Tensor lf = logits.to(at::kFloat).contiguous();  // [T, E]
  at::Tensor ids_c = ids.is_contiguous() ? ids : at::empty({T, k}, ids.options());
  at::Tensor wf = at::empty({T, k}, logits.options().dtype(at::kFloat));  // [T, k]
  const float* lp = lf.data_ptr<float>();
  int64_t* ip = ids_c.data_ptr<int64_t>();
  float* wp = wf.data_ptr<float>();
  const int mode = scoring == "none" ? 0 : (scoring == "softmax" ? 1 : 2);
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> order(E);
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = lp + t * E;
      for (int64_t e = 0; e < E; ++e) order[e] = e;
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [row](int64_t a, int64_t b) { return ranks_before(row[a], a, row[b], b); });
      float norm = 1.0f, lse_max = 0.0f;
      if (mode == 1) {  // softmax over all E, evaluated at the chosen experts
        lse_max = -INFINITY;
        for (int64_t e = 0; e < E; ++e) lse_max = std::max(lse_max, row[e]);
        float sum = 0.0f;
        for (int64_t e = 0; e < E; ++e) sum += std::exp(row[e] - lse_max);
        norm = sum;
      }
      float total = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        const float l = row[order[j]];
        const float w = mode == 0 ? 1.0f : (mode == 1 ? std::exp(l - lse_max) / norm : 1.0f / (1.0f + std::exp(-l)));
        ip[t * k + j] = order[j];
        wp[t * k + j] = w;
        total += w;
      }
      if (renormalize)
        for (int64_t j = 0; j < k; ++j) wp[t * k + j] /= total;
    }
  });
  if (!ids_c.is_same(ids)) ids.copy_(ids_c);
  weights.copy_(wf);
}

}  // namespace

const KernelTable* active_kernels() { return active_table(); }

int activation_code(c10::string_view name) {
  if (name == "silu") return kSilu;
  if (name == "gelu_tanh") return kGeluTanh;
  if (name == "gelu") return kGelu;
  if (name == "relu") return kRelu;
  TORCH_CHECK(false, "moe_ffn: unknown activation '", std::string(name), "'; expected silu, gelu_tanh, gelu or relu");
}

Pairs sort_pairs(const int64_t* ip, const float* wp, int64_t T, int64_t k, int64_t E) {
  const int64_t P = T * k;
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(ip[p] >= 0 && ip[p] < E, "moe_ffn: expert id ", ip[p], " out of range [0, ", E, ")");
    ++count[ip[p] + 1];
  }
  Pairs pairs;
  pairs.start.push_back(0);
  for (int64_t e = 0; e < E; ++e) {
    if (count[e + 1] > 0) {
      pairs.active.push_back(e);
      pairs.start.push_back(pairs.start.back() + count[e + 1]);
      pairs.max_per_expert = std::max(pairs.max_per_expert, count[e + 1]);
    }
    count[e + 1] += count[e];  // now count[e] = first sorted position of expert e
  }
  pairs.token.resize(P);
  pairs.src.resize(P);
  pairs.weight.resize(P);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t pos = count[ip[p]]++;
    pairs.token[pos] = p / k;
    pairs.src[pos] = p;
    pairs.weight[pos] = wp[p];
  }
  return pairs;
}

void check_experts(const at::Tensor& x, const c10::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                   const at::Tensor& w_down) {
  TORCH_CHECK(x.dim() == 2 && w_up.dim() == 3 && w_down.dim() == 3, "moe_ffn: expected x [T, d], w_up [E, s, d], w_down [E, d, s]");
  const int64_t d = x.size(1), E = w_up.size(0), s = w_up.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "moe_ffn (CPU): float32 or bfloat16 only");
  TORCH_CHECK(w_up.sizes() == at::IntArrayRef({E, s, d}) && w_down.sizes() == at::IntArrayRef({E, d, s}),
              "moe_ffn: w_up must be [E, s, d] and w_down [E, d, s]");
  TORCH_CHECK(!w_gate.has_value() || w_gate->sizes() == w_up.sizes(), "moe_ffn: w_gate must match w_up");
  TORCH_CHECK(w_up.scalar_type() == x.scalar_type() && w_down.scalar_type() == x.scalar_type() &&
                  (!w_gate.has_value() || w_gate->scalar_type() == x.scalar_type()),
              "moe_ffn: x and expert weights must share a dtype");
}

at::Tensor float_bias(const c10::optional<at::Tensor>& b, int64_t E, int64_t s, const char* name) {
  if (!b.has_value()) return at::Tensor();
  TORCH_CHECK(b->sizes() == at::IntArrayRef({E, s}), "moe_ffn: ", name, " must be [E, s]");
  return b->to(at::kFloat).contiguous();
}

StreamProblem::StreamProblem(const KernelTable* table, const at::Tensor& x, const Pairs& pairs, const at::Tensor& wg,
                             const at::Tensor& wu, const at::Tensor& wd, const at::Tensor& bg, const at::Tensor& bu,
                             int activation)
    : operands{wg, wu, wd, bg, bu} {
  const int64_t P = static_cast<int64_t>(pairs.token.size()), s = wu.size(1);
  // bf16-operand kernels dot bf16 x and a bf16 copy of h; the others read float32 x.
  const bool bf16_operands = x.scalar_type() == at::kBFloat16 && table->bf16_operands;
  xf = bf16_operands ? at::Tensor() : x.to(at::kFloat).contiguous();  // [T, d]
  h = at::empty({P, s}, x.options().dtype(at::kFloat));
  hb = bf16_operands ? at::empty({P, s}, x.options()) : at::Tensor();
  a.T = x.size(0), a.d = x.size(1), a.s = s, a.n_active = static_cast<int64_t>(pairs.active.size());
  a.dtype = x.scalar_type() == at::kBFloat16 ? kBFloat16 : kFloat32;
  a.activation = activation;
  a.active = pairs.active.data(), a.pair_start = pairs.start.data();
  a.pair_token = pairs.token.data(), a.pair_weight = pairs.weight.data();
  a.x = bf16_operands ? nullptr : xf.data_ptr<float>();
  a.x_bf16 = bf16_operands ? x.data_ptr() : nullptr;
  a.h_bf16 = bf16_operands ? hb.data_ptr() : nullptr;
  a.w_gate = wg.defined() ? wg.data_ptr() : nullptr;
  a.w_up = wu.data_ptr(), a.w_down = wd.defined() ? wd.data_ptr() : nullptr;
  a.b_gate = bg.defined() ? bg.data_ptr<float>() : nullptr;
  a.b_up = bu.defined() ? bu.data_ptr<float>() : nullptr;
  a.h = h.data_ptr<float>();
}

// Two phases split by output rows: intermediate rows of every active expert, then model dims.
void StreamProblem::up(const KernelTable* table) const {
  const int64_t rows = a.n_active * a.s;
  at::parallel_for(0, (rows + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    table->up_rows(a, b0 * kBlock, std::min(b1 * kBlock, rows));
  });
}

void StreamProblem::down(const KernelTable* table) const {
  at::parallel_for(0, (a.d + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    table->down_cols(a, b0 * kBlock, std::min(b1 * kBlock, a.d));
  });
}

namespace {

void stream_path(const KernelTable* table, const at::Tensor& x, const Pairs& pairs, const at::Tensor& wg,
                 const at::Tensor& wu, const at::Tensor& wd, const at::Tensor& bg, const at::Tensor& bu, int activation,
                 at::Tensor& out) {
  StreamProblem problem(table, x, pairs, wg, wu, wd, bg, bu, activation);
  at::Tensor acc = out.scalar_type() == at::kFloat ? out : at::empty(out.sizes(), x.options().dtype(at::kFloat));
  problem.a.acc = acc.data_ptr<float>(), problem.a.out = out.data_ptr();
  problem.up(table);
  problem.down(table);
}

void gemm_path(const at::Tensor& x, const Pairs& pairs, const at::Tensor& wg, const at::Tensor& wu,
               const at::Tensor& wd, const at::Tensor& bg, const at::Tensor& bu, int activation, int64_t k,
               at::Tensor& out) {
  const int64_t T = x.size(0), d = x.size(1);
  const int64_t P = static_cast<int64_t>(pairs.token.size());
  const at::Tensor token = at::from_blob(const_cast<int64_t*>(pairs.token.data()), {P}, at::kLong);
  const at::Tensor xs = x.index_select(0, token);  // [P, d] rows of x in expert order
  at::Tensor ys = at::empty({P, d}, x.options());  // [P, d] each pair's unweighted expert output
  for (size_t a = 0; a < pairs.active.size(); ++a) {
    const int64_t e = pairs.active[a], p0 = pairs.start[a], n = pairs.start[a + 1] - p0;
    const at::Tensor xe = xs.narrow(0, p0, n);  // [n, d]
    at::Tensor up = at::mm(xe, wu[e].t());      // [n, s]
    if (bu.defined()) up.add_(bu[e].to(up.scalar_type()));
    at::Tensor h;
    if (wg.defined()) {
      h = at::mm(xe, wg[e].t());  // [n, s]
      if (bg.defined()) h.add_(bg[e].to(h.scalar_type()));
      activate_(h, activation);
      h.mul_(up);
    } else {
      h = up;
      activate_(h, activation);
    }
    at::Tensor ye = ys.narrow(0, p0, n);
    at::mm_out(ye, h, wd[e].t());  // [n, d]
  }
  // Weighted sum of each token's k rows, in float32, in slot order (deterministic).
  std::vector<int64_t> pos(P);
  for (int64_t p = 0; p < P; ++p) pos[pairs.src[p]] = p;
  std::vector<float> w(P);
  for (int64_t p = 0; p < P; ++p) w[pairs.src[p]] = pairs.weight[p];
  at::Tensor acc = out.scalar_type() == at::kFloat ? out : at::empty({T, d}, x.options().dtype(at::kFloat));
  float* accp = acc.data_ptr<float>();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* ysp = ys.data_ptr();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = accp + t * d;
      for (int64_t i = 0; i < d; ++i) o[i] = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = pos[t * k + j];
        const float wt = w[t * k + j];
        if (bf16) {
          const at::BFloat16* y = static_cast<const at::BFloat16*>(ysp) + row * d;
          for (int64_t i = 0; i < d; ++i) o[i] += wt * static_cast<float>(y[i]);
        } else {
          const float* y = static_cast<const float*>(ysp) + row * d;
          for (int64_t i = 0; i < d; ++i) o[i] += wt * y[i];
        }
      }
    }
  });
  if (!acc.is_same(out)) out.copy_(acc);
}

void moe_ffn_out(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                 const c10::optional<at::Tensor>& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                 c10::string_view activation, const c10::optional<at::Tensor>& b_gate,
                 const c10::optional<at::Tensor>& b_up, int64_t path, at::Tensor& out) {
  check_experts(x, w_gate, w_up, w_down);
  const int64_t T = x.size(0), E = w_up.size(0), s = w_up.size(1);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == T && ids.scalar_type() == at::kLong, "moe_ffn: ids must be int64 [T, k]");
  TORCH_CHECK(weights.sizes() == ids.sizes(), "moe_ffn: weights must be [T, k] like ids");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(), "moe_ffn: out must be [T, d] in x's dtype");
  const int act = activation_code(activation);
  const at::Tensor ic = ids.contiguous(), wc = weights.to(at::kFloat).contiguous();
  const Pairs pairs = sort_pairs(ic.data_ptr<int64_t>(), wc.data_ptr<float>(), T, ids.size(1), E);
  at::Tensor o = out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  if (T == 0) return;
  const at::Tensor xc = x.contiguous(), wu = w_up.contiguous(), wd = w_down.contiguous();
  const at::Tensor wg = w_gate.has_value() ? w_gate->contiguous() : at::Tensor();
  const at::Tensor bg = float_bias(b_gate, E, s, "b_gate"), bu = float_bias(b_up, E, s, "b_up");
  const KernelTable* table = active_table();
  const int64_t stream_max = x.scalar_type() == at::kBFloat16 && table->bf16_operands ? kStreamMaxPairsPerExpertBf16Dot
                                                                                     : kStreamMaxPairsPerExpert;
  const bool stream = path == 1 || (path == 0 && pairs.max_per_expert <= stream_max);
  if (stream) {
    stream_path(table, xc, pairs, wg, wu, wd, bg, bu, act, o);
  } else {
    gemm_path(xc, pairs, wg, wu, wd, bg, bu, act, ids.size(1), o);
  }
  if (!o.is_same(out)) out.copy_(o);
}

std::string cpu_isa() { return active_table()->isa; }

std::string set_cpu_isa(c10::string_view isa) {
  const KernelTable* t = table_for(std::string(isa));
  TORCH_CHECK(t != nullptr, "set_cpu_isa: '", std::string(isa), "' is not available on this CPU/build");
  std::string previous = active_table()->isa;
  active_table() = t;
  return previous;
}

}  // namespace

const char* active_isa_name() { return active_table()->isa; }  // quant_cpu.h: the quantized kernels follow it
}  // namespace moeconv_cpu

TORCH_LIBRARY(moeconv_C, m) {
  m.def("route_out(Tensor logits, int k, str scoring, bool renormalize, Tensor(a!) ids, Tensor(b!) weights) -> ()");
  m.def(
      "moe_ffn_out(Tensor x, Tensor ids, Tensor weights, Tensor? w_gate, Tensor w_up, Tensor w_down, str activation, "
      "Tensor? b_gate, Tensor? b_up, int path, Tensor(a!) out) -> ()");
  m.def("cpu_isa() -> str", &moeconv_cpu::cpu_isa);
  m.def("set_cpu_isa(str isa) -> str", &moeconv_cpu::set_cpu_isa);
}

TORCH_LIBRARY_IMPL(moeconv_C, CPU, m) {
  m.impl("route_out", &moeconv_cpu::route_out);
  m.impl("moe_ffn_out", &moeconv_cpu::moe_ffn_out);
}

// The digest of the sources this library was built from, found by the loader in the file's
// bytes (moeconv/kernels/build.py: embedded_hash) to refuse a stale prebuilt library.
#ifndef MOECONV_SOURCE_HASH
#define MOECONV_SOURCE_HASH unknown
#endif
#define MOECONV_STR2(x) #x
#define MOECONV_STR(x) MOECONV_STR2(x)
#if defined(__GNUC__) || defined(__clang__)
#define MOECONV_USED __attribute__((used))
#else
#define MOECONV_USED
#endif
extern "C" MOECONV_USED const char moeconv_cpu_source_hash[] = "MOECONV_SOURCE_HASH=" MOECONV_STR(MOECONV_SOURCE_HASH);

// A module init so that setuptools can build this as the importable extension moeconv.kernels._C;
// importing it runs the registrations above.
#ifdef TORCH_EXTENSION_NAME
#define MOECONV_CAT(a, b) a##b
#define MOECONV_PYINIT(name) MOECONV_CAT(PyInit_, name)
PyMODINIT_FUNC MOECONV_PYINIT(TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, MOECONV_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif
