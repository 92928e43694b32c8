"""QuantLinear with the native kernels against its pure-PyTorch path (the same function: the kernels dequantize to the
same float32 weights, tests/test_quant_kernels.py), a quantized checkpoint loaded both ways, the layout version check,
and the fall back to PyTorch when the kernels are not built.

Tolerance: test_quant_kernels.bound (float32 sums in two orders, plus one bf16 step for bf16 outputs); for bfloat16 x
the PyTorch path also rounds each weight to bfloat16 before its GEMM (relative error <= 2^-9 per weight), which adds
2^-9 (|W| |x| + |b|) to the bound. The kernels keep the float32 weights.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_quant_kernels import CPU_ISAS, FIXED_SEED, bound, int_case, log8_buffers, sub1_case, ternary_symbols

import moeconv.modeling.hf.quant_linear as ql
from conftest import build_dense, sample_text, save_char_tokenizer
from moeconv.config import load_quant_recipe
from moeconv.errors import CheckpointError
from moeconv.io.load import load_model
from moeconv.kernels import native, quant_api
from moeconv.modeling.hf.quant_linear import QuantLinear, SharedDictionary, SharedDictionaryLinear
from moeconv.quant.packing import pack_bits
from moeconv.quantize import quantize

NATIVE = pytest.mark.skipif(not CPU_ISAS, reason="moeconv CPU kernels are not built")


def modules() -> dict[str, QuantLinear]:
    """One QuantLinear per stored format and layout, with a bias (awkward shapes, as in test_quant_kernels)."""
    torch.manual_seed(FIXED_SEED)
    found = {}
    for bits in (8, 4, 3, 2):
        for zero_mode, group in (("packed", 64), ("float", 29), ("symmetric", -1)):
            cols = 320 if group == 64 else 203
            buffers, fmt = int_case(37, cols, group, bits, zero_mode)
            found[f"int{bits}-{zero_mode}"] = QuantLinear.from_packed(buffers, fmt, bias=torch.randn(37))
    fmt = {"format": "ternary", "in_features": 203, "out_features": 37, "lo_hi": "log8"}
    found["ternary"] = QuantLinear.from_packed({"qweight": pack_bits(ternary_symbols(37, 203), 2), **log8_buffers(37)}, fmt)
    older = {"format": "ternary", "in_features": 203, "out_features": 37}  # bf16 lo/hi, before log8
    lo_hi = torch.stack([-torch.rand(37), torch.rand(37)], 1).bfloat16()
    found["ternary-bf16"] = QuantLinear.from_packed({"qweight": pack_bits(ternary_symbols(37, 203), 2), "lo_hi": lo_hi}, older)
    for block_rows in (32, None):  # None: the older per-row layout (row_offsets, no block_rows key)
        symbols, codes, offsets, table = sub1_case(37, 203, block_rows or 1)
        fmt = {"format": "sub1", "in_features": 203, "out_features": 37, "lo_hi": "log8", "num_codes": codes.numel(),
               "dictionary_size": table.numel(), "shared_dictionary": False, **({"block_rows": block_rows} if block_rows else {})}
        index = "block_offsets" if block_rows else "row_offsets"
        buffers = {"codes": codes, index: offsets, "dictionary": table, **log8_buffers(37)}
        found[f"sub1-{index}"] = QuantLinear.from_packed(buffers, fmt)
    holder = SharedDictionary(table.numel())
    holder.sub1_dictionary = table
    shared = SharedDictionaryLinear({**fmt, "block_rows": 1}, holder)
    shared.load_state_dict({k: v for k, v in found["sub1-row_offsets"].state_dict().items() if k != "dictionary"}
                           | {"block_offsets": offsets}, strict=False)
    found["sub1-shared"] = shared
    return found


MODULES = modules()


@NATIVE
@pytest.mark.parametrize("name", list(MODULES))
def test_quant_linear_kernels_compute_the_torch_path(name, monkeypatch):
    module = MODULES[name]
    weight = module.dequantize_weight()
    for shape in ((1, module.in_features), (2, 3, module.in_features), (17, module.in_features)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape).to(dtype)
            with torch.no_grad():
                got = module(x)
                with monkeypatch.context() as m:
                    m.setattr(ql, "_native_linear", None)
                    want = module(x)
            assert quant_api.quantized_linear(module, x) is not None, "the kernels must have run"
            bias = None if module.bias is None else module.bias.detach()
            flat = x.reshape(-1, x.shape[-1]).float()
            allowed = bound(flat, weight, bias, want.reshape(flat.shape[0], -1))
            if dtype == torch.bfloat16:
                allowed = allowed + 2.0**-9 * (flat.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.abs()))
            err = (got.double() - want.double()).abs().reshape(allowed.shape)
            assert got.shape == want.shape and got.dtype == want.dtype and bool((err <= allowed).all()), f"{name} {shape} {dtype}"


@NATIVE
def test_kernels_step_aside_where_they_do_not_apply(monkeypatch):
    module = MODULES["int4-packed"]
    x = torch.randn(2, module.in_features)
    assert quant_api.quantized_linear(module, torch.randn(quant_api.MAX_TOKENS + 1, module.in_features)) is None
    assert quant_api.quantized_linear(module, x.double()) is None
    assert quant_api.quantized_linear(module, x.requires_grad_()) is None  # autograd: the torch path
    cast = QuantLinear.from_packed(dict(module.named_buffers()), module.fmt).to(torch.bfloat16)  # scales now bf16
    assert cast.scales.dtype == torch.bfloat16 and quant_api.quantized_linear(cast, x.detach()) is None
    monkeypatch.setattr(native, "cpu_build", lambda: native.NativeBuild(False, "JIT build failed: CalledProcessError"))
    assert quant_api.quantized_linear(module, x.detach()) is None
    with torch.no_grad():
        assert torch.isfinite(module(x.detach())).all()  # still runs: the pure-PyTorch path


def test_a_failed_build_warns_once_in_one_line_and_falls_back(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("MOECONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_stale_prebuilt", lambda module: "no prebuilt library")

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'moeconv_kernels_cpu'\nc++: fatal error: killed\nninja: build stopped")

    monkeypatch.setattr(native, "_jit_load", broken)
    with caplog.at_level(logging.WARNING, logger="moeconv.kernels.native"):
        result = native._load("cpu", "moeconv.kernels._C_missing", "moeconv_C_missing", True, [], False)
    assert not result.loaded and result.how.startswith("JIT build failed")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "using the PyTorch reference" in warnings[0], warnings


def test_a_newer_layout_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"layout version 2 is newer than this code's 1") as info:
        ql.replace_with_quant_linear(torch.nn.Module(), {"layout": ql.LAYOUT_VERSION + 1, "modules": {}})
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("qk")
    src = build_dense("llama", root / "llama", intermediate_size=64)
    save_char_tokenizer(src)
    (root / "calib.txt").write_text(sample_text())
    recipe = load_quant_recipe(None, {"group_size": 8, "bits": "4", "calibration.source": str(root / "calib.txt"),
                                      "calibration.tokens": 256, "calibration.seqlen": 32, "batch_size": 4})
    quantize(str(src), root / "q4", recipe)
    return root / "q4"


@NATIVE
def test_quantized_checkpoint_logits_with_and_without_kernels(quantized, monkeypatch):
    model = load_model(quantized, device="cpu", attn_implementation="eager")
    quantized_modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert quantized_modules and all(type(m).__module__ == ql.__name__ for m in quantized_modules)  # the patched module
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model(ids).logits
        monkeypatch.setattr(ql, "_native_linear", None)
        want = model(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)  # fp32 sums in another order, through a few layers
    config = json.loads((quantized / "config.json").read_text())
    config["moe"]["quant"]["layout"] = ql.LAYOUT_VERSION + 1
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layout version 2 is newer than this code's 1") as info:
        load_model(quantized, device="cpu")
    assert "\n" not in str(info.value)
