"""moeconv eval from the command line: JSON results, reports, --compare, one-line errors, lm-eval hand-off."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import typer
from eval_support import tiny_llama
from typer.testing import CliRunner

from moeconv.cli.eval_cmd import eval_command
from moeconv.eval import EvalSettings, evaluate_model
from moeconv.eval.compare import compare, load_results


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    app.command()(eval_command)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def error_line(result) -> str:
    text = (result.stderr or result.output).strip()
    assert result.exit_code == 2, result.output
    assert len(text.splitlines()) == 1, text
    return text


def test_cli_json_report_compare_and_determinism(tmp_path, cli, dense_dir, moe_dir, text_file):
    common = ["--data", text_file, "--seqlen", 64, "--device", "cpu", "-q"]
    r = cli(dense_dir, *common, "--compare", moe_dir, "--json", tmp_path / "a.json", "--report", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "a.json").read_text())
    first, second = doc["results"]
    for key in ("model", "data_fingerprint", "seqlen", "stride", "tokens_available", "dtype", "device"):
        assert first[key] is not None
    assert (first["dtype"], first["device"], first["stride"], first["seqlen"]) == ("float32", "cpu", 64, 64)
    windows = first["perplexity"]["windows"]  # non-overlapping windows of 64 over the whole text, the same for both models
    assert windows * 64 <= first["tokens_available"] < (windows + 1) * 64 and second["perplexity"]["windows"] == windows
    assert second["moe"] and len(second["routing"]) == 2 and second["params"]["active"] < second["params"]["total"]
    row = doc["comparison"][1]
    assert row["comparable"] and row["ppl_ratio"] == pytest.approx(second["perplexity"]["ppl"] / first["perplexity"]["ppl"])
    assert row["top1"] == second["perplexity"]["top1"] and 0 < row["top1"] < 1
    assert row["top1_retention"] == pytest.approx(second["perplexity"]["top1"] / first["perplexity"]["top1"])
    assert "top-1 kept" in (tmp_path / "rep" / "report.md").read_text()
    old_doc = json.loads(json.dumps(doc))
    for result in old_doc["results"]:  # a file saved before top-1 was measured still loads; its retention is n/c
        del result["perplexity"]["top1"], result["perplexity"]["top1_hits"]
    (tmp_path / "old.json").write_text(json.dumps(old_doc))
    old = compare(load_results(tmp_path / "old.json"))
    assert old[1].top1 is None and old[1].top1_retention is None and old[1].ppl_ratio == pytest.approx(row["ppl_ratio"])
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "perplexity.png").stat().st_size > 1000
    assert len(list((tmp_path / "rep").glob("expert_load_*.png"))) == 1
    assert "| layer |" in (tmp_path / "rep" / "report.md").read_text()

    r = cli(dense_dir, *common, "--compare", moe_dir, "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "b.json").read_text())
    for x, y in zip(doc["results"], again["results"], strict=True):
        for volatile in ("seconds", "tokens_per_s"):
            x["perplexity"].pop(volatile), y["perplexity"].pop(volatile)
        assert x == y


def test_cli_flags_incomparable_results(tmp_path, cli, dense_dir, text_file):
    base = ["--data", text_file, "--device", "cpu", "-q"]
    assert cli(dense_dir, *base, "--seqlen", 32, "--json", tmp_path / "short.json").exit_code == 0
    r = cli(dense_dir, *base, "--seqlen", 64, "--compare", tmp_path / "short.json", "--json", "-")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)["comparison"][1]
    assert not row["comparable"] and row["ppl_ratio"] is None and "seqlen 32 vs 64" in "; ".join(row["flags"])
    r = cli(dense_dir, *base[:-1], "--seqlen", 64, "--compare", tmp_path / "short.json")
    assert r.exit_code == 0 and "n/c" in r.stdout and "seqlen 32 vs 64" in r.stdout


def test_cli_bad_inputs_are_one_line_errors(tmp_path, cli, dense_dir, text_file):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "short.txt").write_text("thou art the king")
    bare = tmp_path / "no_tokenizer"
    tiny_llama(50).save_pretrained(bare)
    assert "empty" in error_line(cli(dense_dir, "--data", tmp_path / "empty.txt"))
    line = error_line(cli(dense_dir, "--data", tmp_path / "short.txt"))
    found = int(line.split("has ")[1].split()[0])
    assert 0 < found < 2048 and f"--seqlen {found} or smaller" in line
    line = error_line(cli(dense_dir, "--data", "shakespeare:nope"))
    assert "shakespeare:heldout" in line and "known" in line
    assert "not UTF-8" in error_line(cli(dense_dir, "--data", tmp_path / "latin1.txt"))
    assert "--tokenizer" in error_line(cli(bare, "--data", text_file))
    assert "pip install lm-eval" in error_line(cli(dense_dir, "--data", text_file, "--seqlen", 64, "--lm-eval", "arc_easy"))
    assert "--stride" in error_line(cli(dense_dir, "--data", text_file, "--seqlen", 64, "--stride", 65))
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    assert "moeconv eval --json" in error_line(cli(dense_dir, "--compare", tmp_path / "other.json"))


def test_lm_eval_receives_the_loaded_model(monkeypatch, dense_dir, text_file):
    calls = {}

    class FakeHFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["model"], calls["tokenizer"] = pretrained, tokenizer

    def simple_evaluate(model, tasks):
        calls["tasks"] = tasks
        return {"results": {t: {"acc": 0.5} for t in tasks}}

    harness = types.ModuleType("lm_eval")
    harness.simple_evaluate = simple_evaluate
    models_pkg, hf = types.ModuleType("lm_eval.models"), types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = FakeHFLM
    monkeypatch.setitem(sys.modules, "lm_eval", harness)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models_pkg)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    result = evaluate_model(dense_dir, EvalSettings(data=str(text_file), seqlen=64, device="cpu"), lm_eval_tasks="arc_easy, hellaswag")
    assert isinstance(calls["model"], torch.nn.Module) and not isinstance(calls["model"], str)
    assert calls["tasks"] == ["arc_easy", "hellaswag"] and result.lm_eval["results"]["hellaswag"]["acc"] == 0.5
