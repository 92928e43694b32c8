"""DAG-MoE aggregator: gated message passing among a token's k selected experts (torch only, self-contained)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LAYER_NORM_EPS = 1e-5  # F.layer_norm's default, which the method's LN(x_i) means
DIRECT_MAX_NODES = 48  # up to this many (token, slot) nodes the direct form is faster on CPU (measured)


class DagRound(nn.Module):
    """One round of gated all-pairs messages among the k expert nodes of each token.

    z_i = W_down·LN(x_i) + b_down                       [T, k, d] -> [T, k, d_g]
    (g_src, g_tgt, v_src, v_tgt) = W_pair·z + b_pair    one projection d_g -> 4·d_g per node
    m_i = Σ_j σ(g_src,i + g_tgt,j) ⊙ (v_src,i + v_tgt,j)   all pairs, i = j included
    update_i = W_up·m_i                                  W_up starts at zero

    Weights are plain Parameters, not nn.Linear, so that a transformers `_init_weights` pass
    (run when a model is built from its config) cannot overwrite the zero W_up.
    """

    def __init__(self, hidden_size: int, d_g: int):
        super().__init__()
        self.d_g = d_g
        # LayerNorm without affine: its scale and shift would fold into W_down and b_down.
        self.down_weight = nn.Parameter(torch.empty(d_g, hidden_size))
        self.down_bias = nn.Parameter(torch.empty(d_g))
        self.pair_weight = nn.Parameter(torch.empty(4 * d_g, d_g))
        self.pair_bias = nn.Parameter(torch.empty(4 * d_g))
        self.up_weight = nn.Parameter(torch.zeros(hidden_size, d_g))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """nn.Linear's default init (uniform ±1/sqrt(fan_in)) for W_down and W_pair; W_up = 0."""
        for weight, bias in ((self.down_weight, self.down_bias), (self.pair_weight, self.pair_bias)):
            bound = 1.0 / math.sqrt(weight.shape[1])
            for p in (weight, bias):
                noise = torch.rand(p.shape, generator=generator, dtype=torch.float32, device="cpu")
                p.copy_((noise * 2 - 1) * bound)
        self.up_weight.zero_()

    def messages(self, z: torch.Tensor, summed: bool = False) -> torch.Tensor:
        """Aggregated gated message per node from the projected nodes z [T, k, d_g]: [T, k, d_g], or its
        sum over the k nodes [T, d_g] when `summed` (all the last round needs)."""
        g_src, g_tgt, v_src, v_tgt = F.linear(z, self.pair_weight, self.pair_bias).chunk(4, dim=-1)  # 4 x [T, k, d_g]
        gate = torch.sigmoid(g_src.unsqueeze(2) + g_tgt.unsqueeze(1))  # [T, k(i), k(j), d_g]
        # Σ_j gate_ij ⊙ (v_src,i + v_tgt,j) = v_src,i ⊙ Σ_j gate_ij + Σ_j gate_ij ⊙ v_tgt,j.  A broadcast product,
        # not einsum: einsum lowers to T tiny batched matmuls, ~50x slower on CPU.
        if summed:  # Σ_i m_i = Σ_i v_src,i ⊙ Σ_j gate_ij + Σ_j v_tgt,j ⊙ Σ_i gate_ij: no [T, k, k, d_g] product
            return (v_src * gate.sum(2) + v_tgt * gate.sum(1)).sum(1)  # [T, d_g]
        return v_src * gate.sum(2) + (gate * v_tgt.unsqueeze(1)).sum(2)  # [T, k, d_g]


class DagFactors:
    """The aggregator's weights rearranged so that a forward pass never builds a [T, k, d] tensor after
    the first nodes (see DagAggregator.forward_factored).  g = d_g, L = rounds, U_r = W_up of round r.

    project [(2L-1)·g (+ zero rows to a multiple of 8), d]: rows of each round's W_down centred over d
        (LN's mean subtraction folded in: W_down·(v − mean(v)) = W_down_c·v), then (2/d)·U_cᵀ of rounds
        0..L-2 (U_c: U with each column's mean over d removed).
    mixes[r-1] [g + r·g, r·g] for rounds r >= 1: W_down_c,r·[U_0 .. U_r-1] stacked over
        [U_c,0 .. U_c,r-1]ᵀ·[U_c,0 .. U_c,r-1] / d.
    up [d, L·g]: [U_0 .. U_L-1].
    """

    def __init__(self, rounds: list[DagRound], dtype: torch.dtype):
        hidden = rounds[0].up_weight.shape[0]
        work = torch.promote_types(rounds[0].up_weight.dtype, torch.float32)  # bf16 weights: rearrange in float32
        downs = [layer.down_weight.to(work) for layer in rounds]  # [g, d] each
        ups = [layer.up_weight.to(work) for layer in rounds]  # [d, g] each
        downs_c = [w - w.mean(1, keepdim=True) for w in downs]  # [g, d]
        ups_c = [u - u.mean(0, keepdim=True) for u in ups[:-1]]  # [d, g]
        rows = torch.cat(downs_c + [u.T * (2.0 / hidden) for u in ups_c])  # [(2L-1)·g, d]
        # Zero rows up to a multiple of 8: on CPU a GEMM 73 wide runs at half the speed of one 72 or 80 wide.
        pad = torch.zeros(-rows.shape[0] % 8, hidden, dtype=work, device=rows.device)
        self.project = torch.cat([rows, pad]).to(dtype)
        self.mixes = []
        if ups_c:
            early, early_c = torch.cat(ups[:-1], 1), torch.cat(ups_c, 1)  # [d, (L-1)·g]
            gram = early_c.T @ early_c / hidden  # [(L-1)·g, (L-1)·g]
            for r in range(1, len(rounds)):
                width = r * rounds[0].d_g
                self.mixes.append(torch.cat([downs_c[r] @ early[:, :width], gram[:width, :width]]).to(dtype))
        self.up = torch.cat(ups, 1).to(dtype)  # [d, L·g]
        self.down_bias = [layer.down_bias.to(dtype) for layer in rounds]  # [g] each


class DagAggregator(nn.Module):
    """Replaces the plain sum of a MoE layer's k weighted expert outputs by L rounds of DAG mixing.

    Nodes start at x_i⁰ = w_i·E_i(x) (+ x/k when `stabilize`); each round adds W_up·m_i to every
    node; the output is Σ_i x_iᴸ minus the x/k terms, i.e. plain MoE sum + Σ of all updates.
    With W_up = 0 (its initial value) the output equals the plain MoE sum exactly.

    All constructor keyword arguments are JSON values: they are stored in config.json as moe.dag.
    """

    def __init__(self, hidden_size: int, top_k: int, d_g: int = 24, rounds: int = 2, stabilize: bool = True):
        super().__init__()
        if d_g < 1 or rounds < 1 or top_k < 1:
            raise ValueError(f"DagAggregator needs d_g >= 1, rounds >= 1 and top_k >= 1 (got {d_g}, {rounds}, {top_k})")
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.d_g = d_g
        self.stabilize = stabilize
        self.rounds = nn.ModuleList(DagRound(hidden_size, d_g) for _ in range(rounds))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for layer in self.rounds:
            layer.reset_parameters(generator)

    def factors(self, dtype: torch.dtype) -> DagFactors:
        """The rearranged weights; cached while no parameter changes and no gradient is wanted."""
        params = [p for layer in self.rounds for p in layer.parameters()]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return DagFactors(list(self.rounds), dtype)  # rebuilt in the autograd graph
        key = (dtype, tuple((p.data_ptr(), p._version, p.dtype) for p in params))
        cached = self.__dict__.get("_factors")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, DagFactors(list(self.rounds), dtype))
            self.__dict__["_factors"] = cached  # plain attribute: not a buffer, not saved
        return cached[1]

    def forward(self, routed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """routed [T, k, d] (each selected expert's weighted output), x [T, d] (the block input) -> [T, d]"""
        if routed.shape[1:] != (self.top_k, self.hidden_size):
            raise ValueError(
                f"DagAggregator expects routed outputs [T, {self.top_k}, {self.hidden_size}], got {list(routed.shape)}"
            )
        # Few tokens (decoding): time goes to per-op dispatch, and the direct form has fewer ops.
        if routed.shape[0] * self.top_k <= DIRECT_MAX_NODES:
            return self.forward_direct(routed, x)
        return self.forward_factored(routed, x)

    def forward_direct(self, routed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The method as written: each round's nodes [T, k, d] built, layer-normed and projected."""
        out = routed.sum(1)  # [T, d]  the plain MoE output; the rounds only add to it
        nodes = torch.add(routed, x.unsqueeze(1), alpha=1 / self.top_k) if self.stabilize else routed  # [T, k, d]
        last = len(self.rounds) - 1
        for r, layer in enumerate(self.rounds):
            normed = F.layer_norm(nodes, nodes.shape[-1:], eps=LAYER_NORM_EPS)  # [T, k, d]
            z = F.linear(normed, layer.down_weight, layer.down_bias)  # [T, k, g]
            if r < last:
                update = F.linear(layer.messages(z), layer.up_weight)  # [T, k, d]
                nodes = nodes + update
                out = out + update.sum(1)
            else:  # only the sum of the last updates is read, and Σ_i W_up·m_i = W_up·Σ_i m_i
                out = torch.addmm(out, layer.messages(z, summed=True), layer.up_weight.T)  # [T, d]
        return out

    def forward_factored(self, routed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The same function without the round-by-round [T, k, d] nodes (cost linear in d_g·k per pair).

        With n = x⁰ and u_r = W_up,r·m_r, round r's nodes are n + Σ_{q<r} u_q, so W_down,r·LN(·) needs
        only W_down_c,r·n (one GEMM over n for all rounds), W_down_c,r·U_q·m_q ([d_g, d_g] products) and
        the variance ‖c(n) + Σ_q U_c,q·m_q‖²/d = var(n) + 2·Σ_q (U_c,qᵀ·n)·m_q/d + ‖Σ_q U_c,q·m_q‖²/d
        (c: centring over d).
        The output is Σ_i routed_i + [U_0 .. U_L-1]·Σ_i [m_0,i .. m_L-1,i].
        """
        f = self.factors(routed.dtype)
        g, last, z_dtype = self.d_g, len(self.rounds) - 1, routed.dtype
        # The plain MoE output [T, d], which the rounds only add to; slot by slot because a sum over the
        # middle dim of [T, k, d] is ~4x slower on CPU.
        out = routed[:, 0] + routed[:, 1] if self.top_k > 1 else routed[:, 0].clone()  # [T, d]
        for i in range(2, self.top_k):
            out.add_(routed[:, i])
        nodes = torch.add(routed, x.unsqueeze(1), alpha=1 / self.top_k) if self.stabilize else routed  # [T, k, d]
        proj = F.linear(nodes, f.project)  # [T, k, 8·⌈(2L-1)·g / 8⌉]
        stats = torch.promote_types(nodes.dtype, torch.float32)  # bf16 nodes: moments in float32
        mean = nodes.mean(-1, dtype=stats)  # [T, k]
        # var + eps = E[n²] − mean² + eps: one cheap norm pass (torch.var is ~20x slower on CPU); hidden
        # states have |mean| well below their spread, so the cancellation costs nothing measurable in float32.
        norm_sq = torch.linalg.vector_norm(nodes, dim=-1, dtype=stats).square()  # [T, k]
        var = torch.addcmul(norm_sq / self.hidden_size + LAYER_NORM_EPS, mean, mean, value=-1)  # [T, k]
        messages, summed = [], []
        for r, layer in enumerate(self.rounds):
            pre = proj[..., r * g : (r + 1) * g]  # [T, k, g]  W_down_c,r·n
            var_r = var
            if r:
                past = torch.cat(messages, -1) if r > 1 else messages[0]  # [T, k, r·g]
                mixed = F.linear(past, f.mixes[r - 1])  # [T, k, g + r·g]
                pre = pre + mixed[..., :g]
                cross = proj[..., (last + 1) * g : (last + 1 + r) * g]  # [T, k, r·g]  (2/d)·U_cᵀ·n
                var_r = var + ((cross + mixed[..., g:]) * past).sum(-1)  # [T, k]
            # Clamped: a rounding-negative variance must not turn an untrained aggregator's 0·m into NaN.
            scale = var_r.clamp_min(LAYER_NORM_EPS).rsqrt().to(z_dtype).unsqueeze(-1)  # [T, k, 1]  1 / σ
            z = torch.addcmul(f.down_bias[r], pre, scale)  # [T, k, g]
            if r < last:
                messages.append(layer.messages(z))  # [T, k, g]
                summed.append(messages[-1].sum(1))  # [T, g]
            else:
                summed.append(layer.messages(z, summed=True))  # [T, g]
        sums = torch.cat(summed, -1) if len(summed) > 1 else summed[0]  # [T, L·g]
        # in place (out is this call's own tensor); under autocast sums may be bf16 while out is float32
        return out.addmm_(sums.to(out.dtype), f.up.T.to(out.dtype))  # [T, d]

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, top_k={self.top_k}, d_g={self.d_g}, rounds={len(self.rounds)}, stabilize={self.stabilize}"
