"""`moeconv heal` as a job: distil the dense teacher into a converted (or pruned) student, resumably, into OUT."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from moeconv.calib.capture import tokenize_windows
from moeconv.calib.sources import load_text
from moeconv.config import HealConfig, heal_config, read_yaml_mapping
from moeconv.errors import CheckpointError, MoeconvError, RecipeError
from moeconv.heal.checkpoint import CHECKPOINT_DIR
from moeconv.heal.monitor import heldout_plot
from moeconv.heal.objective import distill_metrics
from moeconv.heal.student import write_like_student
from moeconv.heal.train import RUN_SPECIFIC, HealEvent, heal
from moeconv.io.files import folder_fingerprint
from moeconv.io.load import is_moeconv_checkpoint, load_model, load_tokenizer
from moeconv.io.writer import PartialOutput
from moeconv.jobs import check_destination, job_fingerprint, run_job

PLOT_FILE = "heal-kl.png"


def heal_settings(recipe: Path | None, overrides: dict) -> HealConfig:
    """The `heal:` block of a convert recipe (or a file of heal fields), with options given as overrides (None: unset)."""
    block: dict = {}
    if recipe is not None:
        data = read_yaml_mapping(recipe, "configs/dot-moe.yaml (its heal: block)")
        block = data.get("heal", data)
        if not isinstance(block, dict):
            raise RecipeError(f"{recipe}: heal: must be a mapping of heal fields")
    return heal_config({**block, **{k: v for k, v in overrides.items() if v is not None}}, str(recipe or "heal options"))


def resolve_training_device(device: str) -> str:
    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def heal_checkpoint(student: str, out: Path, teacher: str, config: HealConfig, *, eval_tokens: int = 0,
                    eval_source: str = "shakespeare:heldout", device: str = "auto", force: bool = False, resume: bool = False,
                    progress: Callable[[HealEvent], None] | None = None) -> dict:
    """Heal STUDENT towards TEACHER and write it to OUT (its own tensor names, shards and dtypes; heal.json beside).

    Under `accelerate launch` (WORLD_SIZE > 1) every process trains its share of each batch (DDP); the main
    process alone holds OUT.lock, measures, and writes; the others learn where the checkpoints live from it.

    -> the heal metrics (history left out; `main_process` False in the other processes) and, with eval_tokens,
    KL and perplexity on held-out text before and after."""
    student_dir, out = Path(student), Path(out)
    dev = resolve_training_device(device)
    dist = PartialState(cpu=dev == "cpu") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if dist is not None:
        dev = str(dist.device)  # each process trains on its own device
        if not dist.is_main_process:
            return _follow(student, teacher, config, dev, resume)
    moe = is_moeconv_checkpoint(student_dir)
    if moe and json.loads((student_dir / "config.json").read_text()).get("moe", {}).get("quant"):
        raise RecipeError(f"{student} is quantized; heal the unquantized MoE, then quantize it")
    check_destination(student, out, force)
    # Content hashes of the student (not names or mtimes): a resume continues only the same student, teacher and settings.
    fingerprint = job_fingerprint(student=folder_fingerprint(student_dir), teacher=str(Path(teacher).resolve()),
                                  config=config.model_dump(mode="json"))

    def work(partial: PartialOutput) -> dict:
        if dist is not None:
            broadcast_object_list([str(partial.path)])  # the other processes wait for this before training
            announced.append(True)
        try:
            tokenizer = load_tokenizer(student)
        except CheckpointError:
            tokenizer = load_tokenizer(teacher)
        model, dense = load_model(student, "float32", dev), load_model(teacher, "float32", dev)
        evals, held = {}, None
        if eval_tokens:
            held = tokenize_windows(tokenizer, load_text(eval_source), eval_tokens, config.seqlen)
            evals["before"] = distill_metrics(model, dense, held)
        metrics = heal(model, dense, tokenizer, config, partial.path / CHECKPOINT_DIR, progress, device=dev, resume=resume)
        if held is not None:
            evals["after"] = distill_metrics(model, dense, held)
        if moe or (student_dir.is_dir() and any(student_dir.glob("*.safetensors"))):
            write_like_student(model, student_dir, partial)
        else:  # a .gguf or .bin dense student: written as a transformers folder
            partial.write_saved(model.save_pretrained)
            partial.write_saved(tokenizer.save_pretrained)
        kept = {k: v for k, v in metrics.items() if k not in RUN_SPECIFIC}  # OUT is byte-identical after a resume
        partial.write_json("heal.json", {**kept, "teacher": teacher, "student": student, "eval": evals})
        if len(metrics["heldout"]) > 1:  # the held-out KL curve (config eval_every / eval_tokens) as a plot
            png = heldout_plot(metrics["heldout"])
            partial.write_saved(lambda folder: (folder / PLOT_FILE).write_bytes(png))
        shutil.rmtree(partial.path / CHECKPOINT_DIR, ignore_errors=True)
        return {**{k: v for k, v in metrics.items() if k != "history"}, "eval": evals, "main_process": True}

    announced: list[bool] = []
    try:
        return run_job(out, fingerprint, work, force=force, resume=resume)
    except BaseException as err:
        if dist is not None and not announced:  # refused before training: release the waiting processes
            broadcast_object_list([f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}"])
        raise


def _follow(student: str, teacher: str, config: HealConfig, dev: str, resume: bool) -> dict:
    """A non-main process of a multi-process heal: the same training, its share of each batch, nothing written."""
    told = [None]
    broadcast_object_list(told)
    if str(told[0]).startswith("error: "):
        raise MoeconvError(f"the main process stopped before the heal: {told[0].removeprefix('error: ')}")
    try:
        tokenizer = load_tokenizer(student)
    except CheckpointError:
        tokenizer = load_tokenizer(teacher)
    model, dense = load_model(student, "float32", dev), load_model(teacher, "float32", dev)
    metrics = heal(model, dense, tokenizer, config, Path(told[0]) / CHECKPOINT_DIR, device=dev, resume=resume)
    return {**{k: v for k, v in metrics.items() if k != "history"}, "eval": {}, "main_process": False}
