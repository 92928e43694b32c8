"""Heal's fast training path: MoE blocks through batched matmuls, the loss from final hidden states in chunks.

While healing, each MoE block's routed_sum / routed_outputs is swapped for one that sorts the (token, slot)
pairs by expert, packs them into an [E, capacity, d] buffer, and runs the experts' stacked weights through
three batched matmuls (autograd through torch.stack reaches every expert's own parameters); the router
always runs in float32, so bf16 autocast does not move a token's expert choice by rounding. The output
embedding is bypassed so the model returns its final hidden states and chunked.chunked_distill computes
the KL and CE a few rows of the vocabulary at a time.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from moeconv.errors import MoeconvError
from moeconv.heal.chunked import chunked_distill, chunked_terms
from moeconv.heal.groups import moe_blocks


def stacked_experts(block: nn.Module) -> dict[str, torch.Tensor | None]:
    """The experts' weights stacked: gate/up [E, s, d], down [E, d, s], biases [E, s] (None where absent)."""
    experts = list(block.experts)

    def stack(get):
        parts = [get(e) for e in experts]
        return None if parts[0] is None else torch.stack(parts)

    return {"gate": stack(lambda e: None if e.gate_proj is None else e.gate_proj.weight),
            "gate_bias": stack(lambda e: None if e.gate_proj is None else e.gate_proj.bias),
            "up": stack(lambda e: e.up_proj.weight), "up_bias": stack(lambda e: e.up_proj.bias),
            "down": stack(lambda e: e.down_proj.weight)}


BUCKETS = 3  # batched-matmul groups per projection: the experts' capacity padding shrinks as groups are added


def capacity_buckets(counts: list[int], buckets: int = BUCKETS) -> list[list[int]]:
    """Experts grouped so that sum(len(group) * max count in group) is least (experts sorted by count, contiguous
    groups; dynamic programming over the E! orders is not needed: an optimal grouping of sorted sizes is contiguous)."""
    order = sorted((e for e in range(len(counts)) if counts[e]), key=lambda e: -counts[e])  # unused experts: no group
    size = [counts[e] for e in order]
    n = len(size)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(buckets + 1)]  # best[b][i]: first i experts in b groups
    cut = [[0] * (n + 1) for _ in range(buckets + 1)]
    best[0][0] = 0
    for b in range(1, buckets + 1):
        for i in range(1, n + 1):
            for j in range(b - 1, i):  # the group is order[j:i], its capacity size[j] (sorted descending)
                cost = best[b - 1][j] + (i - j) * size[j]
                if cost < best[b][i]:
                    best[b][i], cut[b][i] = cost, j
    if n == 0:
        return []
    b = min(range(1, min(buckets, n) + 1), key=lambda k: best[k][n])
    groups, i = [], n
    while i > 0:
        j = cut[b][i]
        groups.append(order[j:i])
        i, b = j, b - 1
    return groups[::-1]


def _slot_outputs(block: nn.Module, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """Each (token, slot)'s weighted expert output, grouped by expert.  -> y [T*k, d], slot [T*k] (y[i] is slot[i]'s)"""
    n_exp, k = block.num_experts, ids.shape[1]
    flat = ids.reshape(-1)  # [T*k]
    order = flat.argsort(stable=True)  # slots grouped by expert, tokens ascending within each
    counts = torch.bincount(flat, minlength=n_exp)  # [E]
    expert = flat[order]
    pos = torch.arange(flat.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]
    w = stacked_experts(block)
    groups = capacity_buckets(counts.tolist())
    rank = torch.zeros(n_exp, dtype=torch.long, device=x.device)
    group_of = torch.full((n_exp,), -1, dtype=torch.long, device=x.device)
    for g, group in enumerate(groups):
        members = torch.tensor(group, device=x.device)
        rank[members], group_of[members] = torch.arange(len(group), device=x.device), g
    ys, slots = [], []
    for g, group in enumerate(groups):  # at most BUCKETS groups of experts, not a loop over experts
        members = torch.tensor(group, device=x.device)
        mine = group_of[expert] == g
        e_rank, e_pos, e_slot = rank[expert[mine]], pos[mine], order[mine]
        buf = x.new_zeros(len(group), int(counts[members].max()), x.shape[1])  # [G, C, d]
        buf[e_rank, e_pos] = x[e_slot // k]
        take = {name: None if t is None else t[members] for name, t in w.items()}
        up = torch.bmm(buf, take["up"].transpose(1, 2))  # [G, C, s]
        if take["up_bias"] is not None:
            up = up + take["up_bias"][:, None]
        if take["gate"] is None:
            h = block.experts[0].act(up)
        else:
            gate = torch.bmm(buf, take["gate"].transpose(1, 2))
            if take["gate_bias"] is not None:
                gate = gate + take["gate_bias"][:, None]
            h = block.experts[0].act(gate) * up
        ys.append(torch.bmm(h, take["down"].transpose(1, 2))[e_rank, e_pos])  # [n_g, d]
        slots.append(e_slot)
    slot = torch.cat(slots)
    return (torch.cat(ys) * weights.reshape(-1)[slot, None]).to(x.dtype), slot


def _routed_sum(block, x, ids, weights):
    y, order = _slot_outputs(block, x, ids, weights)
    return torch.zeros_like(x).index_add(0, order // ids.shape[1], y)


def _routed_outputs(block, x, ids, weights):
    y, order = _slot_outputs(block, x, ids, weights)
    return x.new_zeros(ids.numel(), x.shape[1]).index_copy(0, order, y).view(*ids.shape, x.shape[1])


def _float32_route(route):
    def wrapped(x):
        with torch.autocast(x.device.type, enabled=False):
            return route(x.float())
    return wrapped


@contextlib.contextmanager
def batched_experts(model: nn.Module):
    """Swap every MoE block's expert loop for the batched one (and a float32 router); restore afterwards."""
    saved = []
    for block in moe_blocks(model):
        own = {name: vars(block)[name] for name in ("route", "routed_sum", "routed_outputs") if name in vars(block)}
        saved.append((block, own))
        block.route = _float32_route(block.route)
        block.routed_sum = types.MethodType(_routed_sum, block)
        block.routed_outputs = types.MethodType(_routed_outputs, block)
    try:
        yield len(saved)
    finally:
        for block, own in saved:
            for name in ("route", "routed_sum", "routed_outputs"):
                delattr(block, name)
                if name in own:
                    setattr(block, name, own[name])


@contextlib.contextmanager
def head_bypassed(model: nn.Module):
    """The output embedding returns its input: the model's `.logits` are its final hidden states [B, L, d]."""
    head = model.get_output_embeddings()
    seen: list[torch.Tensor] = []

    def passthrough(h):
        seen.append(h)
        return h

    head.forward = passthrough
    try:
        yield seen
    finally:
        del head.forward


def final_hidden(model: nn.Module, wrapped: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`wrapped`'s (model's, possibly DDP-wrapped) final hidden states [B, L, d] for ids x [B, L]."""
    with head_bypassed(model) as seen:
        out = wrapped(input_ids=x, use_cache=False).logits
    (h,) = seen
    if out.shape != h.shape or not torch.equal(out.detach().float(), h.detach().float()):
        raise MoeconvError(f"{type(model).__name__} transforms its logits after the output embedding (e.g. soft-capping); "
                           "heal it with engine: reference")
    return h


@torch.no_grad()
def plain_head(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether the model's logits are its output embedding's output (no soft-capping or scaling after it)."""
    try:
        final_hidden(model, model, x[:1, : min(8, x.shape[1])].to(next(model.parameters()).device))
    except MoeconvError:
        return False
    return True


def next_token_targets(x: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B*L]: each position's next token, -100 at a window's last position."""
    targets = x.roll(-1, dims=1)
    targets[:, -1] = -100
    return targets.flatten()


def fast_distill_loss(student: nn.Module, wrapped: nn.Module, teacher: nn.Module, x: torch.Tensor, config,
                      lowp: bool, teacher_hidden: torch.Tensor | None = None):
    """(loss, kl, ce) of one micro-batch x [b, L] on the fast path (the blocks already swapped by batched_experts)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=lowp):
        hs = final_hidden(student, wrapped, x)  # [b, L, d]
        if teacher_hidden is None:
            with torch.no_grad():
                teacher_hidden = final_hidden(teacher, teacher, x)
    with torch.autocast(x.device.type, enabled=False):
        return chunked_distill(hs.flatten(0, 1), student.get_output_embeddings(), teacher_hidden.flatten(0, 1),
                               teacher.get_output_embeddings(), next_token_targets(x), config, lowp)


@torch.no_grad()
def fast_kl_sums(student: nn.Module, teacher: nn.Module, x: torch.Tensor, lowp: bool) -> dict:
    """Held-out sums of x [b, L] without logits [b, L, V] (no gradient): {"kl", "ce", "teacher_ce", "n", "n_ce"}."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=lowp):
        hs, ht = final_hidden(student, student, x), final_hidden(teacher, teacher, x.to(next(teacher.parameters()).device))
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    sums, _ = chunked_terms(hs.flatten(0, 1), s_head.weight, getattr(s_head, "bias", None), ht.flatten(0, 1).to(hs.device),
                            t_head.weight.to(hs.device), None if getattr(t_head, "bias", None) is None else t_head.bias.to(hs.device),
                            next_token_targets(x), kl_weight=1.0, ce_weight=1.0, temperature=1.0, lowp=lowp, grad=False)
    return {k: float(v) for k, v in sums.items()}


class TeacherCache:
    """The teacher's final hidden states per training window, for heals that see each window `epochs` times.

    Each window is run through the teacher on its own (batch 1), whether cached or not, so its states do not
    depend on which windows share its micro-batch: a resumed heal (empty cache) computes the same numbers as
    the uninterrupted one. Windows past `budget_bytes` are recomputed each time instead of stored."""

    def __init__(self, teacher: nn.Module, lowp: bool, budget_bytes: int = 2 << 30):
        self.teacher, self.lowp, self.left = teacher, lowp, budget_bytes
        self.states: dict[bytes, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, L] -> the teacher's final hidden states [b, L, d]."""
        out = []
        for row in x:
            key = row.cpu().numpy().tobytes()
            h = self.states.get(key)
            if h is None:
                with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.lowp):
                    h = final_hidden(self.teacher, self.teacher, row[None])[0]
                if h.numel() * h.element_size() <= self.left:
                    self.states[key] = h
                    self.left -= h.numel() * h.element_size()
            out.append(h)
        return torch.stack(out)
