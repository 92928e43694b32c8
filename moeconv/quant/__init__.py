"""Quantization: grids (intN, ternary), GPTQ, packing into stored formats, and QMoE's sub1 dictionary code."""

from moeconv.config import FORMATS, QuantSpec
from moeconv.quant.gptq import (
    GPTQResult,
    HessianAccumulator,
    gptq_quantize,
    gptq_quantize_batched,
    relative_output_error,
)
from moeconv.quant.grids import QuantizedTensor, dequantize, quantize_rtn
from moeconv.quant.packing import PackedWeight, pack, unpack
from moeconv.quant.sub1 import Sub1Dictionary, build_dictionary, pair_counts

__all__ = [
    "FORMATS",
    "GPTQResult",
    "HessianAccumulator",
    "PackedWeight",
    "QuantSpec",
    "QuantizedTensor",
    "Sub1Dictionary",
    "build_dictionary",
    "dequantize",
    "gptq_quantize",
    "gptq_quantize_batched",
    "pack",
    "pair_counts",
    "quantize_rtn",
    "relative_output_error",
    "unpack",
]
