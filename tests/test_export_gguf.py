"""export --to gguf: names, shapes, keys and types llama.cpp reads; logits checked by loading the file back."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_export import one_line_error, rel
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from conftest import build_dense, sample_text, save_char_tokenizer
from moeconv.config import load_recipe
from moeconv.convert import convert
from moeconv.export import ExportOptions, check_ids, export
from moeconv.export.gguf_layout import to_interleaved_rope
from moeconv.export.source import open_source
from moeconv.io.load import load_model

VOCAB = 320


def save_bpe_tokenizer(folder) -> None:
    """A byte-level BPE tokenizer (ids < 300) trained offline on the sample text, with a chat template."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([sample_text()], vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-src")
    (root / "calib.txt").write_text(sample_text())
    out = {"text": root / "calib.txt"}
    for family in ("llama", "qwen2"):
        save_bpe_tokenizer(build_dense(family, root / family, vocab_size=VOCAB, intermediate_size=80))
        out[family] = root / family
    return out


def moe(sources, family: str, out, **recipe):
    fields = {"experts": 4, "top_k": 2, "train_router": False, "partition.method": "random",
              "calibration": {"source": str(sources["text"]), "tokens": 1024, "seqlen": 64}, **recipe}
    convert(str(sources[family]), out, load_recipe(None, fields))  # the refit runs: it also captures for shared neurons
    return out


def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).logits


def from_gguf(folder, config=None):
    """transformers' own GGUF loader (dequantizes; un-permutes llama's q/k itself)."""
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", config=config, dtype=torch.float32)


def read_gguf(folder):
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(folder / "model.gguf"))
    tensors = {t.name: (t.tensor_type.name, torch.from_numpy(np.array(dequantize(t.data, t.tensor_type)))) for t in reader.tensors}
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return fields, tensors


def llama_moe_as_mixtral(folder, mixtral_export, rebuilt):
    """Rebuild a Mixtral checkpoint from a llama-with-experts GGUF (undoing the q/k interleave) and load it."""
    fields, tensors = read_gguf(folder)
    heads, kv = fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]
    state = {"model.embed_tokens.weight": tensors["token_embd.weight"][1], "model.norm.weight": tensors["output_norm.weight"][1]}
    if "output.weight" in tensors:
        state["lm_head.weight"] = tensors["output.weight"][1]
    for i in range(fields["llama.block_count"]):
        layer, t = f"model.layers.{i}", lambda n, i=i: tensors[f"blk.{i}.{n}"][1]
        unpermute = {"q": heads, "k": kv}
        for p in "qkv":
            w = t(f"attn_{p}.weight")
            if p in unpermute:  # the interleave is its own inverse's transpose: apply the inverse reshape
                h = unpermute[p]
                w = w.reshape(h, w.shape[0] // h // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
            state[f"{layer}.self_attn.{p}_proj.weight"] = w
        state[f"{layer}.self_attn.o_proj.weight"] = t("attn_output.weight")
        state[f"{layer}.input_layernorm.weight"] = t("attn_norm.weight")
        state[f"{layer}.post_attention_layernorm.weight"] = t("ffn_norm.weight")
        state[f"{layer}.block_sparse_moe.gate.weight"] = t("ffn_gate_inp.weight")
        for e in range(fields["llama.expert_count"]):
            for w, name in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                state[f"{layer}.block_sparse_moe.experts.{e}.{w}.weight"] = t(f"{name}.weight")[e]
    rebuilt.mkdir()
    shutil.copy(mixtral_export / "config.json", rebuilt / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, str(rebuilt / "model.safetensors"), metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(rebuilt, dtype=torch.float32)


def test_interleave_round_trip():
    w = torch.randn(2 * 8, 5)
    inter = to_interleaved_rope(w, 2)
    back = inter.reshape(2, 4, 2, 5).transpose(1, 2).reshape(w.shape)
    assert torch.equal(back, w) and not torch.equal(inter, w)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dense_gguf_is_the_dense_model(sources, tmp_path, family):
    result = export(sources[family], tmp_path / "gguf", "gguf")
    assert result["routing"] == "dense" and result["gguf_architecture"] == ("qwen2" if family == "qwen2" else "llama")
    got = logits(from_gguf(tmp_path / "gguf"), ids())
    want = logits(AutoModelForCausalLM.from_pretrained(sources[family], dtype=torch.float32), ids())
    assert rel(got, want) < 1e-5


def test_qwen2moe_gguf_loads_in_transformers_and_matches(sources, tmp_path):
    exact = moe(sources, "qwen2", tmp_path / "exact", scoring="softmax", renormalize=False, shared_neurons=16)
    mapped = moe(sources, "qwen2", tmp_path / "mapped", shared_neurons=16)
    for ckpt in (exact, mapped):
        result = export(ckpt, tmp_path / f"{ckpt.name}-gguf", "gguf")
        assert result["gguf_architecture"] == "qwen2moe"
        export(ckpt, tmp_path / f"{ckpt.name}-hf", "qwen2_moe")
        # transformers' GGUF config reader does not map expert sizes for qwen2moe: take the config from the HF export,
        # with llama.cpp's qwen2moe routing (no top-k renormalization; the HF export of a weight-1 checkpoint has it)
        config = AutoConfig.from_pretrained(tmp_path / f"{ckpt.name}-hf")
        config.norm_topk_prob = False
        model = from_gguf(tmp_path / f"{ckpt.name}-gguf", config)
        x = check_ids(open_source(ckpt), 256)[0] if ckpt is mapped else ids()
        got, want = logits(model, x), logits(load_model(ckpt, device="cpu"), x)
        if ckpt is exact:
            assert result["routing"] == "exact" and rel(got, want) < 1e-5
        else:
            m = result["measured"]
            assert result["routing"] == "mapped" and rel(got, want) <= m["logits_rel_error"] * 1.001 + 1e-6, (rel(got, want), m)
    fields, tensors = read_gguf(tmp_path / "exact-gguf")
    assert fields["qwen2moe.expert_feed_forward_length"] == 16 and fields["qwen2moe.expert_shared_feed_forward_length"] == 16
    assert tensors["blk.0.ffn_gate_inp_shexp.weight"][1].shape == (32,) and "output.weight" in tensors
    assert tensors["blk.1.ffn_gate_exps.weight"][1].shape == (4, 16, 32) and tensors["blk.1.ffn_down_exps.weight"][1].shape == (4, 32, 16)


def test_llama_moe_gguf_layout_keys_and_types(sources, tmp_path):
    ckpt = moe(sources, "llama", tmp_path / "moe", scoring="softmax", renormalize=True)
    export(ckpt, tmp_path / "mixtral", "mixtral")
    want = logits(load_model(ckpt, device="cpu"), ids())
    for qtype, tol in (("F32", 1e-5), ("BF16", 2e-2), ("Q8_0", 2e-2)):
        out = tmp_path / qtype
        result = export(ckpt, out, "gguf", ExportOptions(tensor_type=qtype))
        assert result["gguf_architecture"] == "llama" and result["routing"] == "exact" and result["dtype"] == qtype
        fields, tensors = read_gguf(out)
        assert fields["general.architecture"] == "llama" and fields["llama.expert_count"] == 4
        assert fields["llama.expert_used_count"] == 2 and fields["llama.feed_forward_length"] == 20
        assert fields["llama.context_length"] == 128 and fields["llama.rope.dimension_count"] == 8
        assert fields["tokenizer.ggml.model"] == "gpt2" and "{% for m in messages %}" in fields["tokenizer.chat_template"]
        assert len(fields["tokenizer.ggml.tokens"]) == VOCAB and fields["tokenizer.ggml.tokens"][VOCAB - 1] == f"[PAD{VOCAB - 1}]"
        assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
        types = {name: t for name, (t, _) in tensors.items()}
        assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
        assert types["blk.0.ffn_gate_exps.weight"] == qtype and types["token_embd.weight"] == qtype
        got = logits(llama_moe_as_mixtral(out, tmp_path / "mixtral", tmp_path / f"rebuilt-{qtype}"), ids())
        assert rel(got, want) < tol, f"{qtype}: {rel(got, want):.2e}"
    one_line_error([str(ckpt), str(tmp_path / "k"), "--to", "gguf", "--type", "Q4_K"], "cannot write tensor type 'Q4_K'", "Q8_0",
                   out=tmp_path / "k")


def test_vocab_comes_from_the_source_gguf(sources, tmp_path):
    export(sources["llama"], tmp_path / "dense-gguf", "gguf")
    source_fields, _ = read_gguf(tmp_path / "dense-gguf")
    ckpt = tmp_path / "moe"
    convert(str(tmp_path / "dense-gguf" / "model.gguf"), ckpt, load_recipe(None, {"experts": 4, "top_k": 4, "train_router": False, "partition.method": "random"}))
    result = export(ckpt, tmp_path / "moe-gguf", "gguf")
    assert any("copied from model.gguf" in n for n in result["notes"])
    fields, _ = read_gguf(tmp_path / "moe-gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template"):
        assert fields[key] == source_fields[key], key


def test_gguf_refusals(dense_models, tmp_path):
    out = tmp_path / "out"
    one_line_error([str(dense_models["llama"]), str(out), "--to", "gguf"], "no tokenizer.json", out=out)
    chars = shutil.copytree(dense_models["llama"], tmp_path / "chars")
    save_char_tokenizer(chars)
    one_line_error([str(chars), str(out), "--to", "gguf"], "byte-level BPE", "WordLevel", out=out)
    one_line_error([str(dense_models["gemma2"]), str(out), "--to", "gguf"], "cannot hold a gemma2 model", out=out)


def test_llama_cpp_runs_the_export(sources, tmp_path):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install '.[serve]'): the GGUF was checked with transformers' loader only")
    from llama_cpp import Llama

    ckpt = moe(sources, "qwen2", tmp_path / "moe", scoring="softmax", renormalize=False, shared_neurons=16)
    export(ckpt, tmp_path / "gguf", "gguf")
    llm = Llama(model_path=str(tmp_path / "gguf" / "model.gguf"), logits_all=True, verbose=False, n_ctx=64)
    x = ids()[0]
    llm.eval(x.tolist())
    got = torch.tensor(np.array(llm.scores[: len(x)]))
    want = logits(load_model(ckpt, device="cpu"), x[None])[0]
    assert rel(got, want) < 1e-3, json.dumps({"rel": rel(got, want)})
