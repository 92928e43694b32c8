"""`moeconv dag SRC OUT`: add DAG-MoE aggregators to an existing moeconv MoE checkpoint, distilled per layer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from moeconv.calib.capture import tokenize_windows
from moeconv.calib.sources import load_text
from moeconv.config import CalibrationSpec, DagConfig
from moeconv.dag.distill import attach_dag, distill_dag
from moeconv.dag.end_to_end import distill_end_to_end
from moeconv.errors import MoeconvError
from moeconv.ffn import DenseFFN
from moeconv.io.adapters import adapter_for
from moeconv.io.files import folder_fingerprint
from moeconv.io.load import is_moeconv_checkpoint, load_model, load_tokenizer
from moeconv.io.readers import open_checkpoint
from moeconv.io.writer import HF_FILES, PartialOutput
from moeconv.jobs import check_destination, job_fingerprint, run_job


def _check_source(src: Path, force: bool) -> dict:
    if not src.is_dir() or not (src / "config.json").is_file():
        raise MoeconvError(f"{src} is not a model folder; pass a moeconv MoE checkpoint made by `moeconv convert`")
    if not is_moeconv_checkpoint(src):
        raise MoeconvError(f"{src} is a dense checkpoint; convert it first (moeconv convert SRC OUT --dag adds the aggregator too)")
    config = json.loads((src / "config.json").read_text())
    moe = config["moe"]
    if moe.get("dag") and not force:
        raise MoeconvError(f"{src} already has a DAG aggregator; pass --force to replace it")
    if moe.get("quant"):
        raise MoeconvError(f"{src} is quantized; add the aggregator before quantizing (moeconv dag, then moeconv quantize)")
    if moe.get("scoring", "none") != "none":
        raise MoeconvError(f"{src} uses router scoring '{moe.get('scoring')}'; the aggregator is distilled only for scoring 'none'")
    return config


def _teacher_path(src: Path, teacher: str | None, why: str) -> str:
    """The dense model SRC was converted from: `teacher`, else the source recorded in provenance.json; `why` (what
    needs it) opens the error when neither exists."""
    if teacher is not None and not Path(teacher).exists():
        raise MoeconvError(f"teacher {teacher} does not exist; pass the dense model folder or .gguf {src} was converted from")
    recorded = _provenance(src).get("source")
    path = teacher or recorded
    if not path or not Path(path).exists():
        raise MoeconvError(f"{why}; pass --teacher with the dense model {src} was converted from "
                           f"(recorded source {recorded!r} is not there)")
    return path


def _provenance(src: Path) -> dict:
    return json.loads((src / "provenance.json").read_text()) if (src / "provenance.json").is_file() else {}


def _dense_ffns(src: Path, teacher: str | None, moe: dict) -> Callable[[int], DenseFFN] | None:
    """Decoder layer -> the dense FFN whose output the aggregator should reproduce, or None when every expert
    summed is that FFN. A refitted checkpoint's experts no longer sum to the dense FFN (their down projections
    were re-solved for top-k routing), so its targets come from the dense source: `teacher`, or the source
    recorded in provenance.json."""
    refitted = any(m.get("refit_kept") for m in _provenance(src).get("layers", {}).values())
    if teacher is None and not refitted:
        return None
    teacher = _teacher_path(src, teacher, f"{src}'s down projections were refitted, so its experts no longer sum to the dense FFN")
    reader = open_checkpoint(teacher)
    adapter = adapter_for(reader.config)
    d_ff = adapter.d_ff(reader.config)
    if d_ff != moe["num_experts"] * moe["expert_size"] + moe.get("shared_size", 0):
        raise MoeconvError(f"teacher {teacher} has FFN width {d_ff}, which is not the one {src} was converted from; "
                           "pass the dense source of this checkpoint")
    return lambda i: adapter.read_ffn(reader.get, i, reader.config).to(torch.float32)


def _capture_inputs(model: torch.nn.Module, blocks: list, windows: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Inputs of every MoE block over the calibration windows (the checkpoint's own forward).  [T, d] each"""
    captured: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = [b.register_forward_pre_hook(lambda _m, a, i=i: captured[i].append(a[0].reshape(-1, a[0].shape[-1]).cpu()))
             for i, b in enumerate(blocks)]
    try:
        with torch.inference_mode():
            for batch in windows.split(4):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(c) for c in captured]


def add_dag(src: str | Path, out: str | Path, dag: dict, calibration: CalibrationSpec, *, seed: int = 0, force: bool = False,
            resume: bool = False, device: torch.device = torch.device("cpu"), teacher: str | None = None,
            progress: Callable[[str, int | None, int], None] = lambda stage, layer, layers: None) -> dict:
    """Write SRC plus a distilled aggregator per MoE layer to OUT.  Returns {"layers": per-layer metrics,
    "end_to_end": metrics of the joint step or None}.

    Each aggregator is distilled to the dense FFN's output: every expert summed, or, for refitted checkpoints
    (or when `teacher` is given), the teacher's FFN on the same inputs. With `dag.end_to_end`, all aggregators
    are then trained together on KL to the dense teacher's logits over the same calibration windows."""
    src, out = Path(src), Path(out)
    config = _check_source(src, force=force or resume)
    check_destination(src, out, force)
    settings = DagConfig(**dag)
    moe = config["moe"]
    layer_local = settings.train.steps > 0 or settings.end_to_end is None  # end to end only: no per-layer step
    dense_ffn = _dense_ffns(src, teacher, moe) if layer_local else None
    e2e_teacher = _teacher_path(src, teacher, "end-to-end distillation needs the dense teacher") if settings.end_to_end else None
    progress("tokenizing calibration text", None, 0)
    text = load_text(calibration.source, calibration.text_field)
    windows = tokenize_windows(load_tokenizer(src), text, calibration.tokens, calibration.seqlen)
    fingerprint = job_fingerprint(src=folder_fingerprint(src), dag=settings.model_dump(), teacher=teacher,
                                  calib=[text.fingerprint, windows.numel()], seed=seed)

    def work(partial: PartialOutput) -> dict:
        model = load_model(src, dtype="float32", device=str(device))
        blocks = [model.get_submodule(moe["ffn_path"].format(i=i)) for i in moe["layers"]]
        metrics, new_tensors = {}, {}
        if layer_local:
            metrics = _distill_layers(model, blocks, moe["layers"], windows, dense_ffn, settings, seed, device, progress)
        else:  # every layer starts exactly neutral (W_up = 0): the joint step starts from the plain MoE
            for i, block in zip(moe["layers"], blocks, strict=True):
                attach_dag(block, settings, torch.Generator().manual_seed(seed * 100003 + i))
        joint = None
        if settings.end_to_end is not None:
            progress("loading the dense teacher", None, 0)
            dense = load_model(e2e_teacher, dtype="float32", device=str(device))

            def on_step(event) -> None:
                if event.stage == "step":
                    progress(f"end-to-end step {event.step}/{event.steps}, KL {event.metrics['kl']:.4f}", None, 0)

            joint = distill_end_to_end(model, dense, windows, settings.end_to_end, seed=seed, progress=on_step,
                                       device="cpu" if device.type == "cpu" else "auto")
            del dense
        for i, block in zip(moe["layers"], blocks, strict=True):
            prefix = moe["ffn_path"].format(i=i)
            new_tensors[prefix] = {f"{prefix}.dag.{k}": v.detach().cpu().contiguous() for k, v in block.dag.state_dict().items()}
        _write(src, partial, config, settings, new_tensors, {"layers": metrics, "end_to_end": joint})
        return {"layers": metrics, "end_to_end": joint}

    return run_job(out, fingerprint, work, force=force, resume=resume)


def _distill_layers(model: torch.nn.Module, blocks: list, layers: list[int], windows: torch.Tensor,
                    dense_ffn: Callable[[int], DenseFFN] | None, settings: DagConfig, seed: int, device: torch.device,
                    progress: Callable[[str, int | None, int], None]) -> dict:
    """The layer-local step: each block's aggregator distilled to the dense FFN output on the block's own inputs."""
    progress("capturing MoE inputs", None, len(blocks))
    inputs = _capture_inputs(model, blocks, windows, device)
    metrics = {}
    for n, (i, block, x) in enumerate(zip(layers, blocks, inputs, strict=True)):
        progress("dag", n, len(blocks))
        block.dag = None
        with torch.no_grad():
            if dense_ffn is not None:
                target = dense_ffn(i).to(device).forward(x.to(device))
            else:  # without a refit, every expert summed is the dense FFN (scoring "none")
                top_k, block.top_k = block.top_k, block.num_experts
                target = block(x.to(device))
                block.top_k = top_k
        metrics[str(i)] = distill_dag(block, x.to(device), target, settings, torch.Generator().manual_seed(seed * 100003 + i))
    return metrics


def _write(src: Path, partial: PartialOutput, config: dict, settings: DagConfig, new: dict, metrics: dict) -> None:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = dict(index["weight_map"])
    for prefix, tensors in new.items():  # each layer's aggregator goes into the shard holding its router
        shard = weight_map[f"{prefix}.router.weight"]
        weight_map.update({name: shard for name in tensors})
    for shard in sorted(set(weight_map.values())):
        if partial.has_shard(shard):
            continue
        tensors = load_file(str(src / shard))
        for layer_tensors in new.values():
            tensors.update({k: v for k, v in layer_tensors.items() if weight_map[k] == shard})
        partial.write_shard(shard, tensors)
    total = index.get("metadata", {}).get("total_size", 0) + sum(t.numel() * t.element_size() for d in new.values() for t in d.values())
    partial.write_index(weight_map, total)
    config["moe"]["dag"] = settings.architecture()
    partial.write_text("config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    skip = {"config.json", "model.safetensors.index.json", "provenance.json", *weight_map.values()}
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in skip and f.name not in HF_FILES:
            partial.copy_in(f)
    partial.write_modeling_code()
    provenance = _provenance(src)
    provenance["dag"] = {"settings": settings.model_dump(), **metrics}
    partial.write_json("provenance.json", provenance)
