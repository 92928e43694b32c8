"""Refusals before compute: not enough disk for the planned output, not enough memory for the planned calibration;
and what --dry-run predicts (memory by part, time per layer)."""

import json
import shutil
from collections import namedtuple

import pytest
from typer.testing import CliRunner

import moeconv.convert as convert_module
import moeconv.jobs.runner as runner
from conftest import build_dense, sample_text, save_char_tokenizer
from moeconv.cli.app import app
from moeconv.config import load_recipe
from moeconv.convert import convert
from moeconv.errors import MoeconvError

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def source(tmp_path):
    src = build_dense("llama", tmp_path / "dense")
    save_char_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text(20000))
    return src, text


def _recipe(text, tokens=2048):
    return load_recipe(None, {"experts": 4, "top_k": 2, "router.steps": 2, "calibration.source": str(text),
                              "calibration.tokens": tokens, "calibration.seqlen": 64, "partition.method": "random",
                              "calibration.inputs": "dense"})


def _nothing_written(out):
    return not any(p.exists() for p in (out, out.with_name(out.name + ".partial"), out.with_name(out.name + ".lock")))


def test_not_enough_disk_is_refused_before_compute_with_the_numbers(source, tmp_path, monkeypatch):
    src, text = source
    plan = convert(str(src), tmp_path / "x", _recipe(text), dry_run=True)
    needed = plan.output_bytes + plan.scratch_bytes
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - needed + 1, needed - 1))
    monkeypatch.setattr(convert_module, "run_job", lambda *a, **k: pytest.fail("compute started"))
    out = tmp_path / "sub" / "out"
    with pytest.raises(MoeconvError, match=rf"not enough disk space .* needs .* \({needed} bytes\) but .* has .* free") as err:
        convert(str(src), out, _recipe(text))
    assert "\n" not in str(err.value) and _nothing_written(out)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, needed))  # exactly enough: accepted
    with pytest.raises(pytest.fail.Exception, match="compute started"):
        convert(str(src), out, _recipe(text))


def test_not_enough_memory_names_the_calibration_budget_that_fits(source, tmp_path, monkeypatch):
    src, text = source
    plans = {t: convert(str(src), tmp_path / "x", _recipe(text, t), dry_run=True).peak_bytes_estimate for t in (2048, 512)}
    assert plans[512] < plans[2048]  # the calibration budget is in the estimate
    free = plans[512] + 1
    for module in (runner, convert_module):
        monkeypatch.setattr(module, "available_memory", lambda: free)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(src), str(out), "--experts", "4", "--top-k", "2", "--calib", str(text),
                                      "--calib-tokens", "2048", "--seqlen", "64", "--method", "random", "--calib-inputs", "dense"])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]  # progress lines come first on the terminal
    assert line.startswith("error: not enough memory"), result.output
    assert f"{plans[2048] / 2**30:.2f} GiB" in line and "2048 calibration tokens" in line
    assert "lower --calib-tokens to 512 or fewer" in line  # 1024 does not fit, 512 does
    assert _nothing_written(out)
    for module in (runner, convert_module):  # not even the weights fit: no calibration budget helps
        monkeypatch.setattr(module, "available_memory", lambda: 1)
    with pytest.raises(MoeconvError, match="even the smallest calibration does not fit"):
        convert(str(src), out, _recipe(text))
    assert _nothing_written(out)


def test_dry_run_predicts_memory_by_part_and_time_per_layer(source, tmp_path):
    src, text = source
    result = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out"), "--experts", "4", "--top-k", "2",
                                      "--calib", str(text), "--calib-tokens", "2048", "--seqlen", "64", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["peak_bytes_estimate"] == sum(plan["memory_parts"].values())
    # the default: converted inputs carry a second stream, and the dot partition trains on the tokens
    assert plan["memory_parts"]["calibration states"] == 5 * 2048 * plan["d_model"] * 4
    assert set(plan["layer_flops"]) == {"capture", "partition", "router", "refit"}
    assert plan["flop_rate"] > 1e8
    assert plan["seconds_per_layer_estimate"] == pytest.approx(sum(plan["layer_flops"].values()) / plan["flop_rate"])
    table = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out"), "--experts", "4", "--top-k", "2",
                                     "--calib", str(text), "--calib-tokens", "2048", "--seqlen", "64", "--dry-run"])
    assert "calibration states" in table.stdout and "s estimated" in table.stdout and "GFLOP/s" in table.stdout


def test_converted_inputs_plan_two_streams(source, tmp_path):
    """calibration.inputs: converted carries a second stream and the gap: more memory, more capture work, and twice the
    resume states on disk."""
    src, text = source
    dense = convert(str(src), tmp_path / "x", _recipe(text), dry_run=True)
    conv = convert(str(src), tmp_path / "x", _recipe(text).model_copy(update={
        "calibration": _recipe(text).calibration.model_copy(update={"inputs": "converted"})}), dry_run=True)
    assert _recipe(text).calibration.inputs == "dense"
    assert conv.memory_parts["calibration states"] == 5 * 2048 * conv.d_model * 4
    assert conv.scratch_bytes == 2 * dense.scratch_bytes
    assert conv.layer_flops["capture"] == pytest.approx(3 * dense.layer_flops["capture"])


def test_dry_run_counts_the_dot_partitions_own_steps(source, tmp_path):
    """At 8B width DOT's training steps are most of a layer's time (96 of ~170 s measured): the estimate counts them."""
    src, text = source
    d_ff = json.loads((src / "config.json").read_text())["intermediate_size"]
    recipe = _recipe(text)

    def partition_flops(steps: int) -> tuple[float, int]:
        spec = recipe.partition.model_copy(update={"method": "dot", "options": {"steps": steps}})
        plan = convert(str(src), tmp_path / "x", recipe.model_copy(update={"partition": spec}), dry_run=True)
        return plan.layer_flops["partition"], plan.d_model

    (few, d), (many, _) = partition_flops(40), partition_flops(80)
    assert many - few == pytest.approx(4 * 40 * 512 * d * d_ff)  # forward and backward of [512, d_ff] x [d_ff, d]


def _quantize_args(src, out, text):
    return ["quantize", str(src), str(out), "--bits", "4", "--group-size", "8", "--calib", str(text), "--calib-tokens", "512",
            "--seqlen", "64"]


def test_quantize_refuses_before_compute_without_disk_or_memory(source, tmp_path, monkeypatch):
    import moeconv.quantize as quantize_module

    src, text = source
    out = tmp_path / "q"
    monkeypatch.setattr(quantize_module, "run_job", lambda *a, **k: pytest.fail("compute started"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 1000, 1000))
    result = CliRunner().invoke(app, _quantize_args(src, out, text))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: not enough disk space"), result.output
    assert _nothing_written(out)
    monkeypatch.undo()
    monkeypatch.setattr(quantize_module, "run_job", lambda *a, **k: pytest.fail("compute started"))
    monkeypatch.setattr(runner, "available_memory", lambda: 1)
    result = CliRunner().invoke(app, _quantize_args(src, out, text))
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]  # progress lines come first on the terminal
    assert line.startswith("error: not enough memory") and "lower --calib-tokens" in line, result.output
    assert _nothing_written(out)
