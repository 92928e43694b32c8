"""Held-out KL while healing: measured every `eval_every` steps (split over the processes), and its plot."""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
from torch import nn

from moeconv.heal.fast import fast_kl_sums


@torch.no_grad()
def heldout_point(student: nn.Module, teacher: nn.Module, held: torch.Tensor, accelerator, *, fast: bool, lowp: bool,
                  batch: int = 1) -> dict[str, float]:
    """KL(teacher || student) per token and student perplexity on held [N, L]; each process measures every
    num_processes-th window and the sums are added up, so every process returns the same numbers."""
    was_training = student.training
    student.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    mine = held[accelerator.process_index :: accelerator.num_processes]
    for b in range(0, mine.shape[0], batch):
        x = mine[b : b + batch].to(accelerator.device)  # [b, L]
        if fast:
            got = fast_kl_sums(student, teacher, x, lowp)
            kl, ce, n, n_ce = got["kl"], got["ce"], got["n"], got["n_ce"]
        else:
            with accelerator.autocast():
                s = student(input_ids=x, use_cache=False).logits.float()  # [b, L, V]
                t = teacher(input_ids=x, use_cache=False).logits.float()
            s_logp, t_logp = s.log_softmax(-1), t.log_softmax(-1)
            kl = float((t_logp.exp() * (t_logp - s_logp)).sum())
            ce = float(F.cross_entropy(s[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
            n, n_ce = x.numel(), x[:, 1:].numel()
        sums += torch.tensor([kl, ce, n, n_ce], dtype=torch.float64)
    student.train(was_training)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    kl, ce, n, n_ce = sums.tolist()
    return {"kl": kl / n, "ppl": math.exp(ce / n_ce)}


def heldout_plot(points: list[dict]) -> bytes:
    """Held-out KL against optimizer step as a PNG (no date or version inside: the same points give the same bytes)."""
    from matplotlib.figure import Figure  # deferred: matplotlib is only needed when a heal report is written

    fig = Figure(figsize=(5, 3.2), dpi=100)
    ax = fig.add_subplot()
    ax.plot([p["step"] for p in points], [p["kl"] for p in points], marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out KL(teacher || student)")
    ax.set_title("heal: held-out KL")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
