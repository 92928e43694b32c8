"""Streaming: converting 32 layers peaks within 1.3x of converting 4 layers of the same width.

(benchmarks/scale.py measures the same at 8B width with the default recipe; this is its quick, calibration-free form.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import build_dense
from moeconv.config import load_quant_recipe, load_recipe
from moeconv.convert import convert
from moeconv.io import readers
from moeconv.io.stream_shard import StreamingShard
from moeconv.jobs import malloc
from moeconv.quantize import quantize

# the child's peak RSS (KiB), read after it exits
PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def _build(folder, layers: int, hidden: int = 512, ffn: int = 2048) -> int:
    """bfloat16 on disk (the 32-layer pair is 0.55 GB, not 1.8 GB in float32); the converter works in float32, so a
    leaked layer still costs 17 MB of RSS."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _peak_gib(src, out) -> float:
    cmd = [sys.executable, "-m", "moeconv.cli.app", "convert", str(src), str(out), "--experts", "8", "--top-k", "2",
           "--no-router-training", "--method", "random", "--no-refit", "--max-shard-size", "200MB", "-q", "--force"]
    result = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.strip().splitlines()[-1]) / 2**20


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    small_bytes, deep_bytes = _build(tmp_path / "dense-4", 4), _build(tmp_path / "dense-32", 32)
    small = _peak_gib(tmp_path / "dense-4", tmp_path / "moe-4")
    shutil.rmtree(tmp_path / "moe-4")  # keep the disk this test needs to the 32-layer pair
    deep = _peak_gib(tmp_path / "dense-32", tmp_path / "moe-32")
    assert deep_bytes > 7 * small_bytes
    assert deep <= 1.3 * small, (small, deep)


@pytest.mark.parametrize("job", ["convert", "quantize"])
def test_embeddings_and_head_are_read_and_written_one_at_a_time(tmp_path, monkeypatch, job):
    """At 8B each is 2 GiB in float32: the writer must never hold two (a GGUF source's conversion peaked at 8.6 GiB,
    quantize held a whole shard)."""
    src = build_dense("llama", tmp_path / "dense", tie_word_embeddings=False)
    events = []
    read, write = readers.CheckpointReader.get, StreamingShard.write
    monkeypatch.setattr(readers.CheckpointReader, "get", lambda self, name: events.append(("read", name)) or read(self, name))
    monkeypatch.setattr(StreamingShard, "write", lambda self, name, t: events.append(("write", name)) or write(self, name, t))
    if job == "convert":
        convert(str(src), tmp_path / "out", load_recipe(None, {"experts": 4, "top_k": 4, "train_router": False, "partition.method": "random", "refit": False}))
    else:
        quantize(str(src), tmp_path / "out", load_quant_recipe(None, {"method": "rtn", "bits": "4", "group_size": 8}))
        layer = [name for kind, name in events if kind == "write" and name.startswith("model.layers.")]
        assert layer == sorted(layer) and any(n.endswith(".qweight") for n in layer)  # layer by layer, packed as they come
    globals_ = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    sequence = [e for e in events if e[1] in globals_]
    assert sorted(sequence[0::2]) == sorted(("read", n) for n in globals_)
    assert sequence[1::2] == [("write", name) for _, name in sequence[0::2]]  # each read is written before the next


def test_jobs_keep_large_buffers_mapped_where_glibc_allows(monkeypatch):
    """run_job fixes glibc's mmap threshold (freed 1-32 MiB tensors otherwise stay in the heap and a layer-by-layer job
    grows); without glibc it changes nothing and says so."""
    if sys.platform.startswith("linux"):
        assert malloc.keep_large_buffers_mapped() is True
        assert malloc.release_freed_memory() is True  # malloc_trim: a layer's freed heap pages go back
    monkeypatch.setattr(malloc.sys, "platform", "darwin")
    assert malloc.keep_large_buffers_mapped() is False
    assert malloc.release_freed_memory() is False


def test_quantize_releases_freed_memory_after_every_layer(tmp_path, monkeypatch):
    """At 8B the heap kept 1.2 GiB of freed pages between layers (1.69 GiB RSS, 0.07 GiB of live tensors)."""
    import moeconv.quantize as quantize_module

    src = build_dense("llama", tmp_path / "dense")
    calls = []
    monkeypatch.setattr(quantize_module, "release_freed_memory", lambda: calls.append(1) or True)
    quantize(str(src), tmp_path / "out", load_quant_recipe(None, {"method": "rtn", "bits": "4", "group_size": 8}))
    assert len(calls) == AutoModelForCausalLM.from_pretrained(src).config.num_hidden_layers
