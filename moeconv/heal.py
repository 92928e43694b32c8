"""Heal: end-to-end distillation of a student causal LM (MoE or pruned dense) to its dense teacher, resumable, on accelerate."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from moeconv.calib.capture import tokenize_windows
from moeconv.calib.sources import TextSource
from moeconv.errors import CheckpointError, DataError, MoeconvError, RecipeError
from moeconv.io.writer import PartialOutput

log = logging.getLogger(__name__)

# Parameter groups: the router is optimised and clipped on its own (see METHODS.md, "Measured
# pitfall": a straight-through router's gradient reached 1e4-1e8 and starved everything else
# under one global clip). The other three are reported separately and clipped together ("body").
GROUPS = ("router", "ffn", "attention", "other")
BODY = ("ffn", "attention", "other")
STATE_DIR, META_FILE = "state", "heal.json"
SAFE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64, "I32": torch.int32}


class HealConfig(BaseModel):
    """How the student is healed; `heal:` block of a convert recipe, or `moeconv heal` options."""

    model_config = ConfigDict(extra="forbid")

    tokens: int = Field(262144, ge=1, description="training tokens, rounded up to whole optimizer steps")
    seqlen: int = Field(512, ge=8, description="tokens per training window")
    batch: int = Field(8, ge=1, description="windows per optimizer step (over all processes)")
    micro_batch: int = Field(2, ge=1, description="windows per forward; gradients are accumulated up to `batch`")
    lr: float = Field(1e-4, gt=0, description="AdamW peak learning rate of all non-router parameters")
    router_lr: float | None = Field(None, gt=0, description="peak learning rate of the routers (None: same as lr)")
    freeze_router: bool = Field(False, description="keep the routers fixed during the heal")
    straight_through: bool = Field(
        True, description="scoring 'none': give the router a gradient through R + P - stopgrad(P); the forward is unchanged"
    )
    weight_decay: float = Field(1e-4, ge=0, description="AdamW decay of matrices (not of norms, biases or routers)")
    kl_weight: float = Field(2.0, ge=0, description="weight of KL(teacher || student) on the logits")
    ce_weight: float = Field(1.0, ge=0, description="weight of the next-token cross-entropy")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL (scaled back by T^2)")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of steps of linear warmup, then cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of the peak")
    clip: float = Field(1.0, gt=0, description="gradient-norm clip of all non-router parameters together")
    router_clip: float = Field(1.0, gt=0, description="gradient-norm clip of the routers, on their own")
    checkpoint_every: int = Field(50, ge=0, description="optimizer steps between checkpoints (0: only after the last step)")
    log_every: int = Field(1, ge=1, description="optimizer steps averaged into one history entry")
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    seed: int = 0
    source: str = Field("shakespeare", description="training text: built-in corpus, file or folder (never a held-out split)")
    text_field: str = "text"

    def steps(self) -> int:
        return -(-self.tokens // (self.batch * self.seqlen))


def heal_config(data: dict | None, where: str = "recipe heal") -> HealConfig:
    """A HealConfig from a recipe's `heal:` mapping; a bad field is a one-line RecipeError."""
    from moeconv.recipe import first_error  # imported here: moeconv.recipe imports HealConfig from this module

    try:
        return HealConfig.model_validate(data or {})
    except ValidationError as err:
        raise first_error(err, where) from None


@dataclass
class HealEvent:
    """Progress report: `stage` is 'tokenize', 'resume', 'step' or 'checkpoint'."""

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

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def training_windows(tokenizer, source: TextSource, config: HealConfig) -> torch.Tensor:
    """The first steps*batch windows of the source, shuffled by the seed.  -> [steps * batch, seqlen]"""
    windows = config.steps() * config.batch
    stream = tokenize_windows(tokenizer, source, windows * config.seqlen, config.seqlen, purpose="heal",
                              fix="pass more text (--heal-source) or lower --heal-tokens")  # [W, L]
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(config.seed))
    return stream[order]


def vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise MoeconvError(f"{type(model).__name__} has no output embedding; heal needs a causal LM with an lm_head")
    return head.weight.shape[0]


def check_pair(student: nn.Module, teacher: nn.Module, windows: torch.Tensor) -> None:
    """Student and teacher must score the same vocabulary, and the tokens must lie in it."""
    vs, vt = vocab_size(student), vocab_size(teacher)
    if vs != vt:
        raise MoeconvError(f"teacher vocabulary ({vt}) differs from the student's ({vs}); pass the dense model the student was converted from")
    top = int(windows.max())
    if top >= vs:
        raise DataError(f"the tokenizer produced token id {top} but the student's vocabulary has {vs}; pass the student's own tokenizer")


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """(name, parameter) per group; tied parameters appear once."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():  # named_parameters already skips tied duplicates
        parts = name.split(".")
        if "router" in parts:
            groups["router"].append((name, p))
        elif "mlp" in parts or "experts" in parts or "shared" in parts:
            groups["ffn"].append((name, p))
        elif "self_attn" in parts or "attn" in parts or "attention" in parts:
            groups["attention"].append((name, p))
        else:
            groups["other"].append((name, p))
    return groups


def _straight_through_route(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard top-k with weight exactly 1, but d weight / d logits = d softmax: R + P - stopgrad(P)."""
    logits = block.router(x)  # [T, E]
    ids = torch.topk(logits, block.top_k, dim=-1, sorted=True).indices  # [T, k]
    p = logits.float().softmax(-1).gather(1, ids)  # [T, k]
    return ids, ((p - p.detach()) + 1.0).to(logits.dtype)  # exactly 1 in the forward: (p - p) is 0 first


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "router") and hasattr(m, "top_k") and hasattr(m, "route")]


@contextlib.contextmanager
def straight_through_routing(model: nn.Module, enabled: bool):
    """Patch every scoring-'none' MoE block to route straight-through while healing; restore afterwards."""
    patched = [b for b in moe_blocks(model) if enabled and getattr(b, "scoring", None) == "none"]
    for block in patched:
        block.route = types.MethodType(_straight_through_route, block)
    try:
        yield len(patched)
    finally:
        for block in patched:
            del block.route


def lr_factor(step: int, steps: int, config: HealConfig) -> float:
    """Linear warmup over `warmup` of the steps, then cosine from 1 down to min_lr_ratio."""
    warm = int(round(config.warmup * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor,
                 config: HealConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) from logits [B, L, V] and ids [B, L]; KL(teacher || student) per token, scaled by T^2."""
    t = config.temperature
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1)  # [B, L, V]
    t_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)  # [B, L, V]
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * t * t
    ce = F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return config.kl_weight * kl + config.ce_weight * ce, kl, ce


@torch.no_grad()
def distill_metrics(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch: int = 1) -> dict[str, float]:
    """KL(teacher || student) per token, student and teacher perplexity on windows [N, L] (no training)."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    kl_sum = ce_s = ce_t = 0.0
    tokens = preds = 0
    for b in range(0, windows.shape[0], batch):
        x = windows[b : b + batch].to(device)  # [B, L]
        s = student(input_ids=x, use_cache=False).logits.float()  # [B, L, V]
        t = teacher(input_ids=x.to(next(teacher.parameters()).device), use_cache=False).logits.float().to(device)
        s_logp, t_logp = s.log_softmax(-1), t.log_softmax(-1)
        kl_sum += float((t_logp.exp() * (t_logp - s_logp)).sum())
        ce_s += float(F.cross_entropy(s[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        ce_t += float(F.cross_entropy(t[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        tokens += x.numel()
        preds += x[:, 1:].numel()
    student.train(was_training)
    return {"kl": kl_sum / tokens, "ppl": math.exp(ce_s / preds), "teacher_ppl": math.exp(ce_t / preds), "tokens": tokens}


def _fingerprint(student: nn.Module, config: HealConfig, windows: torch.Tensor) -> str:
    # How often to checkpoint does not change the result, so a resume may use another interval.
    blob = json.dumps({"config": config.model_dump(mode="json", exclude={"checkpoint_every"}),
                       "params": [(n, list(p.shape)) for n, p in student.named_parameters()]}, sort_keys=True)
    digest = hashlib.sha256(blob.encode())
    digest.update(windows.numpy().tobytes())
    return digest.hexdigest()[:16]


def _checkpoint_step(checkpoint_dir: Path, fingerprint: str) -> int | None:
    """Step of a usable checkpoint in checkpoint_dir, None if there is none; a foreign one is an error."""
    meta = checkpoint_dir / META_FILE
    if not (meta.is_file() and (checkpoint_dir / STATE_DIR).is_dir()):
        return None
    info = json.loads(meta.read_text())
    if info.get("fingerprint") != fingerprint:
        raise MoeconvError(f"{checkpoint_dir} holds a heal of another student, recipe or text; rerun without --resume to start over")
    return int(info["step"])


def _save_checkpoint(accelerator, checkpoint_dir: Path, fingerprint: str, step: int) -> None:
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
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        meta_tmp = checkpoint_dir / (META_FILE + ".tmp")
        meta_tmp.write_text(json.dumps({"fingerprint": fingerprint, "step": step}))
        os.replace(meta_tmp, checkpoint_dir / META_FILE)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


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
    from accelerate import Accelerator

    from moeconv.calib.sources import load_text

    progress = progress or (lambda event: None)
    if config.micro_batch > config.batch:
        raise RecipeError(f"heal micro_batch {config.micro_batch} exceeds batch {config.batch}; lower micro_batch")
    if config.kl_weight == 0 and config.ce_weight == 0:
        raise RecipeError("heal kl_weight and ce_weight are both 0; give at least one a positive weight")
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    precision = ("no" if cpu else "bf16") if config.mixed_precision == "auto" else config.mixed_precision
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

    fingerprint = _fingerprint(student, config, windows)
    start_step = 0
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        if not resume and accelerator.is_main_process:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        found = _checkpoint_step(checkpoint_dir, fingerprint) if resume else None
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
    start_time = time.perf_counter()
    try:
        with straight_through_routing(student, train_router and config.straight_through) as n_ste:
            for step in range(start_step, steps):
                batch = windows[step * config.batch : (step + 1) * config.batch]
                mine = batch[accelerator.process_index :: accelerator.num_processes].to(accelerator.device)  # [b, L]
                factor = lr_factor(step, steps, config)
                for group in optimizer.param_groups:
                    group["lr"] = group["peak_lr"] * factor
                totals = torch.zeros(3, device=accelerator.device)
                for m, (lo, hi) in enumerate(micro):
                    x = mine[lo:hi]
                    with torch.no_grad(), accelerator.autocast():
                        t_logits = teacher(input_ids=x, use_cache=False).logits  # [b, L, V]
                    sync = m == len(micro) - 1
                    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
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
                # The last step is always saved: a caller killed while writing the result resumes from it.
                if checkpoint_dir is not None and (state.step == steps or (
                        config.checkpoint_every and state.step % config.checkpoint_every == 0)):
                    _save_checkpoint(accelerator, checkpoint_dir, fingerprint, state.step)
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
    }


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


def write_like_student(model: nn.Module, student_dir: Path, partial: PartialOutput) -> int:
    """The healed weights under the student's own tensor names, shards and dtypes; other files copied.  -> tensors written"""
    from safetensors import safe_open

    state = model.state_dict()
    shards = sorted(student_dir.glob("*.safetensors"))
    written = 0
    for shard in shards:
        tensors = {}
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if name not in state:
                    raise CheckpointError(f"{shard.name} holds '{name}' which the loaded student lacks; the student folder is inconsistent")
                dtype = SAFE_DTYPES.get(f.get_slice(name).get_dtype()) or f.get_tensor(name).dtype
                tensors[name] = state[name].detach().to("cpu", dtype)
        partial.write_shard(shard.name, tensors)
        written += len(tensors)
    same = student_dir.resolve() == partial.path.resolve()  # convert heals its own OUT.partial in place
    for f in [] if same else sorted(student_dir.iterdir()):  # config, modeling code, tokenizer, recipe, provenance, index
        if f.is_file() and f.suffix != ".safetensors":
            partial.copy_in(f)
    return written
