"""`--to gguf`: a llama.cpp GGUF (qwen2moe, llama with experts, or the dense source) at one tensor type."""

from __future__ import annotations

import numpy as np

from moeconv.export.gguf_layout import (
    byte_shape,
    encode,
    hyperparameters,
    resolve_type,
    tensor_type,
    unit_tensors,
    writable_types,
)
from moeconv.export.gguf_vocab import vocab_keys
from moeconv.export.registry import ExportError, ExportOptions, ExportPlan, ExportTarget, register_target
from moeconv.export.routing import plan_routing
from moeconv.export.source import NATIVE, ExportSource, check_family, check_moe, check_not_quantized
from moeconv.export.tensors import layer_keys_ok, unit_keys

GGUF_FILE = "model.gguf"


def _architecture(src: ExportSource) -> tuple[str, tuple[bool, ...]]:
    """(llama.cpp architecture, the top-k renormalization it applies).  llama's MoE renormalizes, qwen2moe does not."""
    if not src.is_moe:
        return ("qwen2" if src.family == "qwen2" else "llama"), ()
    llama_ok = not src.moe.get("shared_size") and not src.qkv_bias
    wants_norm = src.moe.get("scoring", "none") == "none" or bool(src.moe.get("renormalize"))
    return ("llama", (True,)) if llama_ok and wants_norm else ("qwen2moe", (False,))


def _source_types(src: ExportSource) -> set[str]:
    from gguf import GGUFReader  # gguf is optional (extra 'gguf'): needed only for GGUF export

    gguf_file = src.gguf_source()
    return {t.tensor_type.name for t in GGUFReader(str(gguf_file)).tensors} if gguf_file else set()


@register_target
class GGUFTarget(ExportTarget):
    name = "gguf"
    description = ("llama.cpp GGUF: qwen2moe (shared neurons or q/k/v biases), llama with experts (Mixtral layout), or a "
                   f"dense llama/qwen2; --type {'/'.join(writable_types())}")
    accepts_dense = True

    def cannot_hold(self) -> list[str]:
        return ["DAG-MoE aggregators", "moeconv quantized weights (export before `moeconv quantize`, pick --type)",
                "sigmoid router scoring", "non-SiLU or non-gated FFNs", "qwen3/olmo2/gemma/granite/phi3/gpt2 attention and norms",
                "rope scaling", "sliding-window attention beyond the window (llama.cpp's llama attends the whole context)",
                f"tensor types other than {', '.join(writable_types())}"]

    def check(self, src: ExportSource) -> None:
        check_not_quantized(src, self.name)
        if src.is_moe:
            check_moe(src, self.name)
            if not layer_keys_ok(src):
                raise ExportError(f"gguf's MoE architectures make every layer a MoE layer and this checkpoint keeps some dense; {NATIVE}")
        check_family(src, self.name, qkv_bias_ok=True)
        params = getattr(src.base, "rope_parameters", None) or getattr(src.base, "rope_scaling", None) or {}
        rope = params.get("rope_type", params.get("type", "default"))
        if rope != "default":
            raise ExportError(f"gguf export writes plain rope and this model uses '{rope}' rope scaling; use --to qwen2_moe "
                              "or --to mixtral (transformers carries it)")

    def plan(self, src: ExportSource, options: ExportOptions) -> ExportPlan:
        self.check(src)
        qtype = resolve_type(options.tensor_type, src)
        arch, can_normalize = _architecture(src)
        rmap = None
        if src.is_moe:
            rmap = plan_routing(src.moe, f"gguf ({arch})", can_normalize)
            rmap.epsilon = options.route_epsilon
        vocab = vocab_keys(src)
        entries = []
        for unit, keys in enumerate(unit_keys(src)):
            for name, t in unit_tensors(src, unit, keys, arch, rmap, meta=True).items():
                entries.append((name, tuple(t.shape), tensor_type(name, tuple(t.shape), qtype)))
        moe = src.moe or {}
        return ExportPlan(
            source=str(src.path), target=self.name, architecture=f"gguf {arch}", family=src.family,
            layers=src.base.num_hidden_layers, experts=moe.get("num_experts", 0), top_k=moe.get("top_k", 0),
            expert_size=moe.get("expert_size", 0), shared_size=moe.get("shared_size", 0),
            routing=rmap.mode if rmap else "dense",
            routing_detail=rmap.describe(moe["top_k"], moe["num_experts"]) if rmap else "dense FFNs, as the source",
            dtype=qtype, tensors=[n for n, _, _ in entries], output_bytes=sum(byte_shape(s, t)[1] for _, s, t in entries),
            notes=self._notes(src, arch, qtype, entries, vocab.origin), cannot_hold=self.cannot_hold(), routing_map=rmap,
            layout={"arch": arch, "entries": entries, "vocab": vocab},
        )

    def _notes(self, src: ExportSource, arch: str, qtype: str, entries: list, vocab: str) -> list[str]:
        counts: dict[str, int] = {}
        for _, _, t in entries:
            counts[t] = counts.get(t, 0) + 1
        notes = [f"tensor types: {', '.join(f'{n} x {t}' for t, n in sorted(counts.items()))} (norms, biases and routers "
                 f"stay F32{'; rows the ' + qtype + ' block does not divide fall back to F16' if 'F16' in counts and qtype != 'F16' else ''})",
                 f"tokenizer {vocab}"]
        stored = _source_types(src) - {"F32", "F16", "BF16"}
        if stored:
            notes.append(f"the source GGUF stores {'/'.join(sorted(stored))}: its weights, dequantized on reading, are stored as {qtype}")
        if arch == "qwen2moe":
            notes.append("shared expert gate: a 2^-40-scaled vector, sigmoid = 1/2 to float32 precision; shared down_proj x 2")
            if not src.moe.get("shared_size"):
                notes.append("no shared neurons: a 1-neuron all-zero shared expert (qwen2moe requires one)")
            if not src.qkv_bias:
                notes.append("zero q/k/v biases written (qwen2moe has them)")
        window = getattr(src.base, "sliding_window", None) if src.family == "mistral" else None
        if window and window < src.base.max_position_embeddings:
            notes.append(f"mistral's sliding window ({window}) is not held: llama.cpp attends the whole context beyond it")
        return notes

    def write(self, src: ExportSource, plan: ExportPlan, options: ExportOptions, partial, progress) -> dict:
        from gguf import GGMLQuantizationType, GGUFWriter  # gguf is optional (extra 'gguf'): needed only for GGUF export

        arch, entries = plan.layout["arch"], plan.layout["entries"]
        path = partial.path / GGUF_FILE
        writer = GGUFWriter(str(path), arch)
        hyperparameters(writer, src, arch, plan.dtype)
        for key, value, vtype, sub in plan.layout["vocab"].entries:
            writer.add_key_value(key, value, vtype, sub)
        for name, shape, t in entries:
            stored, nbytes = byte_shape(shape, t)
            dtype = {"F32": np.float32, "F16": np.float16}.get(t, np.uint8)
            writer.add_tensor_info(name, stored, np.dtype(dtype), nbytes, raw_dtype=None if t in ("F32", "F16") else GGMLQuantizationType[t])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        types = {name: t for name, _, t in entries}
        units = unit_keys(src)
        for unit, keys in enumerate(units):
            progress(f"writing {'globals' if unit == 0 else f'layer {unit}/{len(units) - 1}'} ({plan.dtype})")
            for name, tensor in unit_tensors(src, unit, keys, arch, plan.routing_map, meta=False).items():
                writer.write_tensor_data(encode(tensor, types[name]))
        writer.close()
        return {"files": [GGUF_FILE], "gguf_architecture": arch}
