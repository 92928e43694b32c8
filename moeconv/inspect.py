"""What is in a checkpoint: family, layers, experts, parameters (total and active), dtype, quantization, size."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from moeconv.errors import CheckpointError
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
    total, expert_params = 0, 0
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if k.endswith("neuron_index"):
                    continue
                n = _numel(h.get_slice(k).get_shape())
                total += n
                if ".experts.0." in k:
                    expert_params += n  # one expert of every layer
    idle = (moe["num_experts"] - moe["top_k"]) * expert_params
    return {"path": str(p), "kind": "moe", "family": base.get("model_type"), "layers": len(moe["layers"]),
            "experts": moe["num_experts"], "top_k": moe["top_k"], "expert_size": moe["expert_size"],
            "shared_size": moe.get("shared_size", 0), "scoring": moe.get("scoring"),
            "dag": moe.get("dag"), "parameters": total, "active_parameters": total - idle,
            "dtype": config.get("dtype"), "quantization": moe.get("quant"), "bytes_on_disk": _size_on_disk(p)}
