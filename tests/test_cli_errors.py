"""Every user mistake: one line naming the problem and the fix, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from moeconv.cli.app import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert text.startswith("error:"), result.output
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


def ident(*extra: str) -> list[str]:
    return ["--experts", "4", "--top-k", "4", "--no-router-training", "--method", "random", "-q", *extra]


def test_missing_path(tmp_path):
    assert_user_error(run("convert", str(tmp_path / "nope"), str(tmp_path / "out"), *ident()), "does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(run("convert", str(tmp_path / "empty"), str(tmp_path / "out"), *ident()), "holds no model weights")


def test_unsupported_architecture(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "model.safetensors").write_bytes(b"")
    result = run("convert", str(folder), str(tmp_path / "out"), *ident())
    assert_user_error(result)
    assert "not supported" in result.output or "corrupt" in result.output


def test_unsupported_architecture_reason(dense_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(dense_models["llama"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "bert"
    (src / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run("convert", str(src), str(tmp_path / "out"), *ident()), "'bert' is not supported", "supported:")


def test_experts_must_divide_ffn(dense_models, tmp_path):
    result = run("convert", str(dense_models["llama"]), str(tmp_path / "out"), "--experts", "5", "--top-k", "1", "-q")
    assert_user_error(result, "5 experts do not divide the 72", "valid expert counts: [2, 3, 4, 6, 8, 9, 12")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("k", ["0", "5"])
def test_top_k_out_of_range(dense_models, tmp_path, k):
    result = run("convert", str(dense_models["llama"]), str(tmp_path / "out"), "--experts", "4", "--top-k", k, "-q")
    assert_user_error(result, "top_k")


def test_truncated_safetensors(dense_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(dense_models["llama"], src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    before = (src / "model.safetensors").read_bytes()
    assert_user_error(run("convert", str(src), str(tmp_path / "out"), *ident()), "truncated or corrupt")
    assert (src / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "out").exists()


def test_garbage_safetensors(dense_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(dense_models["llama"], src)
    (src / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_user_error(run("convert", str(src), str(tmp_path / "out"), *ident()), "corrupt")


def _sharded(dense_models, tmp_path, shard: str):
    src = tmp_path / "src"
    shutil.copytree(dense_models["llama"], src)
    (src / "model.safetensors").rename(src / "part.safetensors")
    from safetensors import safe_open

    with safe_open(str(src / "part.safetensors"), "pt") as f:
        names = list(f.keys())
    weight_map = {n: "part.safetensors" for n in names}
    weight_map[names[0]] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return src


def test_index_names_missing_shard(dense_models, tmp_path):
    src = _sharded(dense_models, tmp_path, "missing-shard.safetensors")
    assert_user_error(run("convert", str(src), str(tmp_path / "out"), *ident()), "missing-shard.safetensors", "missing")


def test_index_names_path_outside(dense_models, tmp_path):
    src = _sharded(dense_models, tmp_path, "../../etc/passwd")
    assert_user_error(run("convert", str(src), str(tmp_path / "out"), *ident()), "outside")


def test_out_exists_without_force(dense_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_user_error(run("convert", str(dense_models["llama"]), str(out), *ident()), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "precious"


def test_out_inside_source_is_refused(dense_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(dense_models["llama"], src)
    assert_user_error(run("convert", str(src), str(src), *ident("--force")), "overlaps the source")
    assert (src / "model.safetensors").is_file()


def test_unknown_recipe_field(dense_models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"experts": 4, "top_k": 4, "expertz": 3}))
    result = run("convert", str(dense_models["llama"]), str(tmp_path / "out"), "--recipe", str(recipe), "-q")
    assert_user_error(result, "unknown field 'expertz'")


def test_unknown_method(dense_models, tmp_path):
    result = run("convert", str(dense_models["llama"]), str(tmp_path / "out"), *ident("--method", "magic"))
    assert_user_error(result, "magic")


def test_nan_weight_is_named(dense_models, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(dense_models["llama"], src)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = torch.nan
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert_user_error(run("convert", str(src), str(tmp_path / "out"), *ident()), "model.layers.1.mlp.up_proj.weight", "NaN")


def test_no_space_left(dense_models, tmp_path, monkeypatch):
    from moeconv.io.stream_shard import StreamingShard

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StreamingShard, "write", full)
    out = tmp_path / "out"
    assert_user_error(run("convert", str(dense_models["llama"]), str(out), *ident()), "no space left")
    assert not out.exists(), "an interrupted output must never look complete"
    assert not list((tmp_path / "out.partial").glob("*.safetensors"))


def test_dry_run_prints_plan(dense_models, tmp_path):
    result = run("convert", str(dense_models["llama"]), str(tmp_path / "out"), "--experts", "4", "--top-k", "2",
                 "--no-router-training", "--method", "random", "--no-refit", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["experts"] == 4 and plan["layers"] == 2 and plan["peak_bytes_estimate"] > 0
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_inspect_and_env(dense_models):
    result = run("inspect", str(dense_models["gpt2"]), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["family"] == "gpt2" and info["kind"] == "dense" and info["parameters"] > 0
    result = run("env", "--json")
    assert result.exit_code == 0 and "torch" in json.loads(result.output)


def test_progress_shows_each_layers_error_recall_and_load(monkeypatch):
    import io

    from rich.console import Console

    import moeconv.cli.common as common
    from moeconv.jobs import ProgressEvent

    sink = io.StringIO()
    monkeypatch.setattr(common, "console", Console(file=sink, width=200, force_terminal=False))
    with common.layer_progress(enabled=True) as progress:
        progress(ProgressEvent("done", 0, 30, {"rel_error": 0.4, "router_recall": 0.875, "load_max_over_mean": 1.25}))
    assert "(layer 1/30) done, err 0.400, recall 0.875, load max/mean 1.250" in sink.getvalue()
