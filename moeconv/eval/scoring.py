"""What every engine's perplexity loop sums per batch of predicted tokens: the NLL and the top-1 hits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def score_tokens(states: Tensor, targets: Tensor, head: nn.Module | None = None, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Summed NLL (float64) and the number of targets that are the logits' argmax (int64), `chunk` rows of logits at a
    time.  states [N, V] logits, or [N, d] hidden states that `head` turns into logits; targets [N].

    Top-1 counts a hit when the target has the largest logit (ties: the lowest token id, torch.argmax's rule), the
    next-token accuracy that "share of performance kept" figures quote.
    """
    nll = torch.zeros((), dtype=torch.float64, device=states.device)
    hits = torch.zeros((), dtype=torch.int64, device=states.device)
    for i in range(0, states.shape[0], chunk):
        logits = (states[i : i + chunk] if head is None else head(states[i : i + chunk])).float()  # [c, V]
        target = targets[i : i + chunk]
        nll += F.cross_entropy(logits, target, reduction="sum").double()
        hits += (logits.argmax(-1) == target).sum()
    return nll, hits
