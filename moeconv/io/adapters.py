"""Architecture adapters: where each family keeps its FFNs and how to read them, as data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from moeconv.errors import UnsupportedModelError
from moeconv.ffn import DenseFFN

KNOWN_MOE_TYPES = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "dbrx", "jamba", "moeconv"}


@dataclass(frozen=True)
class FamilyAdapter:
    """One decoder family.  Names are relative to the FFN module at `ffn_path`."""

    ffn_path: str  # "model.layers.{i}.mlp"
    activation_keys: tuple[str, ...] = ("hidden_act",)
    gate: str | None = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    fused_gate_up: str | None = None  # phi3: one [2*d_ff, d] matrix, gate rows first
    conv1d: bool = False  # gpt2 stores [in, out]
    bias_key: str | None = None  # config flag saying the FFN linears have biases
    always_bias: bool = False
    d_ff_keys: tuple[str, ...] = ("intermediate_size",)
    ffn_output_added: bool = True  # False: a norm sits between the FFN output and the residual add (olmo2, gemma2/3)

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused_gate_up is not None

    def activation(self, config: PretrainedConfig) -> str:
        for key in self.activation_keys:
            if getattr(config, key, None):
                return getattr(config, key)
        raise UnsupportedModelError(f"config has none of {self.activation_keys}; cannot tell the FFN activation")

    def d_ff(self, config: PretrainedConfig) -> int:
        for key in self.d_ff_keys:
            if getattr(config, key, None):
                return int(getattr(config, key))
        return 4 * int(config.hidden_size)  # gpt2: n_inner=None means 4 * n_embd

    def has_bias(self, config: PretrainedConfig) -> bool:
        return self.always_bias or bool(self.bias_key and getattr(config, self.bias_key, False))

    def ffn_tensor_names(self, layer: int, config: PretrainedConfig) -> list[str]:
        """Every source tensor that belongs to layer `layer`'s FFN."""
        prefix = self.ffn_path.format(i=layer)
        linears = [self.fused_gate_up] if self.fused_gate_up else [n for n in (self.gate, self.up) if n]
        names = [f"{prefix}.{n}.weight" for n in [*linears, self.down]]
        if self.has_bias(config):
            names += [f"{prefix}.{n}.bias" for n in [*linears, self.down]]
        return names

    def read_ffn(self, get, layer: int, config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> DenseFFN:
        """Layer `layer`'s FFN from a tensor getter `get(name) -> Tensor`, in Linear layout."""
        prefix = self.ffn_path.format(i=layer)
        bias = self.has_bias(config)

        def weight(name: str) -> torch.Tensor:
            w = get(f"{prefix}.{name}.weight").to(dtype)
            return w.t().contiguous() if self.conv1d else w

        def maybe_bias(name: str) -> torch.Tensor | None:
            return get(f"{prefix}.{name}.bias").to(dtype) if bias else None

        if self.fused_gate_up:
            gate, up = weight(self.fused_gate_up).chunk(2, dim=0)
            fused_bias = maybe_bias(self.fused_gate_up)
            gate_bias, up_bias = fused_bias.chunk(2) if fused_bias is not None else (None, None)
        else:
            gate = weight(self.gate) if self.gate else None
            up = weight(self.up)
            gate_bias = maybe_bias(self.gate) if self.gate else None
            up_bias = maybe_bias(self.up)
        return DenseFFN(
            up=up.contiguous(),
            down=weight(self.down),
            act=self.activation(config),
            gate=None if gate is None else gate.contiguous(),
            up_bias=up_bias,
            gate_bias=gate_bias,
            down_bias=maybe_bias(self.down),
        )


_LLAMA_LIKE = FamilyAdapter(ffn_path="model.layers.{i}.mlp", bias_key="mlp_bias")
ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "olmo2": FamilyAdapter(ffn_path="model.layers.{i}.mlp", bias_key="mlp_bias", ffn_output_added=False),
    "granite": _LLAMA_LIKE,
    "gemma": FamilyAdapter(ffn_path="model.layers.{i}.mlp", activation_keys=("hidden_activation", "hidden_act")),
    "gemma2": FamilyAdapter(ffn_path="model.layers.{i}.mlp", activation_keys=("hidden_activation", "hidden_act"),
                            ffn_output_added=False),
    "gemma3_text": FamilyAdapter(ffn_path="model.layers.{i}.mlp", activation_keys=("hidden_activation", "hidden_act"),
                                 ffn_output_added=False),
    "phi3": FamilyAdapter(ffn_path="model.layers.{i}.mlp", gate=None, fused_gate_up="gate_up_proj"),
    "gpt2": FamilyAdapter(
        ffn_path="transformer.h.{i}.mlp",
        activation_keys=("activation_function",),
        gate=None,
        up="c_fc",
        down="c_proj",
        conv1d=True,
        always_bias=True,
        d_ff_keys=("n_inner",),
    ),
}


def supports(config: PretrainedConfig, explain: bool = False) -> bool | tuple[bool, str]:
    """Whether moeconv can convert this config; with explain=True also why (not)."""
    model_type = getattr(config, "model_type", None)
    if model_type in KNOWN_MOE_TYPES or getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        ok, why = False, f"'{model_type}' is already a Mixture-of-Experts model; pass its dense source instead"
    elif model_type not in ADAPTERS:
        ok, why = False, f"architecture '{model_type}' is not supported (supported: {', '.join(sorted(ADAPTERS))})"
    elif model_type == "llama" and getattr(config, "pretraining_tp", 1) > 1:
        ok, why = True, "llama (pretraining_tp > 1 only affects training; converted as usual)"
    else:
        ok, why = True, f"'{model_type}': FFN at {ADAPTERS[model_type].ffn_path}"
    return (ok, why) if explain else ok


def adapter_for(config: PretrainedConfig) -> FamilyAdapter:
    ok, why = supports(config, explain=True)
    if not ok:
        raise UnsupportedModelError(why)
    return ADAPTERS[config.model_type]
