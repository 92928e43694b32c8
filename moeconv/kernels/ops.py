"""The torch.library ops moeconv::route / moe_ffn (+ _out variants): schemas, fake impls, dispatch.

Each device kernel picks, per call, the native build when it is loaded and supports the dtype
(float32/bfloat16), else the pure-PyTorch reference.  Inference only: no autograd formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moeconv.kernels import native, reference

_lib = torch.library.Library("moeconv", "DEF")
_lib.define('route(Tensor logits, int k, str scoring="none", bool renormalize=False) -> (Tensor, Tensor)')
_lib.define("route_out(Tensor logits, int k, str scoring, bool renormalize, *, Tensor(a!) ids, Tensor(b!) weights) -> ()")
_FFN_ARGS = (
    'Tensor x, Tensor ids, Tensor weights, Tensor? w_gate, Tensor w_up, Tensor w_down, str activation="silu", '
    "Tensor? b_gate=None, Tensor? b_up=None"
)
_lib.define(f"moe_ffn({_FFN_ARGS}) -> Tensor")
_lib.define(f"moe_ffn_out({_FFN_ARGS}, *, Tensor(a!) out) -> ()")

# Internal path selector of the native moe_ffn: 0 = auto, 1 = weight streaming, 2 = gather + GEMM.
PATH_AUTO, PATH_STREAM, PATH_GEMM = 0, 1, 2


def _native_ops(device: torch.device):
    return torch.ops.moeconv_C if device.type == "cpu" else torch.ops.moeconv_cuda


def _route_into(logits: Tensor, k: int, scoring: str, renormalize: bool, ids: Tensor, weights: Tensor) -> None:
    if native.has_native(logits.device, logits.dtype):
        _native_ops(logits.device).route_out(logits, k, scoring, renormalize, ids, weights)
        return
    ref_ids, ref_weights = reference.route(logits, k, scoring, renormalize)
    ids.copy_(ref_ids)
    weights.copy_(ref_weights)


def moe_ffn_into(
    out: Tensor,
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    w_gate: Tensor | None,
    w_up: Tensor,
    w_down: Tensor,
    activation: str,
    b_gate: Tensor | None,
    b_up: Tensor | None,
    path: int = PATH_AUTO,
) -> None:
    """Backend choice of moe_ffn_out; `path` forces a native path (tests and benchmarks)."""
    if native.has_native(x.device, x.dtype):
        _native_ops(x.device).moe_ffn_out(x, ids, weights, w_gate, w_up, w_down, activation, b_gate, b_up, path, out)
        return
    out.copy_(reference.moe_ffn(x, ids, weights, w_gate, w_up, w_down, activation, b_gate, b_up))


def _route(logits: Tensor, k: int, scoring: str = "none", renormalize: bool = False) -> tuple[Tensor, Tensor]:
    T = logits.shape[0]
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)  # [T, k]
    weights = torch.empty(T, k, dtype=logits.dtype, device=logits.device)  # [T, k]
    _route_into(logits, k, scoring, renormalize, ids, weights)
    return ids, weights


def _route_out(logits: Tensor, k: int, scoring: str, renormalize: bool, *, ids: Tensor, weights: Tensor) -> None:
    _route_into(logits, k, scoring, renormalize, ids, weights)


def _moe_ffn(x, ids, weights, w_gate, w_up, w_down, activation="silu", b_gate=None, b_up=None) -> Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)  # [T, d]
    moe_ffn_into(out, x, ids, weights, w_gate, w_up, w_down, activation, b_gate, b_up)
    return out


def _moe_ffn_out(x, ids, weights, w_gate, w_up, w_down, activation="silu", b_gate=None, b_up=None, *, out) -> None:
    moe_ffn_into(out, x, ids, weights, w_gate, w_up, w_down, activation, b_gate, b_up)


for _device in ("CPU", "CUDA"):
    _lib.impl("route", _route, _device)
    _lib.impl("route_out", _route_out, _device)
    _lib.impl("moe_ffn", _moe_ffn, _device)
    _lib.impl("moe_ffn_out", _moe_ffn_out, _device)


@torch.library.register_fake("moeconv::route")
def _route_fake(logits: Tensor, k: int, scoring: str = "none", renormalize: bool = False) -> tuple[Tensor, Tensor]:
    T = logits.shape[0]
    return logits.new_empty(T, k, dtype=torch.int64), logits.new_empty(T, k)


@torch.library.register_fake("moeconv::route_out")
def _route_out_fake(logits, k, scoring, renormalize, *, ids, weights) -> None:
    return None


@torch.library.register_fake("moeconv::moe_ffn")
def _moe_ffn_fake(x, ids, weights, w_gate, w_up, w_down, activation="silu", b_gate=None, b_up=None) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("moeconv::moe_ffn_out")
def _moe_ffn_out_fake(x, ids, weights, w_gate, w_up, w_down, activation="silu", b_gate=None, b_up=None, *, out) -> None:
    return None
