"""llama.cpp runs the GGUF exports: logits within F32 rounding of moeconv's model, the greedy tokens of transformers, and
`moeconv eval` of a MoE GGUF in llama.cpp equals transformers' perplexity of the checkpoint."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import rel
from test_export_gguf import save_bpe_tokenizer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import build_dense, sample_text
from moeconv.cli.app import app
from moeconv.config import load_recipe
from moeconv.convert import convert
from moeconv.errors import MoeconvError
from moeconv.eval import llamacpp
from moeconv.eval.perplexity import EvalSettings, evaluate_model
from moeconv.export import ExportOptions, check_ids, export, gguf_layout
from moeconv.export.routing import RoutingMap, apply_routing
from moeconv.export.source import open_source
from moeconv.io.load import load_model, load_tokenizer

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not "
                                     "installed (pip install '.[serve]'; make setup installs it): GGUFs not run in llama.cpp")

ROOT = Path(__file__).parents[1]
SOFTMAX_RECIPE = ROOT / "configs" / "dot-moe-softmax.yaml"
GGML_TYPE_F32 = 0  # llama.cpp's default F16 KV cache alone moves these logits by ~8e-5: the checks run an F32 cache
PROMPT = "The king is dead, and the night was long; he that was with him on the hill is not of this house."
GREEDY = 32
# (family, recipe fields, GGUF architecture, stock transformers target)
EXACT = {
    "llama-with-experts": ("llama", {"renormalize": True}, "llama", "mixtral"),
    "qwen2moe": ("qwen2", {"renormalize": False, "shared_neurons": 16}, "qwen2moe", "qwen2_moe"),
    "qwen2moe-from-llama": ("llama", {"renormalize": False, "shared_neurons": 16}, "qwen2moe", "qwen2_moe"),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp-src")
    (root / "calib.txt").write_text(sample_text())
    (root / "eval.txt").write_text(sample_text(6000, seed=3))
    out = {"text": root / "calib.txt", "eval": root / "eval.txt", "root": root}
    for family in ("llama", "qwen2"):
        save_bpe_tokenizer(build_dense(family, root / family, vocab_size=320, intermediate_size=80, initializer_range=0.2))
        out[family] = root / family
    return out


def moe(sources, family: str, name: str, **fields) -> Path:
    """configs/dot-moe-softmax.yaml at 4 experts, top-2 (fields override), converted once per module."""
    out = sources["root"] / name
    if not out.exists():
        recipe = {"experts": 4, "top_k": 2, "calibration": {"source": str(sources["text"]), "tokens": 2048, "seqlen": 64}}
        convert(str(sources[family]), out, load_recipe(SOFTMAX_RECIPE, {**recipe, **fields}))
    return out


def gguf(ckpt: Path, out: Path, qtype: str = "F32") -> tuple[Path, dict]:
    result = export(ckpt, out, "gguf", ExportOptions(tensor_type=qtype))
    return out / "model.gguf", result


def engine(path: Path, logits_all: bool = True):
    import llama_cpp  # optional (extra 'serve'): the tests that run it are skipped without it

    return llama_cpp.Llama(model_path=str(path), logits_all=logits_all, n_threads=1, verbose=False, n_ctx=512,
                           type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)


def llama_logits(path: Path, rows: torch.Tensor) -> torch.Tensor:
    """llama.cpp's logits of each row as one fresh sequence.  rows [B, T] -> [B, T, V]"""
    llm = engine(path)
    out = []
    for row in rows.tolist():
        llm.reset()
        llm.eval(row)
        out.append(torch.from_numpy(np.array(llm.scores[: len(row)])))
    llm.close()
    return torch.stack(out)


def llama_greedy(path: Path, prompt: list[int]) -> list[int]:
    """GREEDY tokens from llama.cpp's own sampler at temperature 0."""
    llm = engine(path, logits_all=False)
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == GREEDY:
            break
    llm.close()
    return out


def hf_greedy(model, prompt: list[int]) -> list[int]:
    """transformers' greedy generation, never stopping at an end-of-sequence token (llama.cpp's loop does not)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=GREEDY, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_logits(model, rows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(rows).logits.float()


def prompt(folder: Path) -> list[int]:
    return load_tokenizer(folder)(PROMPT)["input_ids"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@needs_llama_cpp
def test_dense_gguf_in_llama_cpp_is_the_dense_model(sources, tmp_path, family):
    path, result = gguf(sources[family], tmp_path / "dense")
    assert result["gguf_architecture"] == family
    model = AutoModelForCausalLM.from_pretrained(sources[family], dtype=torch.float32)
    ids = prompt(sources[family])
    got, want = llama_logits(path, torch.tensor([ids])), hf_logits(model, torch.tensor([ids]))
    assert rel(got, want) <= 1e-4, rel(got, want)
    greedy = hf_greedy(model, ids)
    assert len(greedy) == GREEDY and llama_greedy(path, ids) == greedy


@needs_llama_cpp
@pytest.mark.parametrize("case", list(EXACT))
def test_exact_moe_gguf_in_llama_cpp_is_moeconvs_model(sources, tmp_path, case):
    family, fields, arch, hf_target = EXACT[case]
    ckpt = moe(sources, family, case, **fields)
    path, result = gguf(ckpt, tmp_path / "gguf")
    assert (result["gguf_architecture"], result["routing"]) == (arch, "exact")
    ids = prompt(ckpt)
    ours = load_model(ckpt, device="cpu")
    got, want = llama_logits(path, torch.tensor([ids])), hf_logits(ours, torch.tensor([ids]))
    assert torch.isfinite(got).all() and rel(got, want) <= 1e-4, rel(got, want)
    export(ckpt, tmp_path / "hf", hf_target)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(stock).__name__ in ("MixtralForCausalLM", "Qwen2MoeForCausalLM")
    greedy = hf_greedy(stock, ids)
    assert len(greedy) == GREEDY and greedy == hf_greedy(ours, ids) and llama_greedy(path, ids) == greedy


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mapped_weight1_gguf_in_llama_cpp(sources, tmp_path, family):
    """A weight-1 checkpoint: llama.cpp computes the mapped model (F32 rounding) and stays within export's printed bound."""
    shared = {"shared_neurons": 16} if family == "qwen2" else {}
    ckpt = moe(sources, family, f"{family}-weight1", scoring="none", renormalize=False, **shared)
    path, result = gguf(ckpt, tmp_path / "gguf")
    assert result["routing"] == "mapped"
    bound = result["measured"]["logits_rel_error"]
    x = check_ids(open_source(ckpt), 256)[0]  # the check tokens the bound was measured on
    got = llama_logits(path, x)
    model = load_model(ckpt, device="cpu")
    assert 0 < rel(got, hf_logits(model, x)) <= bound * 1.01 + 1e-6, (rel(got, hf_logits(model, x)), bound)
    moe_cfg, normalize = open_source(ckpt).moe, result["gguf_architecture"] == "llama"
    scale = float(moe_cfg["top_k"] if normalize else moe_cfg["num_experts"])
    rmap = RoutingMap("mapped", normalize, scale, {int(i): 2.0**v for i, v in result["measured"]["router_scale_log2"].items()})
    apply_routing(model, moe_cfg, rmap)  # moeconv's model computing what the export computes
    assert rel(got, hf_logits(model, x)) <= 1e-4


@needs_llama_cpp
def test_qwen2moe_shared_gate_is_finite_for_every_token(sources, tmp_path, monkeypatch):
    """llama.cpp computes the shared gate as silu(z)/z: the tiny gate vector keeps z nonzero (a zero one is NaN)."""
    ckpt = moe(sources, "qwen2", "qwen2moe", **EXACT["qwen2moe"][1])
    path, _ = gguf(ckpt, tmp_path / "gguf")
    every = torch.arange(320).reshape(5, 64)  # every token of the vocabulary, in every position of a window
    got = llama_logits(path, every)
    assert torch.isfinite(got).all() and rel(got, hf_logits(load_model(ckpt, device="cpu"), every)) <= 1e-4
    monkeypatch.setattr(gguf_layout, "SHEXP_GATE_SCALE", 0.0)
    zero, _ = gguf(ckpt, tmp_path / "zero-gate")
    assert torch.isnan(llama_logits(zero, every[:1])).any()  # the hazard the scale avoids is real


@needs_llama_cpp
@pytest.mark.parametrize("stride", [None, 24])
def test_llamacpp_perplexity_equals_transformers(sources, tmp_path, stride):
    ckpt = moe(sources, "llama", "llama-with-experts", **EXACT["llama-with-experts"][1])
    path, _ = gguf(ckpt, tmp_path / "moe")
    settings = dict(data=str(sources["eval"]), seqlen=64, stride=stride, max_tokens=600, dag_overhead=False)
    ours = evaluate_model(ckpt, EvalSettings(**settings))
    theirs = evaluate_model(path, EvalSettings(**settings))  # a MoE GGUF: llama.cpp, as transformers cannot load it
    assert theirs.device.startswith("cpu (llama.cpp)") and theirs.perplexity.loss_path == "llama.cpp"
    assert (theirs.tokens_fingerprint, theirs.perplexity.predicted) == (ours.tokens_fingerprint, ours.perplexity.predicted)
    assert abs(theirs.perplexity.ppl / ours.perplexity.ppl - 1) <= 1e-4, (theirs.perplexity.ppl, ours.perplexity.ppl)
    # top-1 from F32 logits that agree within 1e-4: a near-tie may flip, so allow 1% of the predicted tokens
    assert abs(theirs.perplexity.top1_hits - ours.perplexity.top1_hits) <= 0.01 * ours.perplexity.predicted
    assert (theirs.params.total, theirs.params.active, theirs.params.num_experts) == (
        ours.params.total, ours.params.active, ours.params.num_experts)
    dense, _ = gguf(sources["qwen2"], tmp_path / "dense")
    auto = evaluate_model(dense, EvalSettings(**settings))  # a dense GGUF stays in transformers unless asked
    forced = evaluate_model(dense, EvalSettings(**settings, engine="llama.cpp"))
    assert auto.device == "cpu" and forced.device.startswith("cpu (llama.cpp)")
    assert abs(forced.perplexity.ppl / auto.perplexity.ppl - 1) <= 1e-4, (forced.perplexity.ppl, auto.perplexity.ppl)


@needs_llama_cpp
def test_eval_compares_a_moe_gguf_with_its_checkpoint(sources, tmp_path):
    ckpt = moe(sources, "llama", "llama-with-experts", **EXACT["llama-with-experts"][1])
    path, _ = gguf(ckpt, tmp_path / "moe")
    args = ["eval", str(path), "--compare", str(ckpt), "--data", str(sources["eval"]), "--seqlen", "64", "--json", "-"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["comparison"]
    assert abs(rows[1]["ppl_ratio"] - 1) <= 1e-4 and not any("tokenization" in f for f in rows[1]["flags"]), rows
    for bad, message in ((["--engine", "vllm"], "unknown --engine 'vllm'"), (["--engine", "llama.cpp"], "is not one")):
        target = str(ckpt) if "is not one" in message else str(path)
        result = CliRunner().invoke(app, ["eval", target, "--data", str(sources["eval"]), "--seqlen", "64", *bad])
        assert result.exit_code != 0 and message in result.output, result.output


def test_missing_llama_cpp_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(MoeconvError, match=r"pip install '\.\[serve\]'"):
        llamacpp.require_llama_cpp()


def test_make_setup_installs_the_serve_extra_pin():
    """`make setup` installs llama-cpp-python at the version setup.py's serve extra pins."""
    pin = re.search(r'"serve": \["(llama-cpp-python==[^"]+)"\]', (ROOT / "setup.py").read_text())
    assert pin and f"SERVE_SPEC ?= {pin.group(1)}" in (ROOT / "Makefile").read_text()


def test_serve_speed_counts_the_bytes_a_token_reads(sources, tmp_path, monkeypatch):
    """benchmarks/serve_work.py: all non-expert bytes + k/E of the experts (F32: 4 bytes per active parameter)."""
    spec = importlib.util.spec_from_file_location("moeconv_bench_serve_work", ROOT / "benchmarks" / "serve_work.py")
    serve = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, serve)  # dataclasses look their module up there
    # it imports its sibling eval_speed as a script would: benchmarks/ on the path, last (for this test only)
    monkeypatch.setattr(sys, "path", [*sys.path, str(ROOT / "benchmarks")])
    spec.loader.exec_module(serve)
    ckpt = moe(sources, "llama", "llama-with-experts", **EXACT["llama-with-experts"][1])
    path, _ = gguf(ckpt, tmp_path / "moe")
    dense, _ = gguf(sources["llama"], tmp_path / "dense")
    assert serve.bytes_per_token(path) == 4 * llamacpp.gguf_parameters(path).active
    assert serve.bytes_per_token(dense) == 4 * llamacpp.gguf_parameters(dense).total
    assert 0 < serve.active_fraction(path, dense) < 1 and serve.parse_settings("8x4, 16x2") == [(8, 4), (16, 2)]
