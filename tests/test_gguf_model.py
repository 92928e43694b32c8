"""load_model on a dense .gguf: built tensor by tensor from the lazy reader, equal to transformers' whole-model loader."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from test_gguf_reader import ARCH, model_gguf
from transformers import AutoModelForCausalLM

from moeconv.errors import CheckpointError
from moeconv.io.load import load_model


def transformers_gguf(path, dtype: torch.dtype) -> torch.nn.Module:
    with contextlib.redirect_stderr(io.StringIO()):
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True).eval()


def assert_same_model(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    mine, other = ours.state_dict(), theirs.state_dict()
    assert sorted(mine) == sorted(other)
    for name, t in other.items():
        assert mine[name].dtype == t.dtype and torch.equal(mine[name], t), name
    assert not any(p.is_meta for p in ours.parameters()) and not any(b.is_meta for b in ours.buffers())
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


@pytest.mark.parametrize("family", list(ARCH))
def test_each_family_equals_transformers_loader(family, tmp_path):
    path = tmp_path / "model.gguf"
    model_gguf(path, family)
    try:
        theirs = transformers_gguf(path, torch.float32)
    except (RuntimeError, ValueError):  # the tiny qwen3's head_dim is not hidden/heads, which transformers' GGUF config
        with pytest.raises(CheckpointError) as err:  # reading ignores: both refuse the file, ours in one line
            load_model(path, dtype="float32", device="cpu")
        assert "\n" not in str(err.value) and "wrong shape" in str(err.value)
        return
    ours = load_model(path, dtype="float32", device="cpu")
    assert not ours.training
    assert_same_model(ours, theirs)
    if ours.config.tie_word_embeddings:  # the head is the embedding again, not a copy
        assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight


def test_bfloat16_equals_transformers_loader(tmp_path):
    path = tmp_path / "model.gguf"
    model_gguf(path, "qwen2")
    assert_same_model(load_model(path, dtype="bfloat16", device="cpu"), transformers_gguf(path, torch.bfloat16))


def test_a_truncated_gguf_is_one_line(tmp_path):
    path = tmp_path / "model.gguf"
    model_gguf(path, "llama")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        load_model(path, dtype="float32", device="cpu")
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.real_model
def test_real_smollm2_equals_transformers_loader(real_gguf):
    assert_same_model(load_model(real_gguf, dtype="float32", device="cpu"), transformers_gguf(real_gguf, torch.float32))
