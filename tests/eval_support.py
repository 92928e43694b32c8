"""Shared by the eval tests: tiny tokenizers, text, a dense llama and its MoE, as module-scoped fixtures."""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from moeconv.modeling.hf.configuration_moeconv import MoeconvConfig
from moeconv.modeling.hf.modeling_moeconv import MoeconvForCausalLM

WORDS = "the king queen sword crown night day love death war peace river stone fire ever never thou thee art hath doth".split()
UNICODE = ["café", "naïve", "—", "Æthelred", "日本", "🙂", "\t", "  "]


def make_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    parts = []
    for i in range(n_words):
        parts.append(rng.choice(WORDS) if rng.random() > 0.05 else rng.choice(UNICODE))
        parts.append("\n\n" if i % 97 == 96 else ("\n" if i % 13 == 12 else ("," if i % 7 == 3 else "") + " "))
    return "".join(parts)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(3000, 1)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """Sentencepiece-like: a prefix '▁' at the start of every text, which chunked tokenization must undo."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"])
    tok.train_from_iterator([make_text(3000, 2)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def tiny_llama(vocab: int, seed: int = 0, tie: bool = False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def moe_from_dense(dense, num_experts: int, top_k: int) -> MoeconvForCausalLM:
    """Split each FFN's neurons into contiguous experts; with top_k == num_experts it is the dense model."""
    d_ff = dense.config.intermediate_size
    moe = dict(ffn_path="model.layers.{i}.mlp", layers=list(range(dense.config.num_hidden_layers)), num_experts=num_experts,
               top_k=top_k, expert_size=d_ff // num_experts, shared_size=0, scoring="none", activation="silu", gated=True)
    model = MoeconvForCausalLM(MoeconvConfig(base_config=dense.config.to_dict(), moe=moe)).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert all(".mlp." in k for k in missing)
    size = d_ff // num_experts
    with torch.no_grad():
        for i, layer in enumerate(dense.model.layers):
            block = model.model.layers[i].mlp
            torch.nn.init.normal_(block.router.weight, std=0.5)
            for e, expert in enumerate(block.experts):
                rows = slice(e * size, (e + 1) * size)
                expert.gate_proj.weight.copy_(layer.mlp.gate_proj.weight[rows])
                expert.up_proj.weight.copy_(layer.mlp.up_proj.weight[rows])
                expert.down_proj.weight.copy_(layer.mlp.down_proj.weight[:, rows])
    return model
