"""The one dtype table: names users choose, and the safetensors codes moeconv reads and writes."""

from __future__ import annotations

import torch

# What --dtype and recipes accept (besides "auto").
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# torch dtype <-> the safetensors header code
SAFETENSORS_CODES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",  # packed quantized codes
}
FROM_SAFETENSORS_CODE = {code: dtype for dtype, code in SAFETENSORS_CODES.items()}


def itemsize_of_code(code: str) -> int:
    """Bytes per element of a safetensors dtype code ("F32" -> 4)."""
    return FROM_SAFETENSORS_CODE[code].itemsize


def output_dtype(requested: str, config) -> str:
    """The dtype name an output is written in: the one asked for, else the source config's, else float32."""
    if requested != "auto":
        return requested
    source = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(source).replace("torch.", "") if source is not None else "float32"
    return name if name in DTYPES else "float32"
