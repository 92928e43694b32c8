"""Fused MoE ops (top-k routing, expert feed-forward) with native CPU/CUDA kernels and a PyTorch fallback.

    ids, weights = route(logits, k, scoring="none")          # logits [T, E] -> [T, k] int64, [T, k]
    y = moe_ffn(x, ids, weights, w_up, w_down, w_gate=w_gate, activation="silu")   # [..., d]

Both call the torch.library ops torch.ops.moeconv.{route,moe_ffn} (and *_out variants that write
into a preallocated tensor).  kernel_status() says which implementation each op uses here.
"""

from __future__ import annotations

from moeconv.kernels import block, native, quant_api, reference
from moeconv.kernels.api import KernelInputError, moe_ffn, route
from moeconv.kernels.block import fused_moe_block, fused_moe_ffn
from moeconv.kernels.reference import ACTIVATIONS, SCORINGS

__all__ = ["ACTIVATIONS", "SCORINGS", "KernelInputError", "fused_moe_block", "fused_moe_ffn", "kernel_status", "moe_ffn",
           "reference", "route"]


def kernel_status() -> dict[str, str]:
    """Which implementation each op takes on each device, e.g. {"moe_ffn": "cpu: native avx512bf16 [...] (prebuilt); ..."}.

    Loads (and if needed JIT-builds) the native kernels, so the answer is the truth for this process;
    the CPU text names the dispatched vector path and what it does per dtype (native.CPU_ISA_PATHS).
    """
    cpu, cuda = native.cpu_build(), native.cuda_build()
    isa = native.cpu_isa()
    # route is scalar C++ whatever the ISA; moe_ffn streams weights through the ISA's dot tiles
    # and switches to ATen GEMMs when one expert gets many tokens (moe_ops.cpp: kStreamMaxPairs*).
    ffn_cpu = f"native {isa} [{native.CPU_ISA_PATHS.get(isa, '?')}; ATen GEMM for many tokens per expert] ({cpu.how})"
    route_cpu = f"native ({cpu.how})"
    cuda_text = f"native ({cuda.how})" if cuda.loaded else f"reference ({cuda.how})"
    dtypes = "/".join(str(t).removeprefix("torch.") for t in native.NATIVE_DTYPES)
    tail = f"cuda: {cuda_text}; native dtypes {dtypes}, others use the reference"

    def line(cpu_text: str) -> str:
        return f"cpu: {cpu_text if cpu.loaded else f'reference ({cpu.how})'}; {tail}"

    # the quantized ops (csrc/cpu/quant_*): CPU only; QuantLinear falls back to dequantize + GEMM where they step aside
    quant_cpu = (f"native {isa} [registers-only decode for <= 4 tokens, L1-buffered dequantization otherwise; "
                 f"dequantize + GEMM past {quant_api.MAX_TOKENS} tokens] ({cpu.how})")
    quant = f"cpu: {quant_cpu if cpu.loaded else f'PyTorch dequantize + GEMM ({cpu.how})'}; cuda: PyTorch dequantize + GEMM"
    # moe_block: a whole MoE block at decode in one call (router, route, shared and routed experts); CPU only
    block_cpu = f"native {isa} [whole block for <= {block.BLOCK_MAX_TOKENS} tokens, the per-op path past that] ({cpu.how})"
    block_text = f"cpu: {block_cpu if cpu.loaded else f'per-op path ({cpu.how})'}; cuda: per-op path"
    return {"route": line(route_cpu), "moe_ffn": line(ffn_cpu), "moe_block": block_text, "quant_linear": quant,
            "quant_moe_ffn": quant}
