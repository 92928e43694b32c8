"""LayerRunner: layer-by-layer hidden states equal the whole model's, whatever dropout the config declares."""

import pytest
import torch

from conftest import build_dense
from moeconv.calib.capture import LayerRunner
from moeconv.config import load_recipe
from moeconv.convert import convert
from moeconv.io.adapters import adapter_for
from moeconv.io.load import load_model
from moeconv.io.readers import open_checkpoint


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_by_layer_states_equal_the_model_with_dropout_in_the_config(family, tmp_path):
    dropout = {"gpt2": {"resid_pdrop": 0.5, "embd_pdrop": 0.5, "attn_pdrop": 0.5}, "llama": {"attention_dropout": 0.5}}[family]
    src = build_dense(family, tmp_path / family, **dropout)
    reader = open_checkpoint(str(src))
    windows = torch.randint(1, 96, (6, 16), generator=torch.Generator().manual_seed(0))
    runner = LayerRunner(reader, adapter_for(reader.config), windows, batch_size=4)
    with torch.no_grad():
        expected = load_model(src, device="cpu")(input_ids=windows, output_hidden_states=True).hidden_states
    layers = reader.config.num_hidden_layers
    real = [n for n, p in runner.model.named_parameters() if not p.is_meta]
    assert real == [], f"held outside the layer being run (the 8B embedding is 2 GiB in float32): {real}"
    for i in range(layers - 1):  # the last entry of hidden_states has the final norm applied
        runner.run_layer(i, capture=False)
        torch.testing.assert_close(runner.state()["hidden"], expected[i + 1], rtol=1e-5, atol=1e-5)


def test_calibration_never_reads_the_lm_head_of_a_moeconv_checkpoint(tmp_path, monkeypatch):
    """Its base model is the whole model (base_model_prefix ""): the head (2 GiB float32 at 8B) must still stay unread."""
    dense = build_dense("llama", tmp_path / "dense", tie_word_embeddings=False)
    moe = tmp_path / "moe"
    convert(str(dense), moe, load_recipe(None, {"experts": 4, "top_k": 2, "train_router": False, "refit": False,
                                                "partition.method": "random"}))
    reader = open_checkpoint(str(moe))
    read = []
    get = type(reader).get
    monkeypatch.setattr(type(reader), "get", lambda self, name: read.append(name) or get(self, name))
    assert reader.has("lm_head.weight")
    LayerRunner(reader, None, torch.randint(0, 90, (2, 16)), ffn_path=reader.config.moe["ffn_path"])
    assert read == ["model.embed_tokens.weight", "model.norm.weight"]
