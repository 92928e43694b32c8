"""calibration.inputs: converted — each layer calibrated on the hidden states of the layers converted before it, and
refit.target: layer — the refit aims at the dense layer's output. Checked against a plain transformers forward."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import build_dense, sample_text, save_char_tokenizer
from moeconv.calib.capture import LayerRunner
from moeconv.config import load_recipe
from moeconv.convert import convert, corrects_gap
from moeconv.errors import RecipeError
from moeconv.io.adapters import ADAPTERS, adapter_for
from moeconv.io.readers import open_checkpoint

SEQ = 16


def _windows(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 96, (n, SEQ), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streams_match_a_model_with_the_layer_replaced(tmp_path, family):
    """After layer 0 is advanced with a changed FFN, layer 1's captured inputs and gap are those of a transformers
    forward of the dense model with layer 0's FFN replaced by the same module."""
    src = build_dense(family, tmp_path / family, num_hidden_layers=3)
    reader = open_checkpoint(str(src))
    adapter = adapter_for(reader.config)
    windows = _windows()
    runner = LayerRunner(reader, adapter, windows, batch_size=2, converted_stream=True)

    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    changed = copy.deepcopy(dense)
    path0 = adapter.ffn_path.format(i=0)
    ffn = changed.get_submodule(path0)
    with torch.no_grad():
        for p in ffn.parameters():
            p.mul_(0.5)
    parent, _, child = path0.rpartition(".")
    x0, gap0 = runner.run_converted(0)
    assert torch.equal(gap0, torch.zeros_like(gap0)), "both streams start from the same embeddings"
    runner.advance_converted(0, copy.deepcopy(ffn))

    inputs: list[torch.Tensor] = []
    hook = changed.get_submodule(adapter.ffn_path.format(i=1)).register_forward_pre_hook(
        lambda _m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        want_dense = dense(windows, output_hidden_states=True).hidden_states
        changed(windows, output_hidden_states=True)
    hook.remove()
    # the converted stream with the dense layer 1: the dense model with only layer 0's FFN changed
    with torch.no_grad():
        want_conv = changed(windows, output_hidden_states=True).hidden_states
    x1, gap1 = runner.run_converted(1)
    torch.testing.assert_close(x1, inputs[0], rtol=1e-5, atol=1e-5)
    want_gap = (want_dense[2] - want_conv[2]).reshape(-1, x1.shape[-1])
    torch.testing.assert_close(gap1, want_gap, rtol=1e-4, atol=1e-5)
    assert gap1.norm() > 1e-3 * want_dense[2].norm(), "halving layer 0's FFN must leave a gap at layer 1"
    assert getattr(changed.get_submodule(parent), child) is ffn  # the reference model was not touched by the runner


def _recipe(inputs: str, target: str = "ffn"):
    return load_recipe(None, {"experts": 4, "top_k": 2, "partition.method": "random", "calibration.source": "CALIB",
                              "calibration.tokens": 512, "calibration.seqlen": 32, "calibration.inputs": inputs,
                              "refit.target": target})


def _convert(src, tmp_path, name: str, inputs: str, target: str = "ffn") -> dict[str, torch.Tensor]:
    text = tmp_path / "calib.txt"
    text.write_text(sample_text())
    recipe = _recipe(inputs, target)
    recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update={"source": str(text)})})
    out = tmp_path / name
    convert(str(src), out, recipe)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def test_converted_inputs_change_only_the_layers_after_the_first(tmp_path):
    """Layer 0 sees the same inputs either way (and a zero gap), so its tensors are identical; later layers see the
    converted layers' outputs and differ. The refit towards the layer output changes them again."""
    src = build_dense("llama", tmp_path / "dense", num_hidden_layers=3)
    save_char_tokenizer(src)
    plain = _convert(src, tmp_path, "plain", "dense")
    conv = _convert(src, tmp_path, "conv", "converted")
    gap = _convert(src, tmp_path, "gap", "converted", "layer")
    for name in plain:
        if ".layers.0." in name or ".layers." not in name:
            assert torch.equal(plain[name], conv[name]) and torch.equal(plain[name], gap[name]), name
    later = [n for n in plain if ".layers.2.mlp.experts." in n and "down_proj" in n]
    assert later and any(not torch.equal(plain[n], conv[n]) for n in later)
    assert any(not torch.equal(conv[n], gap[n]) for n in later)


def test_layer_target_needs_converted_inputs():
    with pytest.raises(RecipeError, match="calibration.inputs: converted"):
        load_recipe(None, {"experts": 4, "top_k": 2, "calibration.inputs": "dense", "refit.target": "layer"})
    assert load_recipe(None, {"calibration.inputs": "dense"}).refit.target == "ffn"  # unset: follows the inputs


def test_gap_is_corrected_only_where_the_ffn_output_is_added_as_is():
    recipe = load_recipe(None, {"experts": 4, "top_k": 2, "calibration.inputs": "converted", "refit.target": "layer"})
    assert corrects_gap(recipe, ADAPTERS["llama"]) and corrects_gap(recipe, ADAPTERS["gpt2"])
    for family in ("olmo2", "gemma2", "gemma3_text"):  # a norm sits between the FFN and the residual add
        assert not corrects_gap(recipe, ADAPTERS[family]), family
    assert not corrects_gap(recipe.model_copy(update={"refit": None}), ADAPTERS["llama"])
