// moeconv_C::moe_block: a whole MoeconvMoeBlock (moeconv/modeling/hf/moe_block.py) for a few tokens in one call: the
// router product, route()'s scoring / top-k / renormalization, the shared expert, the routed experts and the output
// bias, summed in one fp32 accumulator.  At decode the Python around the expert op (router Linear, topk, dispatch,
// shared expert, bias) cost more than the op itself; block.py calls this instead for at most BLOCK_MAX_TOKENS tokens,
// where every product here is a weight-streaming problem of the dispatched ISA's kernels (moe_ops.h: StreamProblem).
#include <ATen/ATen.h>
#include <ATen/native/TopKImpl.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "moe_ops.h"

namespace moeconv_cpu {
namespace {

inline float in_dtype(float v, bool bf16) { return bf16 ? static_cast<float>(c10::BFloat16(v)) : v; }  // RNE, as torch

// route() of moe_block.py on fp32 logits [T, E], first rounded to x's dtype as router(x) returns them: the scores in
// that dtype (softmax as ATen's kernel: exp(l - max) * (1 / sum)), then the top k by torch.topk's own CPU loop.
// Not moeconv_C::route's stable sort: route() ranks with torch.topk, whose order among equal scores differs, and bf16
// scores tie often.  Weights: the top scores, divided by their sum when renormalizing, each step rounded to the dtype
// as route()'s tensor ops round; scoring "none" (mode 0) weighs 1 whatever `renormalize`, as route() does.
void route_block(float* logits, int64_t T, int64_t E, int64_t k, int mode, bool renormalize, bool bf16, int64_t* ids,
                 float* weights) {
  for (int64_t t = 0; t < T; ++t) {
    float* row = logits + t * E;
    for (int64_t e = 0; e < E; ++e) row[e] = in_dtype(row[e], bf16);
    if (mode == 0) continue;
    if (mode == 2) {
      for (int64_t e = 0; e < E; ++e) row[e] = in_dtype(1.0f / (1.0f + std::exp(-row[e])), bf16);
      continue;
    }
    float top = row[0], sum = 0.0f;
    for (int64_t e = 1; e < E; ++e) top = std::isnan(row[e]) || row[e] > top ? row[e] : top;  // NaN spreads, as in torch
    for (int64_t e = 0; e < E; ++e) sum += row[e] = std::exp(row[e] - top);
    const float inv = 1.0f / sum;
    for (int64_t e = 0; e < E; ++e) row[e] = in_dtype(row[e] * inv, bf16);
  }
  char* data[3] = {reinterpret_cast<char*>(weights), reinterpret_cast<char*>(ids), reinterpret_cast<char*>(logits)};
  const int64_t strides[3] = {k * static_cast<int64_t>(sizeof(float)), k * static_cast<int64_t>(sizeof(int64_t)),
                              E * static_cast<int64_t>(sizeof(float))};  // bytes from one row to the next
  at::native::topk_impl_loop<float, float>(1, 1, 1, k, E, /*largest=*/true, /*sorted=*/true, data, strides, T);
  for (int64_t t = 0; t < T; ++t) {
    float* w = weights + t * k;
    if (mode == 0) {
      for (int64_t j = 0; j < k; ++j) w[j] = 1.0f;
    } else if (renormalize) {
      float total = 0.0f;
      for (int64_t j = 0; j < k; ++j) total += w[j];
      total = in_dtype(total, bf16);
      for (int64_t j = 0; j < k; ++j) w[j] = in_dtype(w[j] / total, bf16);
    }
  }
}

at::Tensor as_one_expert(const c10::optional<at::Tensor>& t) {  // a shared expert's [rows, cols] as a stack of one
  return t.has_value() ? t->contiguous().unsqueeze(0) : at::Tensor();
}

at::Tensor moe_block(const at::Tensor& hidden, const at::Tensor& router, int64_t k, c10::string_view scoring,
                     bool renormalize, const c10::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                     const at::Tensor& w_down, c10::string_view activation, const c10::optional<at::Tensor>& b_gate,
                     const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& shared_gate,
                     const c10::optional<at::Tensor>& shared_up, const c10::optional<at::Tensor>& shared_down,
                     const c10::optional<at::Tensor>& shared_b_gate, const c10::optional<at::Tensor>& shared_b_up,
                     const c10::optional<at::Tensor>& down_bias) {
  TORCH_CHECK(hidden.dim() >= 1, "moe_block: x must be [..., d]");
  const at::Tensor x = hidden.reshape({-1, hidden.size(-1)});  // [T, d]: the caller's reshapes cost more in Python
  check_experts(x, w_gate, w_up, w_down);
  const int64_t T = x.size(0), d = x.size(1), E = w_up.size(0), s = w_up.size(1);
  TORCH_CHECK(router.sizes() == at::IntArrayRef({E, d}) && router.scalar_type() == x.scalar_type(),
              "moe_block: router must be [E, d] in x's dtype");
  TORCH_CHECK(k >= 1 && k <= E, "moe_block: k=", k, " must be between 1 and E=", E);
  TORCH_CHECK(scoring == "none" || scoring == "softmax" || scoring == "sigmoid", "moe_block: unknown scoring '",
              std::string(scoring), "'");
  const int mode = scoring == "none" ? 0 : (scoring == "softmax" ? 1 : 2);
  const at::Tensor sg = as_one_expert(shared_gate), su = as_one_expert(shared_up), sd = as_one_expert(shared_down);
  if (su.defined()) check_experts(x, sg.defined() ? c10::optional<at::Tensor>(sg) : c10::nullopt, su, sd);
  TORCH_CHECK(!sg.defined() || su.defined(), "moe_block: a shared gate needs shared_up and shared_down");
  TORCH_CHECK(!down_bias.has_value() || down_bias->sizes() == at::IntArrayRef({d}), "moe_block: down_bias must be [d]");
  const int act = activation_code(activation);
  const KernelTable* table = active_kernels();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor out = at::empty({T, d}, x.options());
  if (T == 0) return out.view(hidden.sizes());
  const at::Tensor xc = x.contiguous();

  // Every token once, weight 1: the pairs of the router product and of the shared expert.
  const std::vector<int64_t> expert0(T, 0);
  const std::vector<float> ones(T, 1.0f);
  const Pairs every_token = sort_pairs(expert0.data(), ones.data(), T, 1, 1);
  // The router product is an up pass of one non-gated "expert" whose E rows are the router's, with no activation.
  const StreamProblem routing(table, xc, every_token, at::Tensor(), router.contiguous().unsqueeze(0), at::Tensor(),
                              at::Tensor(), at::Tensor(), kIdentity);
  routing.up(table);
  // bf16_operands kernels leave router(x) (rounded to bf16) in hb, the others leave it in h (fp32).
  const at::Tensor logits = routing.hb.defined() ? routing.hb.to(at::kFloat) : routing.h;  // [T, E]
  std::vector<int64_t> ids(T * k);
  std::vector<float> weights(T * k);
  route_block(logits.data_ptr<float>(), T, E, k, mode, renormalize, bf16, ids.data(), weights.data());
  const Pairs routed = sort_pairs(ids.data(), weights.data(), T, k, E);

  const at::Tensor acc = bf16 ? at::empty({T, d}, x.options().dtype(at::kFloat)) : out;  // [T, d]
  const at::Tensor bias = down_bias.has_value() ? down_bias->to(at::kFloat).contiguous() : at::Tensor();  // [d]
  if (su.defined()) {  // its own problem (its s differs), summed into acc first
    const auto row = [](const c10::optional<at::Tensor>& b) {  // [s] -> [1, s]
      return b.has_value() ? c10::optional<at::Tensor>(b->unsqueeze(0)) : c10::nullopt;
    };
    const int64_t ss = su.size(1);
    StreamProblem shared(table, xc, every_token, sg, su, sd, float_bias(row(shared_b_gate), 1, ss, "shared_b_gate"),
                         float_bias(row(shared_b_up), 1, ss, "shared_b_up"), act);
    shared.a.acc = acc.data_ptr<float>(), shared.a.out = nullptr;
    shared.up(table);
    shared.down(table);
  }
  StreamProblem experts(table, xc, routed, w_gate.has_value() ? w_gate->contiguous() : at::Tensor(), w_up.contiguous(),
                        w_down.contiguous(), float_bias(b_gate, E, s, "b_gate"), float_bias(b_up, E, s, "b_up"), act);
  experts.a.acc = acc.data_ptr<float>(), experts.a.out = out.data_ptr();
  experts.a.accumulate = su.defined(), experts.a.out_bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  experts.up(table);
  experts.down(table);
  return out.view(hidden.sizes());
}

}  // namespace
}  // namespace moeconv_cpu

TORCH_LIBRARY_FRAGMENT(moeconv_C, m) {
  m.def(
      "moe_block(Tensor x, Tensor router, int k, str scoring, bool renormalize, Tensor? w_gate, Tensor w_up, "
      "Tensor w_down, str activation, Tensor? b_gate, Tensor? b_up, Tensor? shared_gate, Tensor? shared_up, "
      "Tensor? shared_down, Tensor? shared_b_gate, Tensor? shared_b_up, Tensor? down_bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeconv_C, CPU, m) { m.impl("moe_block", &moeconv_cpu::moe_block); }
