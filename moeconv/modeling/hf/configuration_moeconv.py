"""Config of a moeconv checkpoint: the dense source's config plus a `moe` block (self-contained: torch + transformers only)."""

from __future__ import annotations

from transformers import PretrainedConfig


class MoeconvConfig(PretrainedConfig):
    """`base_config` is the dense model's own config (a dict); `moe` describes the MoE layers.

    moe keys: ffn_path ("model.layers.{i}.mlp"), layers (converted layer indices), num_experts,
    top_k, expert_size (neurons per expert), shared_size (always-active neurons), scoring
    ("none" | "softmax" | "sigmoid"), renormalize, activation (ACT2FN key), gated, ffn_bias,
    down_bias, dag (dict or None), quant (dict module-name -> format, or None).
    """

    model_type = "moeconv"

    def __init__(self, base_config: dict | None = None, moe: dict | None = None, **kwargs):
        self.base_config = dict(base_config or {})
        self.moe = dict(moe or {})
        # Generation and weight tying read these off the top-level config.
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "bos_token_id", "eos_token_id", "pad_token_id"):
            if key in self.base_config and key not in kwargs:
                kwargs[key] = self.base_config[key]
        kwargs.setdefault("tie_word_embeddings", self.base_config.get("tie_word_embeddings", False))
        super().__init__(**kwargs)
