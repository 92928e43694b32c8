"""Lazy GGUF tensors: read one at a time from the file, dequantized by the gguf package, named and laid out as transformers does."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, PretrainedConfig

from moeconv.errors import CheckpointError, UnsupportedModelError

# float32 output dequantized per step: reading a tensor costs the tensor itself plus about this much (and a few
# times it in the gguf package's temporaries), never the file or the whole model
CHUNK_BYTES = 1 << 24

# transformers' model_type -> gguf's architecture name, where they differ (transformers' get_gguf_hf_weights_map)
_GGUF_ARCH = {"cohere": "command-r", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3",
              "gemma4_text": "gemma4", "umt5": "t5", "minimax_m2": "minimax-m2", "gpt_oss": "gpt-oss"}

# Every GGUF architecture transformers' loader rewrites tensors for (its TENSOR_PROCESSORS) is in one of these sets:
# MIRRORED ones are rewritten here exactly as there; REFUSED ones (merged experts, fused-qkv reshapes, state-space
# models) are not dense decoder LMs moeconv converts. The rest are read as stored, as transformers reads them.
MIRRORED = frozenset({"llama", "gemma2", "gemma3", "nemotron", "gpt2"})
REFUSED = frozenset({"qwen2moe", "qwen3moe", "gpt_oss", "bloom", "t5", "t5encoder", "mamba", "lfm2", "minimax-m2"})
_GPT2_TRANSPOSED = ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight")


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives in the file and how it is stored; nothing of its data."""

    name: str  # the GGUF name
    qtype: gguf.GGMLQuantizationType
    offset: int  # of its first byte, from the start of the file
    dims: tuple[int, ...]  # torch order, as dequantized
    item: np.dtype  # what the gguf package stores a row as: the value type (F32, F16, ...) or bytes (block types)
    row_items: int  # items of `item` per row (the last dimension)

    @property
    def rows(self) -> int:
        return math.prod(self.dims[:-1])

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_items * self.item.itemsize


@dataclass(frozen=True)
class GGUFTable:
    """A GGUF file's architecture, the metadata its tensor layout depends on, and its tensor table."""

    path: Path
    arch: str  # general.architecture
    heads: tuple[object, object]  # {arch}.attention.head_count and head_count_kv as stored (None where absent)
    tensors: tuple[StoredTensor, ...]


def read_table(path: Path) -> GGUFTable:
    """Parse the header, metadata and tensor table; the tensor data is not touched (and the file not kept mapped)."""
    reader = gguf.GGUFReader(str(path))
    if reader.byte_order != "I":
        raise CheckpointError(f"{path} is a byte-swapped (big-endian) GGUF; re-export it on a little-endian machine")
    arch = str(reader.fields["general.architecture"].contents())
    heads = tuple(_field(reader, f"{arch}.attention.{key}") for key in ("head_count", "head_count_kv"))
    tensors = tuple(
        StoredTensor(t.name, gguf.GGMLQuantizationType(t.tensor_type), int(t.data_offset),
                     tuple(int(d) for d in reversed(t.shape.tolist())), t.data.dtype, int(t.data.shape[-1]))
        for t in reader.tensors
    )
    del reader  # its memory map of the whole file goes with it: pages a later read touches are never ours to keep
    return GGUFTable(path, arch, heads, tensors)


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents() if key in reader.fields else None


@functools.cache
def dequantizable_types() -> tuple[str, ...]:
    """The tensor types the installed gguf package can dequantize (probed: one zero block each)."""
    return tuple(q.name for q in gguf.GGMLQuantizationType if _can_dequantize(q))


def _can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    block_items, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    probe = np.zeros((1, block_bytes), dtype=np.uint8)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        probe = probe.view(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
    try:
        dequantize(probe, qtype)
    except (NotImplementedError, ValueError, TypeError, AssertionError):
        return False
    return True


@dataclass(frozen=True)
class _Planned:
    stored: StoredTensor
    shape: tuple[int, ...]  # as returned
    op: tuple  # () | ("permute", heads) | ("minus_one",) | ("transpose",)


class LazyGGUF:
    """A GGUF's tensors under transformers' names for `config`'s model, each read, dequantized to float32 and laid out
    (llama q/k rows back from llama.cpp's rope order, gemma norms minus one, gpt2 projections transposed) on demand."""

    def __init__(self, table: GGUFTable, config: PretrainedConfig):
        self.path = table.path
        if table.arch in REFUSED:
            raise UnsupportedModelError(f"{table.path.name} is a '{table.arch}' GGUF: moeconv converts dense decoder LMs "
                                        "(llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, gpt2 GGUFs)")
        with torch.device("meta"):  # names only: no memory for the weights
            skeleton = AutoModelForCausalLM.from_config(config)
        expected = set(skeleton.state_dict())
        names = gguf_to_hf_names(skeleton)
        planned: dict[str, _Planned] = {}
        for stored in table.tensors:  # a later tensor under the same name wins, as in transformers' loader
            hf_name, op, shape = _layout(table, stored, names)
            if hf_name is not None and hf_name in expected:
                planned[hf_name] = _Planned(stored, shape, op)
        for p in planned.values():
            if p.stored.qtype.name not in dequantizable_types():
                raise CheckpointError(f"{table.path.name}: tensor '{p.stored.name}' is stored as {p.stored.qtype.name}, which "
                                      f"the gguf package cannot dequantize (it reads {', '.join(dequantizable_types())}); "
                                      "re-quantize the model to one of those")
        self._planned = planned

    def keys(self) -> list[str]:
        return list(self._planned)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._planned[name].shape

    def read(self, name: str) -> torch.Tensor:
        """The tensor as transformers' GGUF loader would give it (float32), read and dequantized alone."""
        p = self._planned[name]
        w = read_dequantized(self.path, p.stored)
        if p.op and p.op[0] == "permute":
            return unpermute_rope(w, p.op[1])
        if p.op == ("minus_one",):
            return w.sub_(1)
        if p.op == ("transpose",):
            return w.permute(*reversed(range(w.dim()))).contiguous()
        return w


def gguf_to_hf_names(model: torch.nn.Module) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name for `model` (as transformers' get_gguf_hf_weights_map: gguf's
    TensorNameMap asked for every state-dict name of the model, then of each submodule under its qualified name)."""
    model_type = model.config.model_type
    arch = _GGUF_ARCH.get(model_type, model_type)
    ids = [key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch]
    if not ids:
        raise CheckpointError(f"the installed gguf package knows no tensor names for '{arch}'; "
                              "upgrade gguf or convert the model's Hugging Face folder instead")
    table = gguf.get_tensor_name_map(ids[0], model.config.num_hidden_layers)
    return _names_under(model, table, "")


def _names_under(module: torch.nn.Module, table, qual: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for hf_name in module.state_dict():
        base, suffix = hf_name, ""
        if hf_name.endswith((".weight", ".bias")):
            base, suffix = hf_name.rsplit(".", 1)
            suffix = "." + suffix
        gguf_name = table.get_name(base)
        if gguf_name is not None:
            found[gguf_name + suffix] = qual + hf_name
    for child_name, child in module.named_children():
        sub = _names_under(child, table, f"{qual}{child_name}.")
        found.update({k: v for k, v in sub.items() if k not in found})  # the parent's mapping wins
    return found


def _layout(table: GGUFTable, stored: StoredTensor, names: dict[str, str]) -> tuple[str | None, tuple, tuple[int, ...]]:
    """(transformers name or None, the rewrite, the shape returned) of one stored tensor: transformers' per-architecture
    TensorProcessor.process, decided from the name alone so that nothing is read."""
    name, arch, dims = stored.name, table.arch, stored.dims
    if arch == "llama" and (".attn_k." in name or ".attn_q." in name):
        n_head, n_kv = table.heads
        if n_head is None or n_kv is None:  # transformers leaves q/k as stored when either count is missing
            return names.get(name), (), dims
        heads = n_head if ".attn_q." in name else n_kv
        if not isinstance(heads, int) or heads <= 0 or dims[0] % (2 * heads):
            raise CheckpointError(f"{table.path.name}: tensor '{name}' has {dims[0]} rows, which {heads!r} attention heads "
                                  "do not divide into rotary pairs; the file's metadata and tensors disagree")
        return names.get(name), ("permute", heads), dims
    if arch in ("gemma2", "gemma3", "nemotron") and "norm.weight" in name:
        return names.get(name), ("minus_one",), dims
    if arch == "gpt2":
        op = ("transpose",) if any(key in name for key in _GPT2_TRANSPOSED) else ()
        shape = tuple(reversed(dims)) if op else dims
        if name == "output.weight":  # transformers stores it as lm_head.weight whatever the name map says
            return "lm_head.weight", op, shape
        return names.get(name), op, shape
    return names.get(name), (), dims


def read_dequantized(path: Path, stored: StoredTensor) -> torch.Tensor:
    """One tensor as float32, read from the file a few rows at a time (no memory map that would keep its pages)."""
    rows, cols = stored.rows, stored.dims[-1]
    row_bytes = stored.row_items * stored.item.itemsize
    out = torch.empty((rows, cols), dtype=torch.float32)
    step = max(1, CHUNK_BYTES // (4 * max(cols, 1)))
    try:
        with open(path, "rb") as f:
            for start in range(0, rows, step):
                n = min(step, rows - start)
                raw = np.empty(n * row_bytes, dtype=np.uint8)
                f.seek(stored.offset + start * row_bytes)
                if f.readinto(raw) != raw.nbytes:
                    raise CheckpointError(f"{path} ends inside tensor '{stored.name}'; the file is truncated: re-download it")
                # the array the gguf package's own reader would hand to dequantize, a block of rows of it
                block = dequantize(raw.view(stored.item).reshape(n, stored.row_items), stored.qtype)
                out[start:start + n] = torch.from_numpy(block.reshape(n, cols))
    except OSError as err:
        raise CheckpointError(f"cannot read tensor '{stored.name}' from {path} ({err}); the file is unreadable") from None
    return out.reshape(stored.dims)


def unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from llama.cpp's pairwise rotary order back to transformers' half-split one (llama arch):
    transformers' LlamaTensorProcessor._reverse_permute_weights.  [heads·head_dim, ...]"""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
