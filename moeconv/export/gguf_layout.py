"""llama.cpp's view of a llama-style model: tensor names, q/k row order, tensor types and the hyperparameter keys."""

from __future__ import annotations

import functools

import numpy as np
import torch

from moeconv.export.registry import ExportError
from moeconv.export.routing import RoutingMap
from moeconv.export.source import ExportSource
from moeconv.export.tensors import read_unit, split_layer

# llama.cpp's qwen2moe computes the shared expert's gate as silu(z)/z, which is NaN at z = 0; a tiny gate vector
# keeps z = c·Σ u_i x_i far below float32's resolution of sigmoid around 0 (so sigmoid(z) rounds to exactly 1/2)
# yet nonzero for any hidden state that is not an exact cancellation.
SHEXP_GATE_SCALE = 2.0**-40
TIED_FALLBACK = ("llama", "qwen2")  # archs that read token_embd when output.weight is absent
FLOAT_TYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
GLOBALS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
               **{f"self_attn.{p}_proj.{w}": f"attn_{p}.{w}" for p in "qkv" for w in ("weight", "bias")}}


@functools.cache
def writable_types() -> tuple[str, ...]:
    """Tensor types the installed gguf package can write (it dequantizes more than it quantizes)."""
    from gguf import (  # gguf is optional (extra 'gguf'): needed only for GGUF export
        GGML_QUANT_SIZES,
        GGMLQuantizationType,
        quants,
    )

    names = []
    for qtype in GGMLQuantizationType:
        if qtype.name.startswith(("I", "F64")) and not qtype.name.startswith("IQ"):
            continue
        block = GGML_QUANT_SIZES[qtype][0]
        try:
            quants.quantize(np.linspace(-1, 1, 256 * block, dtype=np.float32).reshape(-1, 256 * block), qtype)
        except (NotImplementedError, ValueError, AssertionError, TypeError):
            continue
        names.append(qtype.name)
    return tuple(names)


def resolve_type(name: str | None, src: ExportSource) -> str:
    name = (name or FLOAT_TYPES.get(src.dtype, "F32")).upper()
    if name not in writable_types():
        raise ExportError(f"the gguf package cannot write tensor type '{name}'; choose one of {', '.join(writable_types())}")
    return name


def tensor_type(gguf_name: str, shape: tuple[int, ...], wanted: str) -> str:
    """The type a tensor is stored in: F32 for norms, biases and routers (as llama.cpp's converter keeps them), the
    wanted type otherwise, F16 where the wanted block size does not divide the rows."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # gguf is optional (extra 'gguf'): needed only for GGUF export

    if len(shape) < 2 or ".ffn_gate_inp" in gguf_name:
        return "F32"
    block = GGML_QUANT_SIZES[GGMLQuantizationType[wanted]][0]
    return wanted if shape[-1] % block == 0 else "F16"


def encode(t: torch.Tensor, qtype: str) -> np.ndarray:
    """float32 tensor -> the array GGUFWriter stores (uint8 blocks for BF16 and quantized types)."""
    from gguf import GGMLQuantizationType, quants  # gguf is optional (extra 'gguf'): needed only for GGUF export

    arr = t.detach().float().contiguous().numpy()
    if qtype == "F32":
        return arr
    if qtype == "F16":
        return arr.astype(np.float16)
    return quants.quantize(arr, GGMLQuantizationType[qtype])


def byte_shape(shape: tuple[int, ...], qtype: str) -> tuple[tuple[int, ...], int]:
    """(stored array shape, bytes) of a tensor of logical `shape` in `qtype`."""
    from gguf import (  # gguf is optional (extra 'gguf'): needed only for GGUF export
        GGMLQuantizationType,
        quant_shape_to_byte_shape,
    )

    if qtype in ("F32", "F16"):
        return shape, int(np.prod(shape)) * (4 if qtype == "F32" else 2)
    stored = tuple(quant_shape_to_byte_shape(shape, GGMLQuantizationType[qtype]))
    return stored, int(np.prod(stored))


def to_interleaved_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from transformers' half-split rotary layout to llama.cpp's pairwise one (llama arch).  [H·hd, ...]"""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unit_tensors(src: ExportSource, unit: int, keys: list[str], arch: str, rmap: RoutingMap | None,
                 meta: bool) -> dict[str, torch.Tensor]:
    """One unit's tensors under llama.cpp's names, in write order (float32, or meta tensors when planning)."""
    tensors = read_unit(src, keys, meta)
    if unit == 0:
        out = {GLOBALS[k]: v for k, v in tensors.items()}
        if "output.weight" not in out and arch not in TIED_FALLBACK:
            out["output.weight"] = out["token_embd.weight"]
        return out
    layer, moe = unit - 1, None
    if src.is_moe:
        tensors, moe = split_layer(src, layer, tensors, rmap, 2.0 if arch == "qwen2moe" else 1.0)
    prefix = f"model.layers.{layer}."
    out = {f"blk.{layer}.{LAYER_NAMES[k[len(prefix):]]}": v for k, v in tensors.items()}
    if arch == "llama":
        for proj, heads in (("q", src.base.num_attention_heads), ("k", src.base.num_key_value_heads)):
            name = f"blk.{layer}.attn_{proj}.weight"
            out[name] = to_interleaved_rope(out[name], heads)
    if arch == "qwen2moe":
        for proj in "qkv":
            weight = out[f"blk.{layer}.attn_{proj}.weight"]  # [out, d]
            out.setdefault(f"blk.{layer}.attn_{proj}.bias", torch.zeros(weight.shape[0], device=weight.device))  # [out]
    if moe is not None:
        blk = f"blk.{layer}"
        out.update({f"{blk}.ffn_gate_inp.weight": moe.router, f"{blk}.ffn_gate_exps.weight": moe.gate,  # [E, d], [E, s, d]
                    f"{blk}.ffn_up_exps.weight": moe.up, f"{blk}.ffn_down_exps.weight": moe.down})  # [E, s, d], [E, d, s]
        if arch == "qwen2moe":
            d = moe.router.shape[1]
            gate = torch.linspace(1.0, 2.0, d, device=moe.router.device) * SHEXP_GATE_SCALE  # [d]
            out.update({f"{blk}.ffn_gate_inp_shexp.weight": gate, f"{blk}.ffn_gate_shexp.weight": moe.shared_gate,
                        f"{blk}.ffn_up_shexp.weight": moe.shared_up, f"{blk}.ffn_down_shexp.weight": moe.shared_down})
    return out


def rope_theta(src: ExportSource) -> float:
    params = getattr(src.base, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(src.base, "rope_theta", 10000.0)))


def hyperparameters(writer, src: ExportSource, arch: str, qtype: str) -> None:
    """The {arch}.* keys llama.cpp reads for this architecture."""
    import gguf  # optional (extra 'gguf'): needed only for GGUF export

    base, moe = src.base, src.moe
    writer.add_name(src.path.stem)
    writer.add_context_length(int(base.max_position_embeddings))
    writer.add_embedding_length(int(base.hidden_size))
    writer.add_block_count(int(base.num_hidden_layers))
    writer.add_head_count(int(base.num_attention_heads))
    writer.add_head_count_kv(int(base.num_key_value_heads))
    writer.add_layer_norm_rms_eps(float(base.rms_norm_eps))
    writer.add_rope_freq_base(rope_theta(src))
    head_dim = src.head_dim()
    writer.add_rope_dimension_count(head_dim)
    if head_dim != base.hidden_size // base.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(int(base.vocab_size))
    if moe is None:
        writer.add_feed_forward_length(int(base.intermediate_size))
    else:
        writer.add_expert_count(moe["num_experts"])
        writer.add_expert_used_count(moe["top_k"])
        dense = moe["expert_size"] * moe["num_experts"] + moe.get("shared_size", 0)
        writer.add_feed_forward_length(moe["expert_size"] if arch == "llama" else dense)
        if arch == "qwen2moe":
            writer.add_expert_feed_forward_length(moe["expert_size"])
            writer.add_expert_shared_feed_forward_length(max(moe.get("shared_size", 0), 1))
    ftype = gguf.LlamaFileType.ALL_F32 if qtype == "F32" else getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}", None)
    if ftype is not None:
        writer.add_file_type(ftype)
