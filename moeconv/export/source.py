"""What is being exported: a moeconv checkpoint (or, for gguf, a dense model), and which families a stock target can hold."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

import moeconv.io.load  # noqa: F401 - registers the moeconv config with transformers' AutoConfig
from moeconv.export.registry import ExportError
from moeconv.io.readers import CheckpointReader, open_checkpoint

# Families whose attention, norms and embeddings Qwen2-MoE / Mixtral / llama.cpp hold as they are.
STOCK_FAMILIES = ("llama", "mistral", "qwen2")
# Why the other supported families cannot be held by a stock llama-style decoder.
FAMILY_LIMITS = {
    "qwen3": "per-head q/k RMSNorm",
    "olmo2": "q/k norms and post-sublayer norms",
    "granite": "embedding, residual, attention and logit multipliers",
    "gemma": "(1+w) RMSNorm, scaled embeddings and GeGLU",
    "gemma2": "(1+w) RMSNorm, sandwich norms, logit soft-capping and GeGLU",
    "gemma3_text": "(1+w) RMSNorm, sandwich norms, q/k norms and GeGLU",
    "phi3": "its fused qkv projection and long-context rope (not mapped by this exporter)",
    "gpt2": "LayerNorm, learned positions and a non-gated GELU FFN",
}
NATIVE = "keep the native moeconv checkpoint (AutoModelForCausalLM with trust_remote_code=True, or moeconv eval)"


@dataclass
class ExportSource:
    """A checkpoint opened for export: the dense config of its family, its MoE block settings, lazy tensors."""

    path: Path
    base: PretrainedConfig  # the source family's own config (moeconv: base_config)
    moe: dict | None  # the `moe` block of a moeconv checkpoint; None for a dense model
    dtype: str
    _reader: CheckpointReader | None = None

    @property
    def reader(self) -> CheckpointReader:
        """Opened on first use, so that what a target cannot hold is refused from config.json alone."""
        if self._reader is None:
            self._reader = open_checkpoint(self.path)
        return self._reader

    @property
    def family(self) -> str:
        return self.base.model_type

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def tied(self) -> bool:
        return bool(getattr(self.base, "tie_word_embeddings", False))

    @property
    def qkv_bias(self) -> bool:
        """Whether q/k/v projections carry biases (qwen2 always; llama/mistral only with attention_bias)."""
        return self.family == "qwen2" or bool(getattr(self.base, "attention_bias", False))

    def head_dim(self) -> int:
        return int(getattr(self.base, "head_dim", None) or self.base.hidden_size // self.base.num_attention_heads)

    def gguf_source(self) -> Path | None:
        """The .gguf file this model came from (a GGUF itself, or the source recorded in provenance.json)."""
        if self.path.is_file() and self.path.suffix == ".gguf":
            return self.path
        if not self.is_moe and self.path.is_dir():
            ggufs = sorted(self.path.glob("*.gguf"))
            return ggufs[0] if len(ggufs) == 1 and not (self.path / "config.json").is_file() else None
        prov = self.path / "provenance.json"
        try:
            src = Path(json.loads(prov.read_text()).get("source", "")).expanduser()
        except (OSError, json.JSONDecodeError):
            return None
        if src.is_file() and src.suffix == ".gguf":
            return src
        ggufs = sorted(src.glob("*.gguf")) if src.is_dir() and not (src / "config.json").is_file() else []
        return ggufs[0] if len(ggufs) == 1 else None


def open_source(path: str | Path) -> ExportSource:
    p = Path(path).expanduser()
    cfg_file = p / "config.json"
    try:
        raw = json.loads(cfg_file.read_text()) if p.is_dir() and cfg_file.is_file() else {}
    except json.JSONDecodeError:
        raw = {}
    if raw.get("model_type") == "moeconv":
        base_dict = dict(raw["base_config"])
        base = AutoConfig.for_model(base_dict.pop("model_type"), **base_dict)
        return ExportSource(p, base, raw["moe"], str(raw.get("dtype") or "float32"))
    reader = open_checkpoint(p)
    cfg = reader.config
    dtype = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32").replace("torch.", "")
    return ExportSource(p, cfg, None, dtype, reader)


def check_family(src: ExportSource, target: str, qkv_bias_ok: bool) -> None:
    """ExportError unless a stock llama-style decoder with SiLU-gated experts holds the source exactly."""
    family = src.family
    if family not in STOCK_FAMILIES:
        limit = FAMILY_LIMITS.get(family, "an architecture this exporter does not map")
        raise ExportError(f"{target} cannot hold a {family} model: it has {limit}; {NATIVE}")
    act = getattr(src.base, "hidden_act", "silu")
    if act != "silu" or (src.moe is not None and (src.moe.get("activation") != "silu" or not src.moe.get("gated", True))):
        raise ExportError(f"{target} runs SiLU-gated FFNs only and this {family} model uses '{act}'; {NATIVE}")
    if getattr(src.base, "mlp_bias", False) or (src.moe is not None and src.moe.get("ffn_bias")):
        raise ExportError(f"{target} has no FFN biases and this {family} model has them; {NATIVE}")
    if family in ("llama", "mistral") and getattr(src.base, "attention_bias", False):
        raise ExportError(f"{target} has no attention output bias and this {family} model has one (attention_bias); {NATIVE}")
    if src.qkv_bias and not qkv_bias_ok:
        raise ExportError(f"{target} has no q/k/v biases and this {family} model has them; use --to qwen2_moe (it holds them)")


def check_moe(src: ExportSource, target: str) -> None:
    """ExportError for what no stock MoE block holds: quantized weights, a dense source, DAG aggregators, odd layouts."""
    check_not_quantized(src, target)
    moe = src.moe
    if moe is None or not moe.get("num_experts"):
        raise ExportError(f"{src.path} is a dense model and {target} is a Mixture-of-Experts format; run "
                          f"`moeconv convert {src.path} MOE` first, then export MOE (or use --to gguf for a dense GGUF)")
    if moe.get("dag"):
        raise ExportError(f"{target} sums experts and cannot hold DAG-MoE aggregators; export the checkpoint from before "
                          f"`moeconv dag`, or {NATIVE}")
    if moe.get("expert_sizes") or moe.get("layer_overrides"):
        raise ExportError(f"{target} needs every expert of every layer to have the same size; {NATIVE}")


def check_not_quantized(src: ExportSource, target: str) -> None:
    quant = (src.moe or {}).get("quant")
    if quant:
        fmts = {f.get("format") for f in (quant.get("modules") or quant).values() if isinstance(f, dict)}
        raise ExportError(f"{target} cannot hold moeconv's packed {'/'.join(sorted(map(str, fmts)))} weights; export the "
                          "checkpoint from before `moeconv quantize` (gguf re-quantizes it with --type, e.g. Q8_0 or Q4_0)")
