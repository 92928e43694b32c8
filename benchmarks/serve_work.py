"""The serve benchmarks' models, converted and exported once into a work folder, and their bytes read per decoded token."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from eval_speed import cpu_name, default_model  # benchmarks/ is on sys.path when run as a script
from gguf import GGUFReader

from moeconv.config import load_recipe
from moeconv.convert import convert
from moeconv.eval.llamacpp import gguf_parameters
from moeconv.export import ExportOptions, export

__all__ = ["cpu_name", "prepare", "bytes_per_token", "active_fraction", "parse_settings"]

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "dot-moe-softmax.yaml"


@dataclass
class Setting:
    """One MoE shape and the files that serve it (all under the work folder)."""

    experts: int
    top_k: int
    checkpoint: Path  # moeconv's own checkpoint (converted with RECIPE at this shape)
    gguf: Path  # its llama.cpp export
    stock: Path  # its transformers export (Mixtral: the softmax recipe has no shared neurons)

    @property
    def name(self) -> str:
        return f"({self.experts},{self.top_k})"


def parse_settings(text: str) -> list[tuple[int, int]]:
    """'8x4,16x4' -> [(8, 4), (16, 4)]"""
    return [(int(e), int(k)) for e, k in (part.strip().split("x") for part in text.split(",") if part.strip())]


def _say(line: str) -> None:
    print(line, flush=True)


def _check_shape(checkpoint: Path, experts: int, top_k: int) -> None:
    moe = json.loads((checkpoint / "config.json").read_text())["moe"]
    if (moe["num_experts"], moe["top_k"], moe.get("scoring")) != (experts, top_k, "softmax"):
        raise SystemExit(f"{checkpoint} holds ({moe['num_experts']},{moe['top_k']}) {moe.get('scoring')} routing, not "
                         f"({experts},{top_k}) softmax: remove it or pass another --work")


def prepare(work: Path, shapes: list[tuple[int, int]], tensor_type: str, source: str | None = None) -> tuple[Path, Path, list[Setting]]:
    """(source model, dense GGUF, settings): converts and exports what the work folder does not hold yet."""
    work.mkdir(parents=True, exist_ok=True)
    source = source or default_model()
    dense = work / f"dense-{tensor_type}"
    if not dense.exists():
        _say(f"exporting the dense source to {dense} ({tensor_type})")
        export(source, dense, "gguf", ExportOptions(tensor_type=tensor_type))
    settings = []
    for experts, top_k in shapes:
        ckpt = work / f"moe-{experts}x{top_k}"
        if not ckpt.exists():
            _say(f"converting {Path(source).name} -> {ckpt} with {RECIPE.name} at ({experts},{top_k}) (minutes)")
            convert(str(source), ckpt, load_recipe(RECIPE, {"experts": experts, "top_k": top_k}))
        _check_shape(ckpt, experts, top_k)
        setting = Setting(experts, top_k, ckpt, work / f"{ckpt.name}-{tensor_type}" / "model.gguf", work / f"{ckpt.name}-mixtral")
        if not setting.gguf.parent.exists():
            _say(f"exporting {ckpt.name} to {setting.gguf} ({tensor_type})")
            export(ckpt, setting.gguf.parent, "gguf", ExportOptions(tensor_type=tensor_type))
        if not setting.stock.exists():
            _say(f"exporting {ckpt.name} to {setting.stock} (MixtralForCausalLM)")
            export(ckpt, setting.stock, "mixtral")
        settings.append(setting)
    return Path(source), dense / "model.gguf", settings


def bytes_per_token(gguf: Path) -> int:
    """Weight bytes one decoded token reads: every non-expert tensor, k/E of the expert tensors.  The token embedding
    counts only when it is also the output projection (tied, no output.weight): otherwise a token reads one row of it."""
    reader = GGUFReader(str(gguf))
    arch = reader.fields["general.architecture"].contents()
    count = reader.fields.get(f"{arch}.expert_count")
    used = reader.fields.get(f"{arch}.expert_used_count")
    share = used.contents() / count.contents() if count is not None else 1.0
    names = {t.name for t in reader.tensors}
    total = 0.0
    for t in reader.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += int(t.n_bytes) * (share if t.name.endswith("_exps.weight") else 1.0)
    return int(total)


def active_fraction(gguf: Path, dense: Path) -> float:
    """Parameters one token uses, as a fraction of the dense model's."""
    return gguf_parameters(gguf).active / gguf_parameters(dense).total
