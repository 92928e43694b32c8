"""moeconv eval: tokenization, windows, perplexity vs plain transformers loops, stats, comparison, report and CLI."""

from __future__ import annotations

import math

import pytest
import torch
from eval_support import byte_level_tokenizer, make_text, metaspace_tokenizer, moe_from_dense, tiny_llama
from transformers import AutoModelForCausalLM, MixtralConfig

from moeconv.calib.sources import TextSource
from moeconv.calib.tokenize import cut_windows, tokenize_source, tokenize_text
from moeconv.errors import DataError
from moeconv.eval import EvalSettings, count_parameters, evaluate_model, evaluate_perplexity
from moeconv.eval.stats import RoutingRecorder, find_moe_layers


def reference_ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    """The plain GPTQ loop: non-overlapping windows, the model's own loss, exp(mean of window means)."""
    nlls = []
    with torch.no_grad():
        for i in range(ids.numel() // seqlen):
            window = ids[i * seqlen : (i + 1) * seqlen][None]
            nlls.append(model(input_ids=window, labels=window).loss.double())
    return math.exp(torch.stack(nlls).mean().item())


def reference_top1(model, ids: torch.Tensor, seqlen: int) -> tuple[int, int]:
    """Next-token hits of the model's own logits over non-overlapping windows: (hits, predicted tokens)."""
    hits = count = 0
    with torch.no_grad():
        for i in range(ids.numel() // seqlen):
            window = ids[i * seqlen : (i + 1) * seqlen][None]
            guess = model(input_ids=window).logits[0, :-1].argmax(-1)  # [seqlen - 1]
            hits += int((guess == window[0, 1:]).sum())
            count += seqlen - 1
    return hits, count


def reference_strided_nll(model, ids: torch.Tensor, seqlen: int, stride: int) -> tuple[float, int]:
    """HF's strided loop (each window scores only the tokens after the previous window's end), full windows only."""
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.numel() - seqlen + 1, stride):
            end = begin + seqlen
            window = ids[begin:end][None]
            labels = window.clone()
            labels[:, : seqlen - (end - prev_end)] = -100
            scored = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=window, labels=labels).loss.item() * scored
            count += scored
            prev_end = end
    return total, count


# ---------------------------------------------------------------- tokenization and windows


@pytest.mark.parametrize("make", [byte_level_tokenizer, metaspace_tokenizer])
def test_streaming_tokenization_equals_one_call(make):
    tok = make()
    text = make_text(12000, 3)
    seen = []
    streamed = tokenize_text(text, tok, chunk_chars=3000, progress=lambda done, total: seen.append((done, total)))
    whole = torch.tensor(tok(text)["input_ids"])
    assert len(seen) > 5, "the text must have gone through in several chunks"
    assert torch.equal(streamed, whole)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1] == (len(text), len(text))


def test_source_is_joined_with_blank_lines(tokenizer):
    source = TextSource("two", ["first document", "second one"])
    assert torch.equal(tokenize_source(source, tokenizer), torch.tensor(tokenizer("first document\n\nsecond one")["input_ids"]))


def test_windows_non_overlapping_strided_and_limits():
    tokens = torch.arange(103)
    w = cut_windows(tokens, 10)
    assert w.count == 10 and w.ids[3, 0] == 30 and w.tokens == 100 and w.predicted == 90  # remainder of 3 dropped
    w = cut_windows(tokens, 10, max_tokens=35)
    assert w.count == 3 and w.tokens_available == 103
    s = cut_windows(tokens, 10, stride=4)
    assert s.count == 24 and s.ids[1, 0] == 4 and s.predicted == 9 + 23 * 4
    assert cut_windows(tokens, 10, stride=10).predicted == w.predicted_after_first * 10 == 90
    with pytest.raises(DataError, match=r"has 7 tokens, fewer than one window of 10; pass --seqlen 7 or smaller"):
        cut_windows(torch.arange(7), 10)
    with pytest.raises(DataError, match=r"--max-tokens 5 kept 5 of 103"):
        cut_windows(tokens, 10, max_tokens=5)
    with pytest.raises(DataError, match="--stride 11"):
        cut_windows(tokens, 10, stride=11)


# ---------------------------------------------------------------- perplexity against plain loops


@pytest.mark.parametrize("batch_size,loss_chunk", [(1, 1024), (3, 7)])
def test_perplexity_matches_plain_loop(tokenizer, text_file, batch_size, loss_chunk):
    model = tiny_llama(len(tokenizer), seed=1)
    ids = tokenize_text(text_file.read_text(), tokenizer)
    windows = cut_windows(ids, 64)
    result = evaluate_perplexity(model, windows, batch_size=batch_size, loss_chunk=loss_chunk)
    assert result.loss_path == "chunked" and result.windows == ids.numel() // 64 >= 5
    assert result.ppl == pytest.approx(reference_ppl(model, ids, 64), rel=1e-5)
    assert result.predicted == result.windows * 63 and result.tokens == result.windows * 64
    hits, count = reference_top1(model, ids, 64)
    assert (result.top1_hits, result.predicted) == (hits, count) and result.top1 == hits / count
    assert 0 < hits < count  # a random model gets some right, not all: the check can tell a count from a constant


@pytest.mark.parametrize("stride,batch_size", [(16, 1), (16, 4), (63, 2)])
def test_strided_perplexity_matches_hf_loop(tokenizer, text_file, stride, batch_size):
    model = tiny_llama(len(tokenizer), seed=2)
    ids = tokenize_text(text_file.read_text(), tokenizer)[:700]
    windows = cut_windows(ids, 64, stride=stride)
    result = evaluate_perplexity(model, windows, batch_size=batch_size)
    total, count = reference_strided_nll(model, ids, 64, stride)
    assert result.predicted == count
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_logit_softcapping_falls_back_to_model_logits(tokenizer, text_file):
    from transformers import Gemma2Config

    torch.manual_seed(3)
    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()  # gemma2 has no sdpa
    ids = tokenize_text(text_file.read_text(), tokenizer)
    result = evaluate_perplexity(model, cut_windows(ids, 64, max_tokens=64 * 4), batch_size=2)
    assert result.loss_path == "logits"
    assert result.ppl == pytest.approx(reference_ppl(model, ids[: 64 * 4], 64), rel=1e-5)


# ---------------------------------------------------------------- stats


def test_parameter_counts_dense_tied_and_moe(tokenizer):
    vocab = len(tokenizer)
    tied = tiny_llama(vocab, tie=True)
    counts = count_parameters(tied)
    assert counts.total == sum(p.numel() for p in tied.parameters())  # tied lm_head counted once
    assert counts.embedding == vocab * 32 and counts.active == counts.total and counts.moe_layers == 0
    dense = tiny_llama(vocab)
    moe = count_parameters(moe_from_dense(dense, num_experts=4, top_k=1))
    ffn = 3 * 32 * 64
    assert moe.total == count_parameters(dense).total + 2 * 4 * 32  # + two routers
    assert moe.expert == 2 * ffn and moe.active == moe.total - 2 * ffn * 3 // 4
    assert moe.embedding == 2 * vocab * 32 and (moe.num_experts, moe.top_k) == (4, 1)


def test_quantized_linear_counts_logical_weights():
    class PackedLinear(torch.nn.Module):  # stands in for a quantized linear: packed codes, logical shape
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 64, 16
            self.register_buffer("codes", torch.zeros(16, 8, dtype=torch.uint8))
            self.scales = torch.nn.Parameter(torch.ones(16))

    net = torch.nn.Sequential(PackedLinear(), torch.nn.Linear(16, 4))
    assert count_parameters(net).total == 64 * 16 + 16 * 4 + 4


def test_routing_recorder_matches_router_decisions(tokenizer):
    model = moe_from_dense(tiny_llama(len(tokenizer)), num_experts=4, top_k=2)
    blocks = [layer.block for layer in find_moe_layers(model)]
    inputs = []
    handles = [b.register_forward_pre_hook(lambda m, a: inputs.append((m, a[0].reshape(-1, a[0].shape[-1])))) for b in blocks]
    x = torch.randint(0, len(tokenizer), (3, 40))
    with torch.no_grad(), RoutingRecorder(model) as rec:
        model(input_ids=x)
    for h in handles:
        h.remove()
    layers = rec.layers()
    assert len(layers) == 2
    for layer, (block, hidden) in zip(layers, inputs, strict=False):
        ids, _ = block.route(hidden)
        counts = torch.bincount(ids.flatten(), minlength=4).double()
        assert layer.tokens == 120 and layer.load == pytest.approx((counts / counts.sum()).tolist())
        p = torch.softmax(block.router(hidden), -1)
        assert layer.router_entropy == pytest.approx(float(-(p * p.log()).sum(-1).mean().detach()), rel=1e-5)
        assert 0 < layer.load_entropy_norm <= 1 and layer.max_load_ratio >= 1


def test_exported_mixtral_layers_are_found_and_counted():
    torch.manual_seed(4)
    cfg = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    counts = count_parameters(model)
    per_expert = 3 * 32 * 48
    assert counts.expert == 2 * 4 * per_expert and counts.active == counts.total - 2 * 2 * per_expert
    with torch.no_grad(), RoutingRecorder(model) as rec:
        model(input_ids=torch.randint(0, 100, (2, 16)))
    assert [r.tokens for r in rec.layers()] == [32, 32] and all(sum(r.load) == pytest.approx(1) for r in rec.layers())


# ---------------------------------------------------------------- library end to end


def test_moe_with_all_experts_reproduces_dense_perplexity(tmp_path, tokenizer, dense_dir, text_file):
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    moe_from_dense(dense, num_experts=4, top_k=4).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    settings = EvalSettings(data=str(text_file), seqlen=64, device="cpu")
    a, b = evaluate_model(dense_dir, settings), evaluate_model(tmp_path, settings)
    assert not a.moe and b.moe and len(b.routing) == 2
    assert b.perplexity.ppl == pytest.approx(a.perplexity.ppl, rel=1e-5)
    assert b.tokens_fingerprint == a.tokens_fingerprint and b.params.active == b.params.total
    assert b.perplexity.loss_path == "chunked"


def test_converted_checkpoint_native_and_remote_code(tmp_path, dense_dir, text_file):
    """A checkpoint written by `moeconv convert` (top_k == E: exactly dense), loaded natively and as remote code."""
    convert_mod = pytest.importorskip("moeconv.convert", reason="moeconv convert is not available yet")
    from moeconv.config import load_recipe

    recipe = load_recipe(None, {"experts": 4, "top_k": 4, "train_router": False, "partition.method": "random", "calibration.source": str(text_file),
                                "calibration.tokens": 256, "calibration.seqlen": 64})
    convert_mod.convert(str(dense_dir), tmp_path / "moe", recipe)
    settings = EvalSettings(data=str(text_file), seqlen=64, device="cpu", max_tokens=64 * 8)
    dense = evaluate_model(dense_dir, settings)
    native = evaluate_model(tmp_path / "moe", settings)
    remote = evaluate_model(tmp_path / "moe", settings.model_copy(update={"trust_remote_code": True}))
    for moe in (native, remote):
        assert moe.moe and len(moe.routing) == 2 and moe.params.num_experts == 4
        assert moe.perplexity.ppl == pytest.approx(dense.perplexity.ppl, rel=1e-5)


# ---------------------------------------------------------------- CLI
