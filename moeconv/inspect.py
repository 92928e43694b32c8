"""What is in a checkpoint: family, layers, experts, parameters (total and active), dtype, quantization, size.

Parameters of moeconv checkpoints come from moeconv.eval.stats.count_parameters on a meta-device skeleton, the same
counter eval uses: quantized linears count their logical out x in weights, not their packed storage elements."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

import moeconv.io.load  # noqa: F401 - registers the moeconv config/model classes with transformers' Auto*
from moeconv.errors import CheckpointError
from moeconv.eval.stats import count_parameters
from moeconv.io.readers import open_checkpoint


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def inspect_checkpoint(path: str | Path) -> dict:
    """A summary dict of a dense or moeconv checkpoint."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{path} does not exist; pass a model folder or a .gguf file")
    cfg_file = p / "config.json"
    config = json.loads(cfg_file.read_text()) if p.is_dir() and cfg_file.is_file() else None
    if config is None or config.get("model_type") != "moeconv":
        reader = open_checkpoint(p)
        total = sum(_numel(reader.shape(k)) for k in reader.keys())
        cfg = reader.config
        return {"path": str(p), "kind": "dense", "family": cfg.model_type, "layers": cfg.num_hidden_layers,
                "parameters": total, "active_parameters": total, "dtype": str(getattr(cfg, "dtype", None) or "unknown"),
                "quantization": None, "bytes_on_disk": _size_on_disk(p)}
    moe, base = config["moe"], config["base_config"]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{p} has a moeconv config.json but no .safetensors shards; the checkpoint is incomplete")
    counts = count_parameters(_skeleton(p))  # quantized linears count as out x in logical weights
    return {"path": str(p), "kind": "moe", "family": base.get("model_type"), "layers": len(moe["layers"]),
            "experts": moe["num_experts"], "top_k": moe["top_k"], "expert_size": moe["expert_size"],
            "shared_size": moe.get("shared_size", 0), "scoring": moe.get("scoring"),
            "dag": moe.get("dag"), "parameters": counts.total, "active_parameters": counts.active,
            "aggregator_parameters": counts.aggregator,
            "dtype": config.get("dtype"), "quantization": quantization_summary(moe.get("quant"), files),
            "bytes_on_disk": _size_on_disk(p)}


def _skeleton(path: Path) -> nn.Module:
    """The checkpoint's model with every tensor on the meta device: its module structure, no weights read."""
    reader = open_checkpoint(path)
    with init_empty_weights(include_buffers=True):
        return AutoModelForCausalLM.from_config(reader.config, dtype=torch.float32)


def quantization_summary(quant: dict | None, files: list[Path]) -> dict | None:
    """Method, formats, and the quantized linears' logical weights (out x in) and stored bits per weight (codes,
    scales/zeros or lo/hi, row offsets and the shared sub1 dictionary) from the shards' headers."""
    if not quant:
        return None
    modules = quant.get("modules") or {}
    weights = sum(int(f["in_features"]) * int(f["out_features"]) for f in modules.values())
    stored = 0
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                module = key.rsplit(".", 1)[0]
                if (module in modules and not key.endswith(".bias")) or key == quant.get("sub1_dictionary"):
                    sl = h.get_slice(key)
                    stored += _numel(sl.get_shape()) * _BITS[sl.get_dtype()]
    formats = sorted({str(f.get("format")) for f in modules.values()})
    return {"method": quant.get("method"), "formats": formats, "default": quant.get("default"), "linears": len(modules),
            "weights": weights, "bits_per_weight": stored / weights if weights else None}


_BITS = {"F64": 64, "I64": 64, "F32": 32, "I32": 32, "F16": 16, "BF16": 16, "I16": 16, "U16": 16, "U8": 8, "I8": 8, "BOOL": 8}
