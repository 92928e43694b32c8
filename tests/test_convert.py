"""convert: exactness for every family, sparse validity, inspect arithmetic, dry run, shards."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, remote_code_logits
from moeconv.config import load_recipe
from moeconv.convert import convert
from moeconv.inspect import inspect_checkpoint
from moeconv.io.load import load_model

IDENTITY = {"experts": 4, "top_k": 4, "train_router": False, "partition.method": "random"}

def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))


def test_identity_conversion_is_exact_for_every_family(dense_models, tmp_path):
    """E experts, top-k E, no router training: the logits equal the dense model's, loaded by moeconv (fused kernel) and as
    remote code in a process where moeconv cannot be imported."""
    jobs, dense, native = [], {}, {}
    for family, src in dense_models.items():
        out = tmp_path / f"{family}-moe"
        convert(str(src), out, load_recipe(None, IDENTITY))
        with torch.no_grad():
            dense[family] = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(_ids()).logits
            native[family] = load_model(out, device="cpu")(_ids()).logits
        jobs.append((out, _ids().tolist(), tmp_path / f"{family}.pt"))
    remote = dict(zip(dense_models, remote_code_logits(jobs, tmp_path), strict=True))
    wrong = []
    for family in dense_models:
        pairs = (("moeconv's loader", native[family], dense[family]), ("remote code", remote[family], dense[family]),
                 ("remote code vs moeconv's loader", remote[family], native[family]))
        for how, got, want in pairs:
            rel = ((got - want).norm() / want.norm()).item()
            if not rel < 1e-5:  # NaN fails too
                wrong.append(f"{family} ({how}): relative logit error {rel:.2e}")
    assert not wrong, "; ".join(wrong)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_sparse_model_is_valid_and_generates(dense_models, tmp_path, family):
    out = tmp_path / "moe"
    recipe = load_recipe(None, {"experts": 6, "top_k": 2, "train_router": False, "partition.method": "random"}).model_copy(update={"refit": None})
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


def test_every_family_has_a_tiny_model_identity_test():
    """FAMILIES feeds the identity test above: a family moeconv supports with no tiny model there is untested."""
    from moeconv.io.adapters import ADAPTERS

    assert not set(ADAPTERS) - set(FAMILIES), f"families with no tiny config in conftest.FAMILIES: {sorted(set(ADAPTERS) - set(FAMILIES))}"
    assert not set(FAMILIES) - set(ADAPTERS), f"FAMILIES names unsupported families: {sorted(set(FAMILIES) - set(ADAPTERS))}"
