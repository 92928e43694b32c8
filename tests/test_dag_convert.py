"""DAG-MoE through the pipeline: convert with a `dag:` block, load it back, and check it helped."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import build_dense, sample_text, save_char_tokenizer
from moeconv.config import load_recipe
from moeconv.convert import convert
from moeconv.errors import RecipeError
from moeconv.io.load import load_model


def test_convert_with_dag(tmp_path):
    src = build_dense("llama", tmp_path / "dense", num_hidden_layers=2)
    save_char_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text())
    recipe = {"experts": 6, "top_k": 2, "calibration": {"source": str(text), "tokens": 2048, "seqlen": 64},
              "router": {"steps": 50}, "dag": {"d_g": 8, "rounds": 2, "train": {"steps": 60}}}
    out = tmp_path / "moe"
    # Without the refit: on this tiny random model a refitted MoE leaves the aggregator nothing to win back.
    convert(str(src), out, load_recipe(None, recipe).model_copy(update={"refit": None}))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["moe"]["dag"] == {"d_g": 8, "rounds": 2, "stabilize": True}
    layers = json.loads((out / "provenance.json").read_text())["layers"]
    for metrics in layers.values():
        assert metrics["dag_rel_error_after"] < metrics["dag_rel_error_before"]
    model = load_model(out, device="cpu")
    assert model.model.layers[0].mlp.dag is not None
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        with_dag = model(ids).logits
        for layer in model.model.layers:
            layer.mlp.dag = None
        without = model(ids).logits
    assert torch.isfinite(with_dag).all() and not torch.allclose(with_dag, without)


def test_bad_dag_field():
    with pytest.raises(RecipeError, match="dag"):
        load_recipe(None, {"dag": {"width": 3}})


def dense_and_moe(tmp_path, top_k: int, **dense_overrides):
    """A tiny dense llama with a tokenizer, calibration text, and its (6, top_k) conversion: (dense, text, moe)."""
    src = build_dense("llama", tmp_path / "dense", num_hidden_layers=2, **dense_overrides)
    save_char_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text())
    moe = tmp_path / "moe"
    convert(str(src), moe, load_recipe(None, {"experts": 6, "top_k": top_k, "router": {"steps": 30},
                                             "calibration": {"source": str(text), "tokens": 1024, "seqlen": 64}}))
    return src, text, moe


def test_dag_command_adds_aggregator(tmp_path):
    from typer.testing import CliRunner

    from moeconv.cli.app import app

    src, text, moe = dense_and_moe(tmp_path, top_k=2)
    runner = CliRunner()
    common = ["--calib", str(text), "--calib-tokens", "1024", "--seqlen", "64", "--steps", "40", "--d-g", "8", "-q"]
    result = runner.invoke(app, ["dag", str(moe), str(tmp_path / "dag"), *common])
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "dag" / "config.json").read_text())
    assert cfg["moe"]["dag"]["d_g"] == 8
    model = load_model(tmp_path / "dag", device="cpu")
    assert all(layer.mlp.dag is not None for layer in model.model.layers)
    layers = json.loads((tmp_path / "dag" / "provenance.json").read_text())["dag"]["layers"]
    # Kept only where it lowers the held-out error; elsewhere the aggregator is left exactly neutral (W_up = 0).
    assert all(m["rel_error_after"] <= m["rel_error_before"] for m in layers.values())
    for i, m in layers.items():
        neutral = all(not bool(r.up_weight.any()) for r in model.model.layers[int(i)].mlp.dag.rounds)
        assert neutral != bool(m["dag_kept"]), (i, m)

    # The refit (on by default) re-solved the down projections for top-k routing, so the experts no longer sum to
    # the dense FFN: the targets come from the dense source recorded in provenance.json, or --teacher.
    from moeconv.dag.add import _dense_ffns

    moe_config = json.loads((moe / "config.json").read_text())["moe"]
    dense_ffn = _dense_ffns(moe, None, moe_config)
    assert dense_ffn is not None and dense_ffn(0).d_ff == 72
    moved = tmp_path / "moved"
    shutil.copytree(moe, moved)
    provenance = json.loads((moved / "provenance.json").read_text())
    provenance["source"] = str(tmp_path / "gone")
    (moved / "provenance.json").write_text(json.dumps(provenance))
    missing = runner.invoke(app, ["dag", str(moved), str(tmp_path / "dag4"), *common])
    assert missing.exit_code == 2 and "pass --teacher" in missing.output and not (tmp_path / "dag4").exists()
    with_teacher = runner.invoke(app, ["dag", str(moved), str(tmp_path / "dag4"), "--teacher", str(src), *common])
    assert with_teacher.exit_code == 0, with_teacher.output

    again = runner.invoke(app, ["dag", str(tmp_path / "dag"), str(tmp_path / "dag2"), *common])
    assert again.exit_code == 2 and "already has a DAG aggregator" in again.output
    dense = runner.invoke(app, ["dag", str(src), str(tmp_path / "dag3"), *common])
    assert dense.exit_code == 2 and "dense checkpoint" in dense.output
    assert not (tmp_path / "dag2").exists() and not (tmp_path / "dag3").exists()

    # inspect counts the aggregators; eval times the model with and without them and leaves it unchanged
    from moeconv.eval.overhead import measure_dag_overhead
    from moeconv.inspect import inspect_checkpoint

    expected = sum(p.numel() for layer in model.model.layers for p in layer.mlp.dag.parameters())
    assert inspect_checkpoint(tmp_path / "dag")["aggregator_parameters"] == expected > 0
    assert inspect_checkpoint(moe)["aggregator_parameters"] == 0
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        overhead = measure_dag_overhead(model, ids, repeats=2)
        after = model(ids).logits
    assert torch.equal(before, after) and all(layer.mlp.dag is not None for layer in model.model.layers)
    assert overhead.tokens == 16 and overhead.repeats == 2 and overhead.seconds_with > 0 and overhead.seconds_without > 0
    assert measure_dag_overhead(load_model(moe, device="cpu"), ids) is None
    evaluated = runner.invoke(app, ["eval", str(tmp_path / "dag"), "--data", str(text), "--seqlen", "32", "--max-tokens", "96",
                                    "--json", "-"])
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(evaluated.stdout)["results"][0]
    assert result["params"]["aggregator"] == expected and result["dag_overhead"]["seconds_with"] > 0
    from moeconv.eval.perplexity import EvalResult

    reloaded = EvalResult.model_validate(result)  # saved results (for --compare) load back, derived ratio included
    assert reloaded.dag_overhead.overhead == pytest.approx(result["dag_overhead"]["overhead"])


def test_dag_end_to_end_kl(tmp_path):
    """--objective kl trains every aggregator together on KL to the dense teacher, and keeps the result only if the
    held-out KL drops; otherwise the aggregators stay exactly neutral (the plain MoE)."""
    from typer.testing import CliRunner

    from moeconv.cli.app import app
    from moeconv.config import DagConfig, DagEndToEndConfig
    from moeconv.dag.distill import attach_dag
    from moeconv.dag.end_to_end import distill_end_to_end
    from moeconv.heal import distill_metrics

    src, text, moe = dense_and_moe(tmp_path, top_k=1, initializer_range=0.3)  # peaked logits: a real KL to shrink
    runner = CliRunner()
    result = runner.invoke(app, ["dag", str(moe), str(tmp_path / "kl"), "--objective", "kl", "--epochs", "4", "--d-g", "8",
                                 "--calib", str(text), "--calib-tokens", "1024", "--seqlen", "64", "--json"])
    assert result.exit_code == 0, result.output
    joint = json.loads(result.output)["end_to_end"]
    assert joint["steps"] == 4 * 14 // 4 and joint["train_windows"] == 14 and joint["holdout_windows"] == 2
    assert joint["kl_after"] <= joint["kl_before"]
    assert json.loads((tmp_path / "kl" / "provenance.json").read_text())["dag"]["end_to_end"]["kl_after"] == joint["kl_after"]
    plain, with_dag = load_model(moe, device="cpu"), load_model(tmp_path / "kl", device="cpu")
    ids = torch.randint(0, 60, (1, 40))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, with_dag(ids).logits) != bool(joint["kept"])

    # A step that cannot help (learning rate 0 leaves the aggregators at W_up = 0) is discarded: logits are unchanged
    # to the bit, and nothing but the aggregators ever trains.
    student, teacher = load_model(moe, device="cpu"), load_model(src, device="cpu")
    for layer in student.model.layers:
        attach_dag(layer.mlp, DagConfig(d_g=8), torch.Generator().manual_seed(0))
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if ".dag." not in n}
    windows = torch.randint(0, 60, (8, 32))
    with torch.no_grad():
        before = student(windows).logits
    neutral = distill_end_to_end(student, teacher, windows, DagEndToEndConfig(epochs=1, lr=1e-30, batch=2))
    assert neutral["kept"] == 0.0 and neutral["kl_after"] == neutral["kl_before"]
    with torch.no_grad():
        assert torch.equal(student(windows).logits, before)
    trained = distill_end_to_end(student, teacher, windows, DagEndToEndConfig(epochs=6, lr=1e-2, batch=2))
    assert trained["kept"] == 1.0 and trained["kl_after"] < 0.97 * trained["kl_before"]
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if ".dag." not in n)
    assert all(p.requires_grad for p in student.parameters())  # flags restored
    assert distill_metrics(student, teacher, windows[-1:])["kl"] == pytest.approx(trained["kl_after"])

    both = runner.invoke(app, ["dag", str(moe), str(tmp_path / "both"), "--objective", "layer+kl", "--steps", "20", "--epochs", "1",
                               "--d-g", "8", "--calib", str(text), "--calib-tokens", "1024", "--seqlen", "64"])
    assert both.exit_code == 0, both.output
    printed = " ".join(both.output.split())  # rich wraps long lines
    assert "mean layer error" in printed and "end-to-end KL" in printed
    trained_both = json.loads((tmp_path / "both" / "provenance.json").read_text())["dag"]
    assert trained_both["end_to_end"]["epochs"] == 1 and len(trained_both["layers"]) == 2

    bad = runner.invoke(app, ["dag", str(moe), str(tmp_path / "bad"), "--objective", "kld", "-q"])
    assert bad.exit_code == 2 and "--objective" in bad.output and not (tmp_path / "bad").exists()
    with pytest.raises(RecipeError, match="end_to_end"):
        load_recipe(None, {"dag": {"end_to_end": {"epochs": 1}}})
