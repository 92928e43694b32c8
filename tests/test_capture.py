"""LayerRunner: layer-by-layer hidden states equal the whole model's, whatever dropout the config declares."""

import pytest
import torch

from conftest import build_dense
from moeconv.calib.capture import LayerRunner
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
