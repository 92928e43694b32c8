"""export to Qwen2-MoE / Mixtral: stock transformers, without moeconv importable, computes moeconv's model; refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from conftest import build_dense, sample_text, save_char_tokenizer
from moeconv.cli.app import app
from moeconv.config import load_recipe
from moeconv.convert import convert
from moeconv.export import check_ids, export
from moeconv.export.source import open_source
from moeconv.io.load import load_model

EXPORTABLE = ("llama", "mistral", "qwen2")
# 4 experts x 20 neurons (shared: 16 + 4 x 16): float32 expert rows of a multiple of 16 bytes, which transformers'
# default grouped_mm experts kernel needs, so the stock default path is the one tested.
ALIGNED = {"intermediate_size": 80}

# Runs every exported model in a fresh isolated interpreter where `import moeconv` fails: plain from_pretrained,
# no remote code, so only transformers' own classes can compute the logits.
STANDALONE = textwrap.dedent(
    """
    import sys, json, torch
    sys.modules["moeconv"] = None
    from transformers import AutoModelForCausalLM
    for out, ids, dest in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(model).__name__ in ("Qwen2MoeForCausalLM", "MixtralForCausalLM"), type(model)
        assert not any(m.startswith("moeconv") for m in sys.modules if sys.modules[m] is not None)
        with torch.no_grad():
            torch.save(model(torch.tensor(ids)).logits, dest)
    """
)


def standalone_logits(jobs: list[tuple], cwd) -> list[torch.Tensor]:
    """jobs: (exported folder, ids [B, T]) -> stock-transformers logits, computed where moeconv cannot be imported."""
    spec = [(str(out), ids.tolist(), str(cwd / f"logits-{n}.pt")) for n, (out, ids) in enumerate(jobs)]
    subprocess.run([sys.executable, "-I", "-c", STANDALONE, json.dumps(spec)], check=True, cwd=cwd)
    return [torch.load(dest, weights_only=True) for _, _, dest in spec]


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Exportable tiny dense models with a tokenizer, and calibration text."""
    root = tmp_path_factory.mktemp("export-src")
    text = root / "calib.txt"
    text.write_text(sample_text())
    out = {"text": text}
    for family in EXPORTABLE:
        save_char_tokenizer(build_dense(family, root / family, **ALIGNED))
        out[family] = root / family
    return out


def moe(sources, family: str, out, **recipe):
    fields = {"experts": 4, "top_k": 2, "train_router": False, "partition.method": "random",
              "calibration": {"source": str(sources["text"]), "tokens": 1024, "seqlen": 64}, **recipe}
    # shared neurons are picked on calibration text, which convert captures only for a stage that needs it: the refit
    refit = fields.pop("refit", False) or bool(fields.get("shared_neurons"))
    resolved = load_recipe(None, fields)
    convert(str(sources[family]), out, resolved if refit else resolved.model_copy(update={"refit": None}))
    return out


def moeconv_logits(path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(path, device="cpu")(ids).logits


def test_identity_exports_reproduce_the_dense_model(sources, tmp_path):
    ids = _ids()
    jobs, expected = [], []
    for family in EXPORTABLE:
        ckpt = moe(sources, family, tmp_path / f"{family}-moe", top_k=4)
        dense = moeconv_logits(sources[family], ids)
        for to in ("qwen2_moe", "mixtral") if family != "qwen2" else ("qwen2_moe",):
            result = export(ckpt, tmp_path / f"{family}-{to}", to)
            assert result["routing"] == "exact" and not result["measured"]
            jobs.append((tmp_path / f"{family}-{to}", ids))
            expected.append((f"{family}->{to}", dense))
    for got, (name, want) in zip(standalone_logits(jobs, tmp_path), expected, strict=True):
        assert rel(got, want) < 1e-5, f"{name}: relative logit error {rel(got, want):.2e}"


# (family, target, conversion): converted with the target's own routing, the export is exact.
EXACT = [
    ("llama", "mixtral", {"scoring": "softmax", "renormalize": True, "train_router": True, "router": {"steps": 20}, "refit": True}),
    ("mistral", "mixtral", {"scoring": "softmax", "renormalize": True}),
    ("llama", "qwen2_moe", {"scoring": "softmax", "renormalize": False, "shared_neurons": 16}),
    ("qwen2", "qwen2_moe", {"scoring": "softmax", "renormalize": True, "shared_neurons": 16}),
]


def test_softmax_conversions_export_exactly(sources, tmp_path):
    ids = _ids()
    jobs, expected = [], []
    for n, (family, to, recipe) in enumerate(EXACT):
        ckpt = moe(sources, family, tmp_path / f"moe-{n}", **recipe)
        result = export(ckpt, tmp_path / f"out-{n}", to)
        assert result["routing"] == "exact", result
        jobs.append((tmp_path / f"out-{n}", ids))
        expected.append((f"{family}->{to} {recipe}", moeconv_logits(ckpt, ids)))
    for got, (name, want) in zip(standalone_logits(jobs, tmp_path), expected, strict=True):
        assert rel(got, want) < 1e-5, f"{name}: relative logit error {rel(got, want):.2e}"


def test_weight_one_routing_is_mapped_within_the_reported_error(sources, tmp_path):
    cases = [("llama", "mixtral", {}), ("qwen2", "qwen2_moe", {"shared_neurons": 16})]
    jobs, expected = [], []
    for n, (family, to, recipe) in enumerate(cases):
        ckpt = moe(sources, family, tmp_path / f"moe-{n}", **recipe)
        result = export(ckpt, tmp_path / f"out-{n}", to)
        m = result["measured"]
        assert result["routing"] == "mapped" and m["check_tokens"] == 256 and "calib.txt" in m["check_text"]
        assert 0 < m["max_weight_deviation"] <= 2e-3 and m["logits_rel_error"] < 1e-2, m
        ids, _ = check_ids(open_source(ckpt), 256)  # the very tokens the export measured on
        jobs.append((tmp_path / f"out-{n}", ids))
        expected.append((m, moeconv_logits(ckpt, ids)))
    for got, (m, want) in zip(standalone_logits(jobs, tmp_path), expected, strict=True):
        # the stock model computes exactly the mapped routing: its error is the reported one, up to float rounding
        assert rel(got, want) <= m["logits_rel_error"] * 1.001 + 1e-6, (rel(got, want), m)
        per_token = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max()
        assert per_token <= m["max_token_rel_error"] * 1.001 + 1e-6


def test_exported_folder_evaluates_like_the_checkpoint(sources, tmp_path):
    from moeconv.eval.perplexity import EvalSettings, evaluate_model

    ckpt = moe(sources, "llama", tmp_path / "moe", scoring="softmax", renormalize=True)
    export(ckpt, tmp_path / "mixtral", "mixtral")
    settings = EvalSettings(data=str(sources["text"]), seqlen=64, max_tokens=512, device="cpu")
    native, exported = evaluate_model(ckpt, settings), evaluate_model(tmp_path / "mixtral", settings)
    assert exported.moe and len(exported.routing) == 2
    assert exported.perplexity.ppl == pytest.approx(native.perplexity.ppl, rel=1e-5)
    assert exported.params.total == native.params.total and exported.params.active == native.params.active


runner = CliRunner()


def one_line_error(args: list[str], *needles: str, out=None) -> None:
    result = runner.invoke(app, ["export", *args], catch_exceptions=False)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and text.startswith("error:") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    if out is not None:
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_what_a_target_cannot_hold_is_a_one_line_error(sources, dense_models, tmp_path):
    out = tmp_path / "out"
    one_line_error([str(sources["llama"]), str(out), "--to", "qwen2_moe"], "dense model", "moeconv convert", out=out)
    one_line_error([str(tmp_path), str(out), "--to", "onnx"], "unknown export target", "mixtral", out=out)
    qwen2 = moe(sources, "qwen2", tmp_path / "qwen2-moe", top_k=4)
    one_line_error([str(qwen2), str(out), "--to", "mixtral"], "q/k/v biases", "--to qwen2_moe", out=out)
    one_line_error([str(qwen2), str(qwen2 / "out"), "--to", "qwen2_moe"], "overlaps the source", out=qwen2 / "out")
    shared = moe(sources, "llama", tmp_path / "shared", shared_neurons=16, scoring="softmax", renormalize=True)
    one_line_error([str(shared), str(out), "--to", "mixtral"], "shared neurons", "--to qwen2_moe", out=out)
    sigmoid = moe(sources, "llama", tmp_path / "sigmoid", scoring="sigmoid")
    one_line_error([str(sigmoid), str(out), "--to", "qwen2_moe"], "sigmoid", "scoring: softmax", out=out)
    unnormalized = moe(sources, "mistral", tmp_path / "unnormalized", scoring="softmax", renormalize=False)
    one_line_error([str(unnormalized), str(out), "--to", "mixtral"], "always renormalizes", "dot-moe-softmax.yaml", out=out)
    for family, needle in (("qwen3", "q/k RMSNorm"), ("gpt2", "non-gated GELU"), ("gemma2", "GeGLU")):
        ckpt = tmp_path / f"{family}-moe"
        convert(str(dense_models[family]), ckpt, load_recipe(None, {"experts": 4, "top_k": 4, "train_router": False, "partition.method": "random"}))
        one_line_error([str(ckpt), str(out), "--to", "qwen2_moe"], f"cannot hold a {family} model", needle, "trust_remote_code", out=out)
    for field, value, needle in (("dag", {"d_g": 8, "rounds": 2}, "DAG-MoE"),
                                 ("quant", {"modules": {"x": {"format": "sub1"}}}, "sub1")):
        patched = tmp_path / f"patched-{field}"
        shutil.copytree(qwen2, patched)
        cfg = json.loads((patched / "config.json").read_text())
        cfg["moe"][field] = value
        (patched / "config.json").write_text(json.dumps(cfg))
        one_line_error([str(patched), str(out), "--to", "qwen2_moe"], needle, out=out)


def test_dry_run_json_and_force(sources, tmp_path):
    ckpt = moe(sources, "llama", tmp_path / "moe")
    out = tmp_path / "out"
    plan = runner.invoke(app, ["export", str(ckpt), str(out), "--to", "mixtral", "--dry-run", "--json"], catch_exceptions=False)
    assert plan.exit_code == 0, plan.output
    data = json.loads(plan.stdout)
    assert data["routing"] == "mapped" and "model.layers.1.block_sparse_moe.experts.3.w2.weight" in data["tensors"]
    assert any("shared neurons" in c for c in data["cannot_hold"]) and not out.exists()
    done = runner.invoke(app, ["export", str(ckpt), str(out), "--to", "mixtral", "--json"], catch_exceptions=False)
    assert done.exit_code == 0 and json.loads(done.stdout)["measured"]["check_tokens"] == 256
    assert (out / "config.json").is_file() and (out / "provenance.json").is_file() and (out / "tokenizer.json").is_file()
    one_line_error([str(ckpt), str(out), "--to", "mixtral"], "already exists", "--force")
    again = runner.invoke(app, ["export", str(ckpt), str(out), "--to", "qwen2_moe", "--force", "-q"], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
