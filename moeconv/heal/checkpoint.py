"""Heal's resumable state: a fingerprint of (student, config, text) and accelerate checkpoints swapped in atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from moeconv.config import HealConfig
from moeconv.errors import MoeconvError
from moeconv.io.files import atomic_write_text

STATE_DIR, META_FILE = "state", "heal.json"
CHECKPOINT_DIR = "heal-state"  # inside OUT.partial: the heal of a convert or heal job, removed when it completes


def fingerprint(student: nn.Module, config: HealConfig, windows: torch.Tensor) -> str:
    # How often to checkpoint does not change the result, so a resume may use another interval.
    blob = json.dumps({"config": config.model_dump(mode="json", exclude={"checkpoint_every"}),
                       "params": [(n, list(p.shape)) for n, p in student.named_parameters()]}, sort_keys=True)
    digest = hashlib.sha256(blob.encode())
    digest.update(windows.numpy().tobytes())
    return digest.hexdigest()[:16]


def checkpoint_step(checkpoint_dir: Path, fingerprint: str) -> int | None:
    """Step of a usable checkpoint in checkpoint_dir, None if there is none; a foreign one is an error."""
    meta = checkpoint_dir / META_FILE
    if not (meta.is_file() and (checkpoint_dir / STATE_DIR).is_dir()):
        return None
    info = json.loads(meta.read_text())
    if info.get("fingerprint") != fingerprint:
        raise MoeconvError(f"{checkpoint_dir} holds a heal of another student, recipe or text; rerun without --resume to start over")
    return int(info["step"])


def save_checkpoint(accelerator, checkpoint_dir: Path, fingerprint: str, step: int) -> None:
    """save_state into a fresh folder, then swap it in, so a crash mid-save keeps the previous checkpoint."""
    tmp, final = checkpoint_dir / (STATE_DIR + ".tmp"), checkpoint_dir / STATE_DIR
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    # Pickled, not safetensors: tied embeddings would be dropped by safetensors and then fail a strict load.
    accelerator.save_state(str(tmp), safe_serialization=False)
    if accelerator.is_main_process:
        old = checkpoint_dir / (STATE_DIR + ".old")
        (checkpoint_dir / META_FILE).unlink(missing_ok=True)  # no meta: no checkpoint, while the folders move
        shutil.rmtree(old, ignore_errors=True)  # left by a run killed while removing it
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        atomic_write_text(checkpoint_dir / META_FILE, json.dumps({"fingerprint": fingerprint, "step": step}))
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
