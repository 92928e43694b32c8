"""convert: exactness for every family, sparse validity, inspect arithmetic, dry run, shards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES
from moeconv.convert import convert
from moeconv.inspect import inspect_checkpoint
from moeconv.io.load import load_model
from moeconv.recipe import load_recipe

IDENTITY = {"experts": 4, "top_k": 4, "train_router": False}

# Loads every converted model with trust_remote_code in a fresh interpreter where moeconv cannot be
# imported, so only the checkpoint's own modeling files can run it.
STANDALONE = textwrap.dedent(
    """
    import sys, json, torch
    sys.modules["moeconv"] = None  # make `import moeconv` fail
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    for out, ids, dest in jobs:
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
        assert type(model).__name__ == "MoeconvForCausalLM", type(model)
        with torch.no_grad():
            logits = model(torch.tensor(ids)).logits
        torch.save(logits, dest)
    """
)


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))


def test_identity_conversion_is_exact_standalone(dense_models, tmp_path):
    jobs, expected = [], {}
    for family, src in dense_models.items():
        out = tmp_path / f"{family}-moe"
        convert(str(src), out, load_recipe(None, IDENTITY))
        dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        with torch.no_grad():
            expected[family] = dense(_ids()).logits
        jobs.append((str(out), _ids().tolist(), str(tmp_path / f"{family}.pt")))
    subprocess.run([sys.executable, "-c", STANDALONE, json.dumps(jobs)], check=True, cwd=tmp_path)
    for family, (_, _, dest) in zip(dense_models, jobs, strict=True):
        got = torch.load(dest, weights_only=True)
        rel = (got - expected[family]).norm() / expected[family].norm()
        assert rel < 1e-5, f"{family}: relative logit error {rel:.2e}"


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_sparse_model_is_valid_and_generates(dense_models, tmp_path, family):
    out = tmp_path / "moe"
    recipe = load_recipe(None, {"experts": 6, "top_k": 2, "train_router": False}).model_copy(update={"refit": None})
    convert(str(dense_models[family]), out, recipe)
    model = load_model(out, device="cpu")
    with torch.no_grad():
        logits = model(_ids()).logits
    assert torch.isfinite(logits).all()
    generated = model.generate(_ids()[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 15)

    info = inspect_checkpoint(out)
    cfg = json.loads((out / "config.json").read_text())
    d, ff, layers = 32, 72, 2
    s = ff // 6
    gated = cfg["moe"]["gated"]
    per_expert = (3 if gated else 2) * d * s + ((2 if gated else 1) * s if cfg["moe"]["ffn_bias"] else 0)
    assert info["experts"] == 6 and info["top_k"] == 2
    assert info["parameters"] - info["active_parameters"] == (6 - 2) * per_expert * layers
    assert info["parameters"] == sum(p.numel() for p in model.parameters()), "inspect must count what loads"


def test_dry_run_writes_nothing(dense_models, tmp_path):
    out = tmp_path / "never"
    plan = convert(str(dense_models["llama"]), out, load_recipe(None, IDENTITY), dry_run=True)
    assert plan.layers == 2 and plan.experts == 4 and plan.tensors
    assert not out.exists() and not (tmp_path / "never.partial").exists()


def test_sharding_and_output_dtype(dense_models, tmp_path):
    out = tmp_path / "moe"
    convert(str(dense_models["qwen2"]), out, load_recipe(None, {**IDENTITY, "max_shard_size": "20KB", "dtype": "bfloat16"}))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    model = load_model(out, dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    for name in ("config.json", "modeling_moeconv.py", "configuration_moeconv.py", "recipe.yaml", "provenance.json"):
        assert (out / name).is_file(), name
    assert not (tmp_path / "moe.partial").exists()


def test_every_family_is_supported():
    from moeconv.io.adapters import ADAPTERS

    assert set(FAMILIES) <= set(ADAPTERS)
