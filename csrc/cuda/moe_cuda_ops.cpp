// Torch bindings of the CUDA kernels, registered as moeconv_cuda::route_out / moe_ffn_out.
// Decode (few pairs per expert): align + expert GEMV kernels + combine, no host sync.
// Prefill: per-expert cuBLAS GEMMs on gathered rows (one host sync for the expert counts).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <utility>

#include "moe_cuda.h"

namespace moeconv_cuda {
namespace {

// Average pairs per expert above which gathered GEMMs beat the GEMV kernels (a guess: unmeasured).
constexpr int64_t kGemvMaxPairsPerExpert = 16;

// Positions of (token, slot) pairs are int32 in the kernels, and grid.x holds at most 2^31 - 1 blocks.
constexpr int64_t kMaxInt32 = 2147483647;
// grid.y is the expert index of the expert kernels.
constexpr int64_t kMaxExperts = 65535;

// Every check runs before any launch: a buffer of the wrong shape, dtype or device is an error,
// never an out-of-bounds access (the kernels trust the pointers and sizes they are given).
void check_device(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but must be on ", like.device());
}

int dtype_code(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "moeconv CUDA kernels: float32 or bfloat16 only, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16 ? kBFloat16 : kFloat32;
}

int activation_code(c10::string_view name) {
  if (name == "silu") return kSilu;
  if (name == "gelu_tanh") return kGeluTanh;
  if (name == "gelu") return kGelu;
  if (name == "relu") return kRelu;
  TORCH_CHECK(false, "moe_ffn: unknown activation '", std::string(name), "'");
}

void route_out(const at::Tensor& logits, int64_t k, c10::string_view scoring, bool renormalize, at::Tensor& ids,
               at::Tensor& weights) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_cuda(), "route: logits must be a CUDA [T, E] tensor, got ", logits.sizes(),
              " on ", logits.device());
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "route: k=", k, " must be between 1 and E=", E);
  TORCH_CHECK(E <= kMaxInt32 && (T + 3) / 4 <= kMaxInt32, "route: T=", T, ", E=", E, " exceed one launch");
  const int mode = scoring == "none" ? kNone : scoring == "softmax" ? kSoftmax : scoring == "sigmoid" ? kSigmoid : -1;
  TORCH_CHECK(mode >= 0, "route: unknown scoring '", std::string(scoring), "'");
  dtype_code(logits);
  check_device(ids, logits, "route", "ids");
  check_device(weights, logits, "route", "weights");
  TORCH_CHECK(ids.sizes() == at::IntArrayRef({T, k}) && ids.scalar_type() == at::kLong, "route: ids must be int64 [", T,
              ", ", k, "], got ", ids.scalar_type(), " ", ids.sizes());
  // The kernel stores weights in the logits' dtype: a narrower buffer would be overrun.
  TORCH_CHECK(weights.sizes() == at::IntArrayRef({T, k}) && weights.scalar_type() == logits.scalar_type(),
              "route: weights must be [", T, ", ", k, "] in the logits' dtype ", logits.scalar_type(), ", got ",
              weights.scalar_type(), " ", weights.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor lc = logits.contiguous();
  at::Tensor ic = ids.is_contiguous() ? ids : at::empty({T, k}, ids.options());
  at::Tensor wc = weights.is_contiguous() ? weights : at::empty({T, k}, weights.options());
  launch_route(lc.data_ptr(), T, static_cast<int>(E), static_cast<int>(k), mode, renormalize, dtype_code(lc),
               ic.data_ptr<int64_t>(), wc.data_ptr(), c10::cuda::getCurrentCUDAStream());
  if (!ic.is_same(ids)) ids.copy_(ic);
  if (!wc.is_same(weights)) weights.copy_(wc);
}

void activate_(at::Tensor& t, int activation) {
  switch (activation) {
    case kSilu: at::silu_(t); break;
    case kGeluTanh: at::gelu_(t, "tanh"); break;
    case kGelu: at::gelu_(t); break;
    default: at::relu_(t); break;
  }
}

void moe_ffn_out(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                 const c10::optional<at::Tensor>& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                 c10::string_view activation, const c10::optional<at::Tensor>& b_gate,
                 const c10::optional<at::Tensor>& b_up, int64_t path, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.is_cuda(), "moe_ffn: x must be a CUDA [T, d] tensor, got ", x.sizes(), " on ", x.device());
  TORCH_CHECK(w_up.dim() == 3 && w_down.dim() == 3, "moe_ffn: expected w_up [E, s, d], w_down [E, d, s]");
  TORCH_CHECK(ids.dim() == 2, "moe_ffn: ids must be int64 [T, k], got ", ids.sizes());
  const int64_t T = x.size(0), d = x.size(1), E = w_up.size(0), s = w_up.size(1), k = ids.size(1);
  const int dt = dtype_code(x);
  const int act = activation_code(activation);
  TORCH_CHECK(w_up.sizes() == at::IntArrayRef({E, s, d}) && w_down.sizes() == at::IntArrayRef({E, d, s}),
              "moe_ffn: w_up must be [E, s, d] and w_down [E, d, s] for x [T, ", d, "], got ", w_up.sizes(), " and ",
              w_down.sizes());
  TORCH_CHECK(!w_gate.has_value() || w_gate->sizes() == w_up.sizes(), "moe_ffn: w_gate must match w_up ", w_up.sizes());
  // The kernels read every weight as x's dtype: a wider one would be read short, a narrower one overrun.
  TORCH_CHECK(w_up.scalar_type() == x.scalar_type() && w_down.scalar_type() == x.scalar_type() &&
                  (!w_gate.has_value() || w_gate->scalar_type() == x.scalar_type()),
              "moe_ffn: x and expert weights must share a dtype (x is ", x.scalar_type(), ")");
  TORCH_CHECK(ids.size(0) == T && ids.scalar_type() == at::kLong, "moe_ffn: ids must be int64 [", T, ", k], got ",
              ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.is_floating_point(),
              "moe_ffn: weights must be floating point [T, k] like ids, got ", weights.scalar_type(), " ", weights.sizes());
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(), "moe_ffn: out must be [T, d] in x's dtype ",
              x.scalar_type(), ", got ", out.scalar_type(), " ", out.sizes());
  for (const auto& [name, b] : {std::pair<const char*, const c10::optional<at::Tensor>*>{"b_gate", &b_gate}, {"b_up", &b_up}}) {
    if (!b->has_value()) continue;
    TORCH_CHECK((*b)->sizes() == at::IntArrayRef({E, s}) && (*b)->is_floating_point(), "moe_ffn: ", name,
                " must be floating point [E, s] = [", E, ", ", s, "], got ", (*b)->scalar_type(), " ", (*b)->sizes());
    check_device(**b, x, "moe_ffn", name);
  }
  TORCH_CHECK(!b_gate.has_value() || w_gate.has_value(), "moe_ffn: b_gate given without w_gate");
  check_device(ids, x, "moe_ffn", "ids");
  check_device(weights, x, "moe_ffn", "weights");
  check_device(w_up, x, "moe_ffn", "w_up");
  check_device(w_down, x, "moe_ffn", "w_down");
  check_device(out, x, "moe_ffn", "out");
  if (w_gate.has_value()) check_device(*w_gate, x, "moe_ffn", "w_gate");
  // Pair positions and token indices are int32; the combine launch has T*d/256 blocks on grid.x.
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "moe_ffn: E=", E, " experts must be between 1 and ", kMaxExperts);
  TORCH_CHECK(T * k <= kMaxInt32, "moe_ffn: T*k = ", T * k, " (token, slot) pairs must be below 2^31; split the batch");
  TORCH_CHECK(T * d / 256 < kMaxInt32 && s / 4 < kMaxInt32 && d / 4 < kMaxInt32, "moe_ffn: T=", T, ", d=", d, ", s=", s,
              " exceed one launch; split the batch");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor xc = x.contiguous(), ic = ids.contiguous(), wc = weights.to(x.scalar_type()).contiguous();
  const at::Tensor wu = w_up.contiguous(), wd = w_down.contiguous();
  const at::Tensor wg = w_gate.has_value() ? w_gate->contiguous() : at::Tensor();
  const at::Tensor bg = b_gate.has_value() ? b_gate->to(x.scalar_type()).contiguous() : at::Tensor();
  const at::Tensor bu = b_up.has_value() ? b_up->to(x.scalar_type()).contiguous() : at::Tensor();
  at::Tensor o = out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  if (T == 0) return;
  const int64_t P = T * k;
  const auto i32 = x.options().dtype(at::kInt);
  at::Tensor counts = at::empty({E}, i32), offsets = at::empty({E + 1}, i32), cursor = at::empty({E}, i32);
  at::Tensor sorted_token = at::empty({P}, i32), pair_pos = at::empty({P}, i32);
  launch_align(ic.data_ptr<int64_t>(), P, static_cast<int>(k), static_cast<int>(E), counts.data_ptr<int32_t>(),
               offsets.data_ptr<int32_t>(), sorted_token.data_ptr<int32_t>(), pair_pos.data_ptr<int32_t>(),
               cursor.data_ptr<int32_t>(), stream);
  const bool gemv = path == 1 || (path == 0 && P <= kGemvMaxPairsPerExpert * E);
  at::Tensor y;
  if (gemv) {
    at::Tensor h = at::empty({P, s}, x.options().dtype(at::kFloat));  // [P, s]
    y = at::empty({P, d}, x.options().dtype(at::kFloat));              // [P, d]
    launch_expert_up(xc.data_ptr(), wg.defined() ? wg.data_ptr() : nullptr, wu.data_ptr(),
                     bg.defined() ? bg.data_ptr() : nullptr, bu.defined() ? bu.data_ptr() : nullptr,
                     counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), sorted_token.data_ptr<int32_t>(), d, s,
                     static_cast<int>(E), act, dt, h.data_ptr<float>(), stream);
    launch_expert_down(h.data_ptr<float>(), wd.data_ptr(), counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                       d, s, static_cast<int>(E), dt, y.data_ptr<float>(), stream);
  } else {
    const at::Tensor host_offsets = offsets.cpu();  // the one sync of the prefill path
    const int32_t* off = host_offsets.data_ptr<int32_t>();
    const at::Tensor valid = sorted_token.narrow(0, 0, off[E]).to(at::kLong);  // pairs with a valid expert id
    const at::Tensor xs = xc.index_select(0, valid);  // [P_valid, d] in expert order
    y = at::empty({P, d}, x.options());                                   // [P, d]
    for (int64_t e = 0; e < E; ++e) {
      const int64_t p0 = off[e], n = off[e + 1] - off[e];
      if (n == 0) continue;
      const at::Tensor xe = xs.narrow(0, p0, n);
      at::Tensor up = at::mm(xe, wu[e].t());  // [n, s]
      if (bu.defined()) up.add_(bu[e]);
      at::Tensor h;
      if (wg.defined()) {
        h = at::mm(xe, wg[e].t());
        if (bg.defined()) h.add_(bg[e]);
        activate_(h, act);
        h.mul_(up);
      } else {
        h = up;
        activate_(h, act);
      }
      at::Tensor ye = y.narrow(0, p0, n);
      at::mm_out(ye, h, wd[e].t());  // [n, d]
    }
  }
  launch_combine(y.data_ptr(), y.scalar_type() == at::kBFloat16 ? kBFloat16 : kFloat32, pair_pos.data_ptr<int32_t>(),
                 ic.data_ptr<int64_t>(), wc.data_ptr(), T, static_cast<int>(k), d, static_cast<int>(E), dt, o.data_ptr(),
                 stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!o.is_same(out)) out.copy_(o);
}

}  // namespace
}  // namespace moeconv_cuda

TORCH_LIBRARY(moeconv_cuda, m) {
  m.def("route_out(Tensor logits, int k, str scoring, bool renormalize, Tensor(a!) ids, Tensor(b!) weights) -> ()");
  m.def(
      "moe_ffn_out(Tensor x, Tensor ids, Tensor weights, Tensor? w_gate, Tensor w_up, Tensor w_down, str activation, "
      "Tensor? b_gate, Tensor? b_up, int path, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(moeconv_cuda, CUDA, m) {
  m.impl("route_out", &moeconv_cuda::route_out);
  m.impl("moe_ffn_out", &moeconv_cuda::moe_ffn_out);
}

#ifndef MOECONV_SOURCE_HASH
#define MOECONV_SOURCE_HASH unknown
#endif
#define MOECONV_STR2(x) #x
#define MOECONV_STR(x) MOECONV_STR2(x)
extern "C" __attribute__((used)) const char moeconv_cuda_source_hash[] =
    "MOECONV_SOURCE_HASH=" MOECONV_STR(MOECONV_SOURCE_HASH);

#ifdef TORCH_EXTENSION_NAME
#define MOECONV_CAT(a, b) a##b
#define MOECONV_PYINIT(name) MOECONV_CAT(PyInit_, name)
PyMODINIT_FUNC MOECONV_PYINIT(TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, MOECONV_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif
