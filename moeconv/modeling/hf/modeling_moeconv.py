"""MoeconvForCausalLM: the dense source architecture with its FFNs replaced by MoE blocks.

Self-contained (torch + transformers only): copied into every moeconv checkpoint and loaded with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. The dense model class of
the source family is built from `config.base_config`; every FFN named by `config.moe["ffn_path"]`
is swapped for a MoeconvMoeBlock, so all other weights keep their original names.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_moeconv import MoeconvConfig
from .moe_block import MoeconvMoeBlock


def dense_config(config: MoeconvConfig):
    """The source model's config, as transformers knows it."""
    base = dict(config.base_config)
    cfg = AutoConfig.for_model(base.pop("model_type"), **base)
    attn = getattr(config, "_attn_implementation", None)
    if attn:
        cfg._attn_implementation = attn
    return cfg


def hidden_size_of(cfg) -> int:
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return text.hidden_size


def build_moe_blocks(model: nn.Module, config: MoeconvConfig, hidden_size: int) -> None:
    """Replace each converted layer's FFN by a MoE block (plus its extras: DAG, quantized linears)."""
    moe = config.moe
    for i in moe["layers"]:
        block = MoeconvMoeBlock(hidden_size, moe)
        if moe.get("dag"):
            from .dag import DagAggregator

            block.dag = DagAggregator(hidden_size, moe["top_k"], **moe["dag"])
        model.set_submodule(moe["ffn_path"].format(i=i), block)
    if moe.get("quant"):
        from .quant_linear import replace_with_quant_linear

        replace_with_quant_linear(model, moe["quant"])


class MoeconvForCausalLM(PreTrainedModel, GenerationMixin):
    """Delegates forward and generate to the dense family's own causal-LM class."""

    config_class = MoeconvConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: MoeconvConfig):
        super().__init__(config)
        cfg = dense_config(config)
        dtype = torch.get_default_dtype()  # from_pretrained sets it to the dtype the caller asked for
        try:
            dense = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except ValueError:  # the family lacks the requested attention kernel (gemma2 has no sdpa)
            cfg._attn_implementation = "eager"
            dense = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        build_moe_blocks(dense, config, hidden_size_of(cfg))
        # Register the dense model's children as our own so parameter names match the source's.
        for name, child in dense.named_children():
            self.add_module(name, child)
        self._tied_weights_keys = getattr(dense, "_tied_weights_keys", None)
        object.__setattr__(self, "_dense", dense)  # not a submodule: its children already are ours
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self._dense.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self._dense.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self._dense.get_output_embeddings()

    def forward(self, *args, **kwargs):
        return self._dense(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        self._dense.generation_config = self.generation_config
        return self._dense.generate(*args, **kwargs)
