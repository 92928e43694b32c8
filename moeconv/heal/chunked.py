"""KL(teacher || student) + next-token CE from final hidden states, a few rows of the vocabulary at a time.

The reference objective (objective.distill_loss) takes both models' logits [T, V] and builds several more
[T, V] float32 tensors (log-softmaxes, probabilities, their gradient): at a 128K vocabulary and 1K tokens
that is 0.5 GB each. Here each chunk of `rows` tokens is projected through the output embedding, its loss
and its gradient with respect to the logits are computed at once, and only the gradients of the hidden
states [T, d] and of the head weight [V, d] are kept: at most a handful of [rows, V] float32 tensors exist.
"""

from __future__ import annotations

import torch

# Elements of one [rows, V] float32 chunk: 2^24 (64 MiB) -> 341 rows at V = 49152, 130 rows at V = 128256.
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(vocab: int, elements: int | None = None) -> int:
    return max(1, (elements or CHUNK_ELEMENTS) // vocab)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lowp: bool) -> torch.Tensor:
    """[c, d] x [V, d] -> [c, V]; with lowp the product runs in bf16 (fp32 accumulation) and stays bf16."""
    z = h.to(torch.bfloat16) @ weight.to(torch.bfloat16).T if lowp else h.float() @ weight.float().T
    return z if bias is None else z + bias.to(z.dtype)


def _log_softmax(z: torch.Tensor, t: float) -> torch.Tensor:
    """float32 log_softmax(z / t) of float32 or bf16 logits (bf16 read once, no float32 copy of z)."""
    return z.log_softmax(-1, dtype=torch.float32) if t == 1 else (z.float() / t).log_softmax(-1)


def chunked_terms(hs, weight, bias, ht, t_weight, t_bias, targets, *, kl_weight: float, ce_weight: float,
                  temperature: float, lowp: bool = False, rows: int | None = None, grad: bool = True):
    """Sums of KL and CE over the rows, and (with grad) the gradients of kl_weight*mean KL + ce_weight*mean CE.

    hs, ht [N, d] the student's and teacher's final hidden states; targets [N] the next token of each row
    (-100: none, e.g. a window's last position). KL is averaged over all N rows and scaled by T^2 (as the
    reference), CE over the rows with a target.
    -> ({"kl", "ce", "teacher_ce": sums, "n", "n_ce": row counts}, (grad_hs, grad_weight, grad_bias) or Nones)
    """
    n, vocab = hs.shape[0], weight.shape[0]
    rows = rows or chunk_rows(vocab)
    valid = targets >= 0
    n_ce = int(valid.sum())
    t = temperature
    kl_sum = torch.zeros((), dtype=torch.float64, device=hs.device)
    ce_sum = torch.zeros((), dtype=torch.float64, device=hs.device)
    t_ce_sum = torch.zeros((), dtype=torch.float64, device=hs.device)
    grad_h = torch.empty(hs.shape, dtype=torch.float32, device=hs.device) if grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=hs.device) if grad else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=hs.device) if grad and bias is not None else None
    # lowp: every product over the vocabulary in bf16 (fp32 accumulation), each [V, d] head cast once; measured on
    # one core a float32 product of these shapes costs more than the bf16 one plus the casts of its operands.
    s_weight = weight.to(torch.bfloat16) if lowp else weight
    t_weight = t_weight.to(torch.bfloat16) if lowp else t_weight
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        h = hs[lo:hi]
        zs = _logits(h, s_weight, bias, lowp)  # [c, V]
        with torch.no_grad():
            zt = _logits(ht[lo:hi], t_weight, t_bias, lowp)  # [c, V]
        lt = _log_softmax(zt, t)
        zt_keep = zt if (t != 1 and not grad) else None
        del zt
        ls_t = _log_softmax(zs, t)
        ls = _log_softmax(zs, 1.0) if t != 1 else ls_t  # CE is on the untempered logits
        del zs
        pt = lt.exp()
        kl_sum += (pt * (lt - ls_t)).sum(dtype=torch.float64)
        tgt, ok = targets[lo:hi], valid[lo:hi]
        rows_ok = ok.nonzero().squeeze(1)
        if rows_ok.numel():
            ce_sum -= ls[rows_ok, tgt[rows_ok]].sum(dtype=torch.float64)
            if not grad:  # the teacher's own CE (its perplexity), for measurements
                t_ce_sum -= (lt if t == 1 else _log_softmax(zt_keep, 1.0))[rows_ok, tgt[rows_ok]].sum(dtype=torch.float64)
        del lt
        if not grad:
            continue
        # d(T^2 mean KL)/dz = T (softmax(z/T) - p_t) / N;  d mean CE/dz = (softmax(z) - onehot(target)) / N_ce
        a, b = kl_weight * t / n, (ce_weight / n_ce if n_ce else 0.0)
        if t == 1:
            dz = ls_t.exp_().mul_((a + b * ok.float())[:, None])  # [c, V] in ls_t's storage
        else:
            dz = ls_t.exp_().mul_(a)
            if b:
                dz.add_(ls.exp_().mul_(b * ok.float()[:, None]))
        del ls, ls_t
        dz.sub_(pt.mul_(a))
        del pt
        if b and rows_ok.numel():
            dz[rows_ok, tgt[rows_ok]] -= b
        if lowp:
            dz, h = dz.to(torch.bfloat16), h.to(torch.bfloat16)
        grad_h[lo:hi] = dz @ s_weight  # a bf16 product is widened as it is stored
        grad_w += dz.T @ h
        if grad_b is not None:
            grad_b += dz.sum(0, dtype=torch.float32)
    return {"kl": kl_sum, "ce": ce_sum, "teacher_ce": t_ce_sum, "n": n, "n_ce": n_ce}, (grad_h, grad_w, grad_b)


class ChunkedDistill(torch.autograd.Function):
    """(loss, kl, ce) of the student's hidden states; gradients computed in the forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hs, weight, bias, ht, t_weight, t_bias, targets, kl_weight, ce_weight, temperature, lowp):
        sums, (gh, gw, gb) = chunked_terms(
            hs.detach(), weight.detach(), None if bias is None else bias.detach(), ht, t_weight, t_bias, targets,
            kl_weight=kl_weight, ce_weight=ce_weight, temperature=temperature, lowp=lowp)
        kl = (sums["kl"] / sums["n"] * temperature * temperature).float()
        ce = (sums["ce"] / max(sums["n_ce"], 1)).float()
        ctx.save_for_backward(gh.to(hs.dtype), gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype))
        ctx.mark_non_differentiable(kl, ce)
        return kl_weight * kl + ce_weight * ce, kl, ce

    @staticmethod
    def backward(ctx, g_loss, g_kl, g_ce):
        gh, gw, gb = ctx.saved_tensors
        return gh * g_loss, gw * g_loss, None if gb is None else gb * g_loss, *([None] * 8)


def chunked_distill(hs, head, ht, t_head, targets, config, lowp: bool = False):
    """(loss, kl, ce) as objective.distill_loss, from hidden states hs, ht [N, d], heads (nn.Linear) and targets [N]."""
    return ChunkedDistill.apply(hs, head.weight, getattr(head, "bias", None), ht, t_head.weight, getattr(t_head, "bias", None),
                                targets, config.kl_weight, config.ce_weight, config.temperature, lowp)
