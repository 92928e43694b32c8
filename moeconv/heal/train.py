"""The heal loop: accelerate, AdamW per parameter group, warm-up + cosine, group-wise clipping, checkpoints."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from moeconv.calib.capture import tokenize_windows
from moeconv.calib.sources import TextSource, load_text
from moeconv.config import HealConfig
from moeconv.errors import DataError, RecipeError
from moeconv.heal.checkpoint import STATE_DIR, checkpoint_step, fingerprint, save_checkpoint
from moeconv.heal.fast import TeacherCache, batched_experts, fast_distill_loss, plain_head
from moeconv.heal.groups import BODY, GROUPS, moe_blocks, parameter_groups, straight_through_routing
from moeconv.heal.monitor import heldout_point
from moeconv.heal.objective import check_pair, distill_loss, training_windows
from moeconv.schedule import warmup_cosine

log = logging.getLogger(__name__)
# Metrics that differ between an interrupted-and-resumed run and a clean one: reported, never written into OUT.
RUN_SPECIFIC = ("seconds", "resumed_from_step")


@dataclass
class HealEvent:
    """Progress report: `stage` is 'tokenize', 'resume', 'step', 'eval' (held-out KL) or 'checkpoint'."""

    stage: str
    step: int = 0
    steps: int = 0
    metrics: dict = field(default_factory=dict)


HealProgress = Callable[[HealEvent], None]


@dataclass
class _HealState:
    """Step counter and history, saved with the accelerate state so a resumed heal continues its metrics."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    grad_norm_max: dict[str, float] = field(default_factory=lambda: {g: 0.0 for g in (*GROUPS, "body")})
    nonfinite_steps: dict[str, int] = field(default_factory=lambda: {"router": 0, "body": 0})
    heldout: list[dict] = field(default_factory=list)  # {"step", "kl", "ppl"} every eval_every steps

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def lr_factor(step: int, steps: int, config: HealConfig) -> float:
    """Linear warmup over `warmup` of the steps, then cosine from 1 down to min_lr_ratio (schedule cosine), or
    constant until the last `decay` of the steps and a linear decay to min_lr_ratio (schedule wsd)."""
    warmup = int(round(config.warmup * steps))
    if config.schedule == "cosine":
        return warmup_cosine(step, steps, warmup, floor=config.min_lr_ratio)
    if step < warmup:
        return (step + 1) / warmup
    decay = max(1, int(round(config.decay * steps)))
    left = steps - step  # 1 at the last step
    return 1.0 if left > decay else config.min_lr_ratio + (1 - config.min_lr_ratio) * (left - 1) / decay


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below its first native bf16 matmuls (avx512_core_bf16, avx2_vnni_2).
_NO_BF16_ISAS = {"sse41", "avx", "avx2", "avx2_vnni", "avx512_core", "avx512_core_vnni"}


def mixed_precision(config: HealConfig, cpu: bool) -> str:
    """auto: bf16 on CUDA; on a CPU only for the fast engine, and only where oneDNN runs bf16 matmuls natively: the CPU
    has them and ONEDNN_MAX_CPU_ISA (set when the AVX2 path is forced) does not cap oneDNN below them, since emulated
    bf16 is slower than float32."""
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if not cpu:
        return "bf16"
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().lower() in _NO_BF16_ISAS
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() and not capped
    return "bf16" if config.engine == "fast" and native else "no"


def _make_optimizer(groups: dict, config: HealConfig, train_router: bool) -> torch.optim.Optimizer:
    """AdamW groups tagged with their clip group and peak lr; routers and 1-D tensors get no weight decay."""
    param_groups = []
    body = [p for g in BODY for _, p in groups[g] if p.requires_grad]
    decay = [p for p in body if p.ndim >= 2]
    no_decay = [p for p in body if p.ndim < 2]
    for params, wd in ((decay, config.weight_decay), (no_decay, 0.0)):
        if params:
            param_groups.append({"params": params, "weight_decay": wd, "peak_lr": config.lr, "clip_group": "body"})
    if train_router and groups["router"]:
        param_groups.append({"params": [p for _, p in groups["router"]], "weight_decay": 0.0,
                             "peak_lr": config.router_lr or config.lr, "clip_group": "router"})
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def _grad_norm(params: list[nn.Parameter]) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def heal(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    config: HealConfig,
    checkpoint_dir: str | Path | None = None,
    progress: HealProgress | None = None,
    *,
    text: TextSource | None = None,
    windows: torch.Tensor | None = None,
    device: str = "auto",
    resume: bool = True,
) -> dict:
    """Distil `teacher` into `student` in place, under the student's own routing; returns metrics.

    `text` overrides config.source (already loaded); `windows` [steps * batch, seqlen] are token windows used in
    order instead of any text (config.tokens and seqlen must match them). Only parameters that require grad are
    trained (callers freeze the rest), the routers as the config says. With a checkpoint_dir, state is saved every
    config.checkpoint_every steps and, if `resume`, a matching checkpoint found there is continued.
    """


    progress = progress or (lambda event: None)
    if config.micro_batch > config.batch:
        raise RecipeError(f"heal micro_batch {config.micro_batch} exceeds batch {config.batch}; lower micro_batch")
    if config.kl_weight == 0 and config.ce_weight == 0:
        raise RecipeError("heal kl_weight and ce_weight are both 0; give at least one a positive weight")
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    precision = mixed_precision(config, cpu)
    fast = config.engine == "fast"
    AcceleratorState._reset_state()  # precision is per heal, not per process (the process group, if any, is kept)
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision)
    if config.batch % accelerator.num_processes:
        raise RecipeError(f"heal batch {config.batch} is not divisible by the {accelerator.num_processes} processes; change batch")

    progress(HealEvent("tokenize"))
    source = None
    if windows is None:
        source = text if text is not None else load_text(config.source, config.text_field)
        windows = training_windows(tokenizer, source, config)  # [W, L]
    elif tuple(windows.shape) != (config.steps() * config.batch, config.seqlen):
        raise DataError(f"heal got {list(windows.shape)} windows but its config asks for "
                        f"[{config.steps() * config.batch}, {config.seqlen}]; pass whole batches of seqlen tokens")
    check_pair(student, teacher, windows)
    steps = config.steps()
    # The chunked loss reads the final hidden states; a family that scales or soft-caps its logits after the
    # output embedding (granite, gemma2) gets the full-logit objective, still with the batched experts.
    chunked = fast and plain_head(student, windows) and plain_head(teacher, windows)
    held = None
    if config.eval_every and config.eval_tokens:
        held = tokenize_windows(tokenizer, load_text(config.eval_source, config.text_field), config.eval_tokens, config.seqlen,
                                purpose="heal held-out", fix="pass more text (eval_source) or lower eval_tokens")

    groups = parameter_groups(student)
    has_router_grad = any(getattr(b, "scoring", "none") != "none" for b in moe_blocks(student)) or config.straight_through
    train_router = bool(groups["router"]) and not config.freeze_router and has_router_grad
    for _, p in groups["router"]:
        p.requires_grad_(train_router)  # a router without gradient must not be a DDP parameter
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval().to(accelerator.device)
    optimizer = _make_optimizer(groups, config, train_router)
    student.train()
    model, optimizer = accelerator.prepare(student, optimizer)
    state = _HealState()
    accelerator.register_for_checkpointing(state)

    run_id = fingerprint(student, config, windows)
    start_step = 0
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        if not resume and accelerator.is_main_process:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        found = checkpoint_step(checkpoint_dir, run_id) if resume else None
        if found is not None:
            accelerator.load_state(str(checkpoint_dir / STATE_DIR))
            start_step = state.step
            progress(HealEvent("resume", start_step, steps))
            log.info("heal resumes at step %d of %d from %s", start_step, steps, checkpoint_dir)

    params = {g: [p for _, p in groups[g] if p.requires_grad] for g in GROUPS}
    body_params = [p for g in BODY for p in params[g]]
    micro = [(i, min(i + config.micro_batch, config.batch // accelerator.num_processes))
             for i in range(0, config.batch // accelerator.num_processes, config.micro_batch)]
    window_acc: list[dict] = []
    # Windows come back `epochs` times: their teacher states are computed once (fast engine only).
    cache = TeacherCache(teacher, precision == "bf16") if chunked and config.epochs > 1 else None
    start_time = time.perf_counter()
    try:
        with straight_through_routing(student, train_router and config.straight_through) as n_ste, \
                batched_experts(student) if fast else contextlib.nullcontext():
            if held is not None and start_step == 0:
                _heldout(state, 0, steps, student, teacher, held, accelerator, chunked, precision, progress)
            for step in range(start_step, steps):
                batch = windows[step * config.batch : (step + 1) * config.batch]
                mine = batch[accelerator.process_index :: accelerator.num_processes].to(accelerator.device)  # [b, L]
                factor = lr_factor(step, steps, config)
                for group in optimizer.param_groups:
                    group["lr"] = group["peak_lr"] * factor
                totals = torch.zeros(3, device=accelerator.device)
                for m, (lo, hi) in enumerate(micro):
                    x = mine[lo:hi]
                    if not chunked:  # the chunked loss computes the teacher's final hidden states itself
                        with torch.no_grad(), accelerator.autocast():
                            t_logits = teacher(input_ids=x, use_cache=False).logits  # [b, L, V]
                    sync = m == len(micro) - 1
                    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                        if chunked:
                            loss, kl, ce = fast_distill_loss(student, model, teacher, x, config, precision == "bf16",
                                                             None if cache is None else cache(x))
                        else:
                            s_logits = model(input_ids=x, use_cache=False).logits  # [b, L, V]
                            loss, kl, ce = distill_loss(s_logits, t_logits, x, config)
                        accelerator.backward(loss * (hi - lo) / (mine.shape[0]))
                    totals += torch.stack([loss.detach(), kl.detach(), ce.detach()]) * (hi - lo) / mine.shape[0]
                norms = _clip_groups(accelerator, params, body_params, config, state)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_v, kl_v, ce_v = (float(v) for v in accelerator.reduce(totals, "mean"))
                state.step = step + 1
                window_acc.append({"loss": loss_v, "kl": kl_v, "ce": ce_v, "lr": config.lr * factor, **norms})
                if len(window_acc) == config.log_every or state.step == steps:
                    entry = {k: sum(e[k] for e in window_acc) / len(window_acc) for k in window_acc[0]}
                    state.history.append({"step": state.step, **entry})
                    window_acc = []
                progress(HealEvent("step", state.step, steps, {"loss": loss_v, "kl": kl_v, "ce": ce_v, "grad_norm": norms}))
                if held is not None and (state.step % config.eval_every == 0 or state.step == steps):
                    _heldout(state, state.step, steps, student, teacher, held, accelerator, chunked, precision, progress)
                # The last step is always saved: a caller killed while writing the result resumes from it.
                if checkpoint_dir is not None and (state.step == steps or (
                        config.checkpoint_every and state.step % config.checkpoint_every == 0)):
                    save_checkpoint(accelerator, checkpoint_dir, run_id, state.step)
                    progress(HealEvent("checkpoint", state.step, steps))
    finally:
        student = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        for _, p in groups["router"]:
            p.requires_grad_(True)
        student.eval()
    return {
        "steps": steps, "tokens": steps * config.batch * config.seqlen, "resumed_from_step": start_step,
        "seconds": time.perf_counter() - start_time, "train_router": train_router, "straight_through_blocks": n_ste,
        "final": state.history[-1] if state.history else {}, "grad_norm_max": state.grad_norm_max,
        "nonfinite_steps": state.nonfinite_steps, "history": state.history,
        "config": config.model_dump(mode="json"), "text": source.name if source is not None else "windows", "mixed_precision": precision,
        "heldout": state.heldout,
    }


def _heldout(state: _HealState, step: int, steps: int, student, teacher, held, accelerator, fast: bool, precision: str,
             progress: HealProgress) -> None:
    point = {"step": step, **heldout_point(student, teacher, held, accelerator, fast=fast, lowp=precision == "bf16")}
    state.heldout.append(point)
    progress(HealEvent("eval", step, steps, point))


def _clip_groups(accelerator, params: dict[str, list], body_params: list, config: HealConfig, state: _HealState) -> dict:
    """Record each group's gradient norm, then clip the router and the body separately.

    A group whose norm is not finite has its gradients zeroed for this step (counted in metrics), so
    one exploding path cannot poison the other parameters' update or the optimizer's moments.
    """
    norms = {f"grad_norm_{g}": _grad_norm(params[g]) for g in GROUPS}
    for clip_group, group_params, max_norm in (("router", params["router"], config.router_clip),
                                               ("body", body_params, config.clip)):
        if not group_params:
            continue
        total = float(accelerator.clip_grad_norm_(group_params, max_norm))
        norms[f"grad_norm_{clip_group}"] = total
        if not math.isfinite(total):
            state.nonfinite_steps[clip_group] += 1
            for p in group_params:
                if p.grad is not None:
                    p.grad.zero_()
    for key, value in norms.items():
        g = key.removeprefix("grad_norm_")
        if math.isfinite(value):
            state.grad_norm_max[g] = max(state.grad_norm_max.get(g, 0.0), value)
    return norms
