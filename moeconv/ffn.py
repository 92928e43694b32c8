"""The dense feed-forward block of one decoder layer, in a family-independent form."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.activations import ACT2FN


@dataclass
class DenseFFN:
    """`y = down(act(gate(x)) * up(x)) + down_bias` (gated) or `down(act(up(x))) + down_bias`.

    Weights use nn.Linear layout ([out, in]) whatever the source family stores.
    """

    up: Tensor  # [d_ff, d]
    down: Tensor  # [d, d_ff]
    act: str  # a transformers ACT2FN key, e.g. "silu", "gelu_pytorch_tanh"
    gate: Tensor | None = None  # [d_ff, d] for gated (SwiGLU/GeGLU) families
    up_bias: Tensor | None = None  # [d_ff]
    gate_bias: Tensor | None = None  # [d_ff]
    down_bias: Tensor | None = None  # [d]  added once, never per expert

    @property
    def d_model(self) -> int:
        return self.up.shape[1]

    @property
    def d_ff(self) -> int:
        return self.up.shape[0]

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def intermediate(self, x: Tensor) -> Tensor:
        """Per-neuron activations h, so that y = h @ down.T + down_bias.  [T, d] -> [T, d_ff]"""
        act = ACT2FN[self.act]
        up = torch.nn.functional.linear(x, self.up, self.up_bias)
        if self.gate is None:
            return act(up)
        return act(torch.nn.functional.linear(x, self.gate, self.gate_bias)) * up

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(self.intermediate(x), self.down, self.down_bias)

    def select(self, neurons: Tensor) -> DenseFFN:
        """The sub-FFN made of the given neurons (no output bias: it belongs to the whole layer)."""

        def rows(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[neurons]

        return DenseFFN(
            up=self.up[neurons],
            down=self.down[:, neurons],
            act=self.act,
            gate=rows(self.gate),
            up_bias=rows(self.up_bias),
            gate_bias=rows(self.gate_bias),
            down_bias=None,
        )

    def to(self, *args, **kwargs) -> DenseFFN:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(*args, **kwargs)

        return DenseFFN(
            up=move(self.up),
            down=move(self.down),
            act=self.act,
            gate=move(self.gate),
            up_bias=move(self.up_bias),
            gate_bias=move(self.gate_bias),
            down_bias=move(self.down_bias),
        )
