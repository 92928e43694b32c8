"""What heal minimises and measures: KL to the teacher (+ next-token CE) on windows of text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeconv.calib.capture import tokenize_windows
from moeconv.calib.sources import TextSource
from moeconv.config import HealConfig
from moeconv.errors import DataError, MoeconvError
from moeconv.heal.fast import fast_kl_sums, plain_head


def training_windows(tokenizer, source: TextSource, config: HealConfig) -> torch.Tensor:
    """The windows of every step in order: the first distinct_windows() windows of the source, shuffled by the
    seed once per epoch (epoch e by seed + e; one epoch is the order heal always used).  -> [steps * batch, seqlen]"""
    total, distinct = config.steps() * config.batch, config.distinct_windows()
    purpose = "heal" if config.epochs == 1 else f"heal ({config.epochs} epochs x {distinct} windows)"
    fix = "pass more text (--heal-source) or lower --heal-tokens" + ("" if config.epochs == 1 else " or raise epochs")
    stream = tokenize_windows(tokenizer, source, distinct * config.seqlen, config.seqlen, purpose=purpose, fix=fix)  # [W, L]
    order = torch.cat([torch.randperm(distinct, generator=torch.Generator().manual_seed(config.seed + e))
                       for e in range(config.epochs)])[:total]
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
    """KL(teacher || student) per token, student and teacher perplexity on windows [N, L] (no training).

    Float32; chunked over the vocabulary (no [L, V] logits) where both models' logits are their heads' output."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    chunked = plain_head(student, windows) and plain_head(teacher, windows)
    kl_sum = ce_s = ce_t = 0.0
    tokens = preds = 0
    for b in range(0, windows.shape[0], batch):
        x = windows[b : b + batch].to(device)  # [B, L]
        if chunked:
            got = fast_kl_sums(student, teacher, x, lowp=False)
            kl_sum, ce_s, ce_t = kl_sum + got["kl"], ce_s + got["ce"], ce_t + got["teacher_ce"]
        else:
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
