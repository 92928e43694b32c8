"""Fuzzing the loaders: every generated input ends in a one-line MoeconvError or a correct result, never another exception.

Targets: safetensors headers and bytes, model.safetensors.index.json, GGUF headers and tensor-info tables,
config.json fields, recipe YAML. The default suite runs a fixed, derandomized sample of each; the slow suite
(`make test-slow`) runs FUZZ_SCALE times more, over 10,000 inputs in all, and each test prints its count.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeconv.config import load_quant_recipe, load_recipe
from moeconv.errors import MoeconvError
from moeconv.io.readers import open_checkpoint

# (default-suite examples, slow-suite examples) per target; the slow column sums to 10,500
BUDGET = {"safetensors": (60, 3000), "index": (30, 1500), "gguf": (40, 2000), "config": (40, 2000), "recipe": (60, 2000)}
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=12))
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def budget(target: str, slow: bool) -> settings:
    return settings(max_examples=BUDGET[target][1 if slow else 0], deadline=None, derandomize=not slow, database=None,
                    suppress_health_check=list(HealthCheck))


class Tally:
    """Counts the inputs a target saw and how they ended; any exception but MoeconvError fails the test at once."""

    def __init__(self, target: str):
        self.target, self.inputs, self.errors = target, 0, 0

    def run(self, load) -> None:
        self.inputs += 1
        try:
            load()
        except MoeconvError as err:
            assert "\n" not in str(err).strip(), f"a multi-line error: {err}"
            self.errors += 1

    def report(self, capsys) -> None:
        with capsys.disabled():
            print(f"\nfuzz {self.target}: {self.inputs} inputs, {self.errors} one-line MoeconvErrors, "
                  f"{self.inputs - self.errors} loaded, 0 other exceptions")


def _read_everything(folder: Path) -> None:
    reader = open_checkpoint(folder)
    for name in reader.keys():
        reader.get(name)


@pytest.fixture(scope="module")
def tiny(dense_models, tmp_path_factory) -> Path:
    return dense_models["llama"]


def _slow(request) -> bool:
    return request.node.get_closest_marker("slow") is not None


def _folder(tmp_path_factory, tiny: Path, name: str) -> Path:
    folder = tmp_path_factory.mktemp(name)
    shutil.copy(tiny / "config.json", folder / "config.json")
    return folder


# safetensors: an 8-byte header length, a JSON header, then data
HEADER_ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", "f32"]),
    "shape": st.lists(st.integers(-3, 2**40), max_size=4),
    "data_offsets": st.lists(st.integers(-5, 2**40), min_size=0, max_size=3),
})


@st.composite
def safetensors_bytes(draw, valid: bytes):
    kind = draw(st.sampled_from(["header", "flip", "truncate", "length"]))
    if kind == "header":
        names = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight", "x"]
        header = draw(st.dictionaries(st.sampled_from(names) | st.text(max_size=6), HEADER_ENTRY | JSON, max_size=4))
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + draw(st.binary(max_size=256))
    if kind == "flip":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, min(len(data), 600) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + valid[8:]


def test_fuzz_safetensors(tiny, tmp_path_factory, request, capsys):
    folder = _folder(tmp_path_factory, tiny, "st")
    valid = (tiny / "model.safetensors").read_bytes()
    tally = Tally("safetensors")

    @budget("safetensors", _slow(request))
    @given(safetensors_bytes(valid))
    def check(data: bytes) -> None:
        (folder / "model.safetensors").write_bytes(data)
        tally.run(lambda: _read_everything(folder))

    check()
    tally.report(capsys)


def test_fuzz_index_json(tiny, tmp_path_factory, request, capsys):
    folder = _folder(tmp_path_factory, tiny, "index")
    shutil.copy(tiny / "model.safetensors", folder / "part.safetensors")
    names = list(open_checkpoint(tiny).keys())
    shard = st.sampled_from(["part.safetensors", "missing.safetensors", "../part.safetensors", "/etc/passwd", "", "config.json"])
    tally = Tally("index")

    @budget("index", _slow(request))
    @given(st.one_of(JSON, st.fixed_dictionaries({"weight_map": st.dictionaries(st.sampled_from(names) | st.text(max_size=5),
                                                                                 shard | JSON, max_size=len(names))}),
                     st.just({"weight_map": dict.fromkeys(names, "part.safetensors")})))
    def check(index) -> None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        tally.run(lambda: _read_everything(folder))

    check()
    tally.report(capsys)


def _tiny_gguf(path: Path, block_count: int = 2) -> None:
    """A 2-layer llama GGUF (F32) with a byte-level vocabulary, written with the gguf package."""
    import gguf

    d, ff, heads, vocab = 16, 24, 2, 32
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(block_count)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges([])
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,), "output.weight": (vocab, d)}
    for i in range(2):
        tensors.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                        f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (d, d), f"blk.{i}.attn_v.weight": (d, d),
                        f"blk.{i}.attn_output.weight": (d, d), f"blk.{i}.ffn_gate.weight": (ff, d),
                        f"blk.{i}.ffn_up.weight": (ff, d), f"blk.{i}.ffn_down.weight": (d, ff)})
    for name, shape in tensors.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@st.composite
def gguf_bytes(draw, valid: bytes, data_start: int):
    kind = draw(st.sampled_from(["flip", "truncate", "counts"]))
    data = bytearray(valid)
    if kind == "flip":  # anywhere in the header, key-value and tensor-info tables
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, data_start - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    data[8:24] = struct.pack("<QQ", draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)))  # tensor and kv counts
    return bytes(data)


def test_fuzz_gguf(tmp_path_factory, request, capsys):
    import gguf

    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "model.gguf"
    _tiny_gguf(path)
    _read_everything(path)  # the unmutated file loads: the fuzz starts from a valid input
    valid = path.read_bytes()
    data_start = gguf.GGUFReader(str(path)).data_offset
    tally = Tally("gguf")

    @budget("gguf", _slow(request))
    @given(gguf_bytes(valid, data_start))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        tally.run(lambda: _read_everything(path))

    check()
    tally.report(capsys)


def test_gguf_claiming_a_million_layers_fails_fast(tmp_path):
    """Found by the fuzzer: a flipped block count made transformers' name mapping loop for minutes and eat gigabytes."""
    path = tmp_path / "model.gguf"
    _tiny_gguf(path, block_count=1_000_000)
    with pytest.raises(MoeconvError, match="says 1000000 layers, its tensors hold 2"):
        open_checkpoint(path)


CONFIG_FIELDS = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "vocab_size", "model_type", "hidden_act", "rope_scaling", "rope_theta", "tie_word_embeddings",
                 "max_position_embeddings", "rms_norm_eps", "architectures", "torch_dtype", "attention_bias"]


def test_fuzz_config_json(tiny, tmp_path_factory, request, capsys):
    folder = _folder(tmp_path_factory, tiny, "config")
    shutil.copy(tiny / "model.safetensors", folder / "model.safetensors")
    base = json.loads((tiny / "config.json").read_text())
    model_types = st.sampled_from(["llama", "mistral", "qwen2", "gpt2", "bert", "moeconv", "nonsense", ""])
    tally = Tally("config")

    @budget("config", _slow(request))
    @given(st.dictionaries(st.sampled_from(CONFIG_FIELDS), SCALAR | JSON | model_types, max_size=4), st.booleans())
    def check(changes: dict, raw: bool) -> None:
        text = json.dumps({**base, **changes}) if not raw else json.dumps(changes)[: len(changes) * 7]
        (folder / "config.json").write_text(text)
        tally.run(lambda: _read_everything(folder))

    check()
    tally.report(capsys)


RECIPE_KEYS = ["experts", "top_k", "shared_neurons", "scoring", "partition", "router", "calibration", "refit", "dag", "heal",
               "dtype", "max_shard_size", "seed", "train_router", "renormalize", "bits", "group_size", "method", "unknown"]


def test_fuzz_recipe_yaml(tmp_path_factory, request, capsys):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    tally = Tally("recipe")

    @budget("recipe", _slow(request))
    @given(st.one_of(st.dictionaries(st.sampled_from(RECIPE_KEYS), JSON, max_size=5).map(yaml.safe_dump),
                     st.text(max_size=80)))
    def check(text: str) -> None:
        path.write_text(text)
        tally.run(lambda: load_recipe(path, None))
        tally.run(lambda: load_quant_recipe(path, None))

    check()
    tally.report(capsys)


SLOW_TARGETS = [test_fuzz_safetensors, test_fuzz_index_json, test_fuzz_gguf, test_fuzz_config_json, test_fuzz_recipe_yaml]


@pytest.mark.slow
@pytest.mark.parametrize("target", SLOW_TARGETS, ids=lambda f: f.__name__.removeprefix("test_fuzz_"))
def test_fuzz_slow(target, request, tmp_path_factory, capsys, dense_models):
    kwargs = {"tmp_path_factory": tmp_path_factory, "request": request, "capsys": capsys}
    if "tiny" in target.__code__.co_varnames[: target.__code__.co_argcount]:
        kwargs["tiny"] = dense_models["llama"]
    target(**kwargs)
