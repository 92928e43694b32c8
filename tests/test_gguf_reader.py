"""The lazy GGUF reader: tensor for tensor equal to transformers' whole-model GGUF loader, one tensor's memory at a time."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, load_gguf_checkpoint

from conftest import COMMON, FAMILIES
from moeconv.errors import CheckpointError, UnsupportedModelError
from moeconv.export.gguf_layout import to_interleaved_rope, writable_types
from moeconv.io import gguf_reader
from moeconv.io.readers import GGUFReader, open_checkpoint

T = gguf.GGMLQuantizationType
ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
        "gpt2": "gpt2"}
WIDE = dict(hidden_size=256, intermediate_size=512, head_dim=64, num_hidden_layers=4)  # rows of 256: every block type fits
Spec = dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]  # GGUF name -> (torch-order shape, its float32 values)


def legacy_tensors(path: Path) -> dict[str, torch.Tensor]:
    """What moeconv read before the lazy reader: transformers' whole-model loader, filtered to the model's names."""
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    expected = set(skeleton.state_dict())
    return {k: v for k, v in loaded.items() if k in expected}


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    """conftest's tiny `family`, weights on a 1/256 grid (so that gemma's stored w + 1 gives w back exactly)."""
    config = AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(torch.randn_like(p) * 64) / 256)
    return model


def as_stored(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """The model's tensors as llama.cpp's converter writes them: GGUF names, llama q/k rows in rotary-pair order,
    gemma norms stored as w + 1, gpt2's Conv1D projections as [out, in], no output.weight when tied."""
    c = model.config
    gguf_name = {hf: g for g, hf in gguf_reader.gguf_to_hf_names(model).items()}
    out = {}
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        name, t = gguf_name[hf_name], t.float()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            t = to_interleaved_rope(t, c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads)
        if arch in ("gemma2", "gemma3") and "norm.weight" in name:
            t = t + 1
        if arch == "gpt2" and any(k in name for k in gguf_reader._GPT2_TRANSPOSED):
            t = t.T
        out[name] = t.contiguous()
    return out


def write_gguf(path: Path, arch: str, config, spec: Spec, qtype_of: Callable[[str, tuple], T] = lambda n, s: T.F32) -> None:
    """A GGUF written tensor by tensor (nothing held but the tensor being written): the metadata transformers reads for
    `arch`, a byte-level vocabulary, each tensor in qtype_of(name, shape) (random bytes for a type the gguf package
    cannot quantize)."""
    c = config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(getattr(c, "intermediate_size", None) or 4 * c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    types = {name: qtype_of(name, shape) for name, (shape, _) in spec.items()}
    for name, (shape, _) in spec.items():
        qtype = types[name]
        stored = shape if qtype in (T.F32, T.F16) else tuple(gguf.quant_shape_to_byte_shape(shape, qtype))
        item = {T.F32: np.float32, T.F16: np.float16}.get(qtype, np.uint8)
        w.add_tensor_info(name, stored, np.dtype(item), int(np.prod(stored)) * np.dtype(item).itemsize,
                          raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, (_, values) in spec.items():
        w.write_tensor_data(_encode(values(), types[name], rng))
    w.close()


def _encode(arr: np.ndarray, qtype: T, rng) -> np.ndarray:
    if qtype == T.F32:
        return arr
    if qtype == T.F16:
        return arr.astype(np.float16)
    if qtype.name in writable_types():
        return gguf.quants.quantize(arr, qtype)
    return rng.integers(0, 256, gguf.quant_shape_to_byte_shape(arr.shape, qtype), dtype=np.uint8)


def model_gguf(path: Path, family: str, qtype_of=lambda n, s: T.F32, **overrides) -> torch.nn.Module:
    if family.startswith("gemma"):  # llama.cpp's gemma architectures have no output.weight: always tied
        overrides = {"tie_word_embeddings": True, **overrides}
    model = tiny_model(family, **overrides)
    stored = as_stored(model, ARCH[family])
    write_gguf(path, ARCH[family], model.config, {n: (tuple(t.shape), t.numpy) for n, t in stored.items()}, qtype_of)
    return model


def assert_same(reader: GGUFReader, legacy: dict[str, torch.Tensor]) -> None:
    """Same names in the same order, same shapes, same bits (NaN included: random blocks may decode to one)."""
    assert reader.keys() == list(legacy)
    for name, old in legacy.items():
        new = reader._read(name)
        assert reader.shape(name) == tuple(old.shape) == tuple(new.shape), name
        assert new.dtype == old.dtype == torch.float32, name
        assert torch.equal(new.contiguous().view(torch.int32), old.contiguous().view(torch.int32)), name


@pytest.mark.parametrize("family", list(ARCH))
def test_each_family_equals_transformers_and_gives_the_weights_back(family, tmp_path):
    """llama (q/k rotary rows), qwen2 (biases), qwen3 (q/k norms), gemma2/3 (norms stored + 1), phi3 (fused qkv and
    gate_up), gpt2 (transposed projections, lm_head): every tensor equals transformers' loader and the source weights."""
    path = tmp_path / "model.gguf"
    model = model_gguf(path, family)
    reader = GGUFReader(path)
    assert_same(reader, legacy_tensors(path))
    source = model.state_dict()
    expected = [k for k in source if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    assert sorted(reader.keys()) == sorted(expected)
    for name in reader.keys():
        assert torch.equal(reader.get(name), source[name].float()), name


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random blocks decode to NaN here and there
def test_every_type_the_gguf_package_dequantizes_equals_transformers(tmp_path, monkeypatch):
    """One file holding every dequantizable type (round robin over the weights), read in chunks of 3 rows so that every
    tensor crosses chunk boundaries: bit for bit what transformers' loader gives."""
    monkeypatch.setattr(gguf_reader, "CHUNK_BYTES", 3 * 4 * 256)
    types = [T[name] for name in gguf_reader.dequantizable_types()]
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "IQ4_XS"} <= {t.name for t in types}
    order: dict[str, T] = {}

    def round_robin(name: str, shape: tuple) -> T:
        if len(shape) < 2:
            return T.F32
        order[name] = types[len(order) % len(types)]
        return order[name]

    path = tmp_path / "model.gguf"
    model_gguf(path, "llama", round_robin, **WIDE)
    assert set(order.values()) == set(types)  # every type is in the file
    assert_same(GGUFReader(path), legacy_tensors(path))


def test_qwen2_q8_0_with_biases(tmp_path):
    """A qwen2-family GGUF at Q8_0 (biases and norms F32, as llama.cpp writes them): equal to transformers' loader, the
    biases exact, the weights within Q8_0's error."""
    path = tmp_path / "model.gguf"
    model = model_gguf(path, "qwen2", lambda n, s: T.Q8_0 if len(s) == 2 else T.F32, **WIDE)
    reader = open_checkpoint(path)
    assert_same(reader, legacy_tensors(path))
    source = model.state_dict()
    biases = [k for k in reader.keys() if k.endswith(".bias")]
    assert len(biases) == 3 * WIDE["num_hidden_layers"]
    for name in reader.keys():
        if name.endswith(".bias"):
            assert torch.equal(reader.get(name), source[name])
        else:
            assert torch.allclose(reader.get(name), source[name], atol=0.02), name


@pytest.mark.parametrize("qtype", [T.Q8_1, T.F64, T.I32])
def test_a_type_the_package_cannot_dequantize_is_named_in_one_line(qtype, tmp_path):
    path = tmp_path / "model.gguf"
    model_gguf(path, "llama", lambda n, s: qtype if n == "blk.1.ffn_up.weight" else T.F32, **WIDE)
    with pytest.raises(CheckpointError, match=f"'blk.1.ffn_up.weight' is stored as {qtype.name}, which the gguf package") as err:
        open_checkpoint(path)
    assert "\n" not in str(err.value) and "Q8_0" in str(err.value)


def test_a_file_truncated_after_opening_fails_on_reading(tmp_path):
    path = tmp_path / "model.gguf"
    model_gguf(path, "llama")
    reader = open_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])
    last = reader.keys()[-1]
    with pytest.raises(CheckpointError, match="ends inside tensor .*; the file is truncated"):
        reader.get(last)


def test_every_tensor_processor_of_transformers_is_mirrored_or_refused():
    """A processor transformers adds for a new architecture fails here until this reader mirrors or refuses it."""
    assert gguf_reader.MIRRORED | gguf_reader.REFUSED == set(TENSOR_PROCESSORS)
    assert not gguf_reader.MIRRORED & gguf_reader.REFUSED


def test_a_moe_gguf_is_refused_as_unsupported_in_one_line(tmp_path):
    path = tmp_path / "moe.gguf"
    config = tiny_model("qwen2").config
    write_gguf(path, "qwen2moe", config, {"token_embd.weight": ((96, 32), lambda: np.ones((96, 32), np.float32))})
    with pytest.raises(UnsupportedModelError, match="'qwen2moe' GGUF: moeconv converts dense decoder LMs"):
        open_checkpoint(path)


PEAK = """
import resource, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[3])
from test_gguf_reader import legacy_tensors
from moeconv.io.readers import open_checkpoint

def read_all(path, how):
    if how == "legacy":
        return len(legacy_tensors(path))
    reader = open_checkpoint(path)
    return sum(reader.get(name).numel() for name in reader.keys())

def high_water_mark() -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM"))


read_all(Path(sys.argv[2]), sys.argv[1])  # imports and first-use allocations, on a small file
resident = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()  # now, not the peak so far
Path("/proc/self/clear_refs").write_text("5")  # reset the peak to what is resident: an earlier, transient peak must not count
read_all(Path(sys.argv[4]), sys.argv[1])
print(high_water_mark() - resident)  # the peak while reading the big file, over what was resident before
"""


def test_reading_tensor_by_tensor_keeps_memory_far_below_the_model(tmp_path):
    """An 8-layer, 412 MB float32 GGUF read whole by the reader (in a fresh process): the peak grows by less than a
    quarter of the model (it holds one tensor), where transformers' loader grew by the whole model."""
    config = AutoConfig.for_model("llama", **{**COMMON, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
                                              "num_attention_heads": 16, "num_key_value_heads": 16, "tie_word_embeddings": True})
    with torch.device("meta"):
        names = as_stored(AutoModelForCausalLM.from_config(config), "llama")
    rng = np.random.default_rng(0)
    spec = {n: (tuple(t.shape), lambda s=tuple(t.shape): rng.standard_normal(s, dtype=np.float32)) for n, t in names.items()}
    big, small = tmp_path / "big" / "model.gguf", tmp_path / "small" / "model.gguf"
    big.parent.mkdir(), small.parent.mkdir()
    write_gguf(big, "llama", config, spec)
    model_gguf(small, "llama")
    size = sum(int(np.prod(s)) * 4 for s, _ in spec.values())
    assert size > 400e6

    def growth(how: str) -> int:
        cmd = [sys.executable, "-c", PEAK, how, str(small), str(Path(__file__).parent), str(big)]
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout.split()[-1])

    lazy = growth("lazy")
    print(f"peak RSS growth reading a {size / 1e6:.0f} MB float32 GGUF: lazy reader {lazy / 1e6:.0f} MB", end="")
    assert lazy < size / 4
    legacy = growth("legacy")  # the measurement sees a whole-model read: this test can fail
    print(f", transformers' loader {legacy / 1e6:.0f} MB")
    assert legacy > 0.9 * size


@pytest.mark.real_model
def test_real_smollm2_q4_1_equals_transformers(real_gguf):
    reader = open_checkpoint(real_gguf)
    legacy = legacy_tensors(real_gguf)
    assert len(legacy) == 272
    assert_same(reader, legacy)
