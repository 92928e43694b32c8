"""End-to-end distillation of every DAG aggregator at once: KL(dense teacher || MoE student) on calibration windows."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from moeconv.config import DagEndToEndConfig, HealConfig
from moeconv.errors import DataError
from moeconv.heal import distill_metrics, heal

logger = logging.getLogger(__name__)


def split_windows(windows: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) windows: the held-out ones are the last (at least one; at least one left to train on)."""
    if windows.shape[0] < 2:
        raise DataError(f"end-to-end aggregator distillation needs at least 2 calibration windows, got {windows.shape[0]}; "
                        "pass more --calib-tokens or a shorter --seqlen")
    held = min(windows.shape[0] - 1, max(1, round(windows.shape[0] * fraction)))
    return windows[:-held], windows[-held:]


def training_plan(train: torch.Tensor, config: DagEndToEndConfig, seed: int):
    """(training windows in step order [steps * batch, L], the HealConfig that trains on them): `epochs` shuffled
    passes cut to whole steps; KL only, routers fixed, no decay, warm-up then cosine to 0."""

    batch = min(config.batch, train.shape[0])
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(train.shape[0], generator=generator) for _ in range(config.epochs)])
    order = order[: order.numel() // batch * batch]
    heal_config = HealConfig(
        tokens=order.numel() * train.shape[1], seqlen=train.shape[1], batch=batch,
        micro_batch=min(config.micro_batch, batch), lr=config.lr, freeze_router=True, weight_decay=0.0,
        kl_weight=1.0, ce_weight=0.0, warmup=0.1, min_lr_ratio=0.0, checkpoint_every=0, seed=seed,
    )
    return train[order], heal_config


def aggregator_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if ".dag." in f".{name}"}


def distill_end_to_end(
    student: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    config: DagEndToEndConfig,
    *,
    seed: int = 0,
    device: str = "auto",
    progress: Callable | None = None,
) -> dict:
    """Train the student's aggregators in place to match the teacher's logits on windows [W, L]; returns metrics.

    The last windows are held out: if the held-out KL does not drop, the aggregators are put back as they were
    (kept 0), so this step never makes the model worse on text it did not train on.
    """

    train, held = split_windows(windows, config.holdout_fraction)
    ordered, heal_config = training_plan(train, config, seed)
    trained = aggregator_parameters(student)
    if not trained:
        raise DataError("the model has no DAG aggregator to train; attach one first (moeconv dag)")
    start = {name: p.detach().clone() for name, p in trained.items()}
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    before = distill_metrics(student, teacher, held)
    try:
        for name, p in student.named_parameters():
            p.requires_grad_(name in trained)
        result = heal(student, teacher, None, heal_config, progress=progress, windows=ordered, device=device, resume=False)
    finally:
        for name, p in student.named_parameters():
            p.requires_grad_(flags[name])
    after = distill_metrics(student, teacher, held)
    kept = after["kl"] < before["kl"]
    if not kept:
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(start[name])
    metrics = {
        "kl_before": before["kl"], "kl_after": after["kl"] if kept else before["kl"], "kl_trained": after["kl"],
        "ppl_before": before["ppl"], "ppl_after": after["ppl"] if kept else before["ppl"], "teacher_ppl": before["teacher_ppl"],
        "kept": float(kept), "steps": result["steps"], "train_windows": train.shape[0], "holdout_windows": held.shape[0],
        "epochs": config.epochs, "seconds": result["seconds"], "history": result["history"],
    }
    logger.info("end-to-end aggregator distillation: held-out KL %.4f -> %.4f (%s)", before["kl"], after["kl"],
                "kept" if kept else "discarded")
    return metrics
