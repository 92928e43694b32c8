"""Bad inputs and faults a new user meets: each ends in one line and a non-zero exit, or a correct result, and nothing is lost.

Each test reproduces a defect that main had before the fix (issue 14); where the behaviour is the CLI's own
(signals, terminals, locks held by another process) the CLI runs as a real subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import build_dense, sample_text, save_char_tokenizer
from moeconv.cli.app import app

runner = CliRunner()
IDENTITY = ["--experts", "4", "--top-k", "4", "--no-router-training", "--method", "random", "-q"]


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def cli(*args: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeconv.cli.app", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, **kwargs)


def one_line_error(output: str, code: int, result_code: int, *needles: str) -> None:
    assert result_code == code, output
    assert "Traceback" not in output, output
    text = " ".join(output.split())
    assert "error:" in text, output
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


@pytest.fixture
def src(dense_models, tmp_path) -> Path:
    """A private copy of the tiny llama with a tokenizer, free to damage."""
    folder = tmp_path / "src"
    shutil.copytree(dense_models["llama"], folder)
    save_char_tokenizer(folder)
    return folder


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# 1. a single-file pytorch_model.bin source
def test_single_file_bin_source_converts_like_safetensors(src, tmp_path):
    ref = tmp_path / "ref"
    assert run("convert", str(src), str(ref), *IDENTITY).exit_code == 0
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    out = tmp_path / "out"
    result = run("convert", str(src), str(out), *IDENTITY)
    assert result.exit_code == 0, result.output
    shard = "model-00001-of-00001.safetensors"
    assert load_file(str(out / shard)).keys() == load_file(str(ref / shard)).keys()
    for name, tensor in load_file(str(out / shard)).items():
        assert torch.equal(tensor, load_file(str(ref / shard))[name]), name


def test_malicious_pickle_is_never_executed(src, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    (src / "model.safetensors").unlink()
    with open(src / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": Evil()}, fh)
    result = run("convert", str(src), str(tmp_path / "out"), *IDENTITY)
    one_line_error(result.output, 2, result.exit_code, "cannot be read safely")
    assert not (tmp_path / "ran").exists()


# 2. two runs into the same OUT
def test_second_run_into_a_locked_out_is_refused_at_once(src, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from moeconv.io.lock import OutputLock; "
        f"OutputLock(Path({str(out)!r})).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.time()
        result = cli("convert", str(src), str(out), *IDENTITY)
        one_line_error(result.stderr, 2, result.returncode, f"pid {holder.pid}", "choose another OUT")
        assert time.time() - started < 60 and not out.exists() and not (tmp_path / "out.partial").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale, taken over, and the run completes
    result = cli("convert", str(src), str(out), *IDENTITY)
    assert result.returncode == 0, result.stderr
    assert (out / "provenance.json").is_file() and not (tmp_path / "out.lock").exists()


def test_lock_from_another_host_names_the_command_to_clear_it(src, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "out.lock").write_text(json.dumps({"pid": 1, "host": "some-other-host"}))
    result = run("convert", str(src), str(out), *IDENTITY)
    one_line_error(result.output, 2, result.exit_code, "some-other-host", f"rm {tmp_path / 'out.lock'}")


# 3. eval of a checkpoint that does not match its config, or computes NaN
def _converted(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "moe"
    assert run("convert", str(src), str(out), *IDENTITY).exit_code == 0
    return out


def _eval(model: Path, tmp_path: Path, *extra: str):
    text = tmp_path / "eval.txt"
    text.write_text(sample_text(4000, seed=3))
    return run("eval", str(model), "--data", str(text), "--seqlen", "32", "--max-tokens", "256", "-q", *extra)


def test_eval_refuses_missing_layers(src, tmp_path):
    moe = _converted(src, tmp_path)
    cfg = json.loads((moe / "config.json").read_text())  # moeconv's config keeps the source's under base_config
    cfg["base_config"]["num_hidden_layers"] = 40
    cfg["moe"]["layers"] = list(range(40))
    (moe / "config.json").write_text(json.dumps(cfg))
    result = _eval(moe, tmp_path)
    one_line_error(result.output, 2, result.exit_code, "40 layers", "weights hold 2", "missing")


def test_eval_refuses_a_missing_router(src, tmp_path):
    moe = _converted(src, tmp_path)
    shard = moe / "model-00001-of-00001.safetensors"
    tensors = load_file(str(shard))
    del tensors["model.layers.1.mlp.router.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((moe / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.router.weight"]
    (moe / "model.safetensors.index.json").write_text(json.dumps(index))
    result = _eval(moe, tmp_path)
    one_line_error(result.output, 2, result.exit_code, "model.layers.1.mlp.router.weight", "missing")


def test_eval_refuses_nan_perplexity_naming_the_first_broken_module(src, tmp_path):
    moe = _converted(src, tmp_path)
    shard = moe / "model-00001-of-00001.safetensors"
    tensors = load_file(str(shard))
    tensors["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    result = _eval(moe, tmp_path, "--json", str(tmp_path / "r.json"))
    one_line_error(result.output, 2, result.exit_code, "NaN or Inf", "model.layers.1.self_attn.o_proj")
    assert not (tmp_path / "r.json").exists()


def test_json_output_is_strict():
    from moeconv.io.files import strict_json

    text = strict_json({"a": float("nan"), "b": [float("inf"), 1.5]})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}")) == {"a": None, "b": [None, 1.5]}


def test_eval_truncated_safetensors(src, tmp_path):
    moe = _converted(src, tmp_path)
    shard = moe / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:5000])
    result = _eval(moe, tmp_path)
    one_line_error(result.output, 2, result.exit_code, "truncated or corrupt")


# 4. NaN outside the FFN
def test_nan_in_the_embeddings_is_named(src, tmp_path):
    _edit_tensors(src, lambda t: t["model.embed_tokens.weight"].__setitem__((5, 3), float("nan")))
    result = run("convert", str(src), str(tmp_path / "out"), "--experts", "4", "--top-k", "2", "--calib-tokens", "512",
                 "--seqlen", "32", "-q")
    one_line_error(result.output, 2, result.exit_code, "model.embed_tokens.weight", "NaN")
    assert not (tmp_path / "out").exists()


# 5. a tokenizer that names custom code: its code is never run and never asked about
@pytest.mark.parametrize("local_class", [True, False], ids=["with-local-class", "custom-only"])
def test_tokenizer_naming_custom_code_never_runs_it_nor_prompts(src, tmp_path, local_class):
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    if not local_class:
        del cfg["tokenizer_class"]
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    (src / "evil_tokenizer.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n")
    result = cli("convert", str(src), str(tmp_path / "out"), "--experts", "4", "--top-k", "2", "--calib-tokens", "512",
                 "--seqlen", "32", "-q")
    if local_class:  # the files it ships are a stock tokenizer: used as such
        assert result.returncode == 0, result.stderr
    else:
        one_line_error(result.stderr, 2, result.returncode, "needs its own code, which moeconv never runs")
    assert "[y/N]" not in result.stdout + result.stderr and not (tmp_path / "ran").exists()


# 6. --force
def test_force_refuses_a_file_at_out(src, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file of the user's")
    result = run("convert", str(src), str(out), *IDENTITY, "--force")
    one_line_error(result.output, 2, result.exit_code, "is a file")
    assert out.read_text() == "a file of the user's" and not (tmp_path / "out.old").exists()


def test_force_replaces_only_moeconv_outputs_and_never_a_users_old(src, tmp_path):
    out, old = tmp_path / "out", tmp_path / "out.old"
    old.mkdir()
    (old / "mine.txt").write_text("precious")
    out.mkdir()
    (out / "notes.txt").write_text("also precious")
    one_line_error(run("convert", str(src), str(out), *IDENTITY, "--force").output, 2, 2, "did not write")
    assert (out / "notes.txt").read_text() == "also precious"
    (out / "notes.txt").unlink()
    assert run("convert", str(src), str(out), *IDENTITY, "--force").exit_code == 0  # an empty folder holds nothing to lose
    assert run("convert", str(src), str(out), *IDENTITY, "--force", "--top-k", "2", "--no-refit", "--experts", "4").exit_code == 0
    assert json.loads((out / "config.json").read_text())["moe"]["top_k"] == 2
    assert (old / "mine.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.old", "src"]


# 7. more one-line errors
def test_out_that_is_the_current_folder(src, tmp_path, monkeypatch):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for target in (".", str(tmp_path / "a")):
        one_line_error(run("convert", str(src), target, *IDENTITY, "--force").output, 2, 2, "current folder")
    assert work.is_dir() and src.is_dir()


@pytest.mark.parametrize("errno_name", ["EACCES", "EROFS"])
def test_unwritable_out(src, tmp_path, monkeypatch, errno_name):
    import errno

    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    result = run("convert", str(src), str(tmp_path / "out"), *IDENTITY)
    one_line_error(result.output, 2, result.exit_code, "permission" if errno_name == "EACCES" else "read-only")


@pytest.mark.parametrize("layers,needle", [(5, "config.json says 5 layers, the weights hold 2"),
                                           (1, "config.json says 1 layers, the weights hold 2")])
def test_config_layer_count_differs_from_weights(src, tmp_path, layers, needle):
    _edit_config(src, num_hidden_layers=layers)
    result = run("convert", str(src), str(tmp_path / "out"), *IDENTITY)
    one_line_error(result.output, 2, result.exit_code, needle)
    assert not (tmp_path / "out.partial").exists()


def test_tensor_shape_differs_from_config(src, tmp_path):
    _edit_tensors(src, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.weight", torch.zeros(32, 16)))
    result = run("convert", str(src), str(tmp_path / "out"), *IDENTITY)
    one_line_error(result.output, 2, result.exit_code, "model.layers.0.self_attn.o_proj.weight", "wrong shape")
    assert not (tmp_path / "out.partial").exists()


def test_corrupt_tokenizer_json(src, tmp_path):
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"')
    result = run("convert", str(src), str(tmp_path / "out"), "--experts", "4", "--top-k", "2", "--calib-tokens", "512",
                 "--seqlen", "32", "-q")
    one_line_error(result.output, 2, result.exit_code, "tokenizer", "cannot be read")


def test_truncated_gguf(tmp_path):
    from conftest import real_model_path

    real = real_model_path()
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(real.read_bytes()[:2048] if real else b"GGUF\x03\x00\x00\x00" + b"\x01" * 2040)
    result = run("convert", str(gguf), str(tmp_path / "out"), *IDENTITY)
    one_line_error(result.output, 2, result.exit_code, "truncated")


# 8. what a serving script needs next to the weights
def test_generation_config_is_carried(src, tmp_path):
    moe = _converted(src, tmp_path)
    assert json.loads((moe / "generation_config.json").read_text()) == json.loads((src / "generation_config.json").read_text())


# Identity needs no text; calibration without a tokenizer says so
def test_identity_needs_no_calibration_text(src, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    result = run("convert", str(src), str(tmp_path / "out"), "--experts", "4", "--top-k", "4", "--method", "random",
                 "--calib", str(tmp_path / "none.txt"), "-q")
    assert result.exit_code == 0, result.output
    result = run("convert", str(src), str(tmp_path / "out2"), "--experts", "4", "--top-k", "2", "-q")
    one_line_error(result.output, 2, result.exit_code, "calibration needs a tokenizer", "has no tokenizer")


def test_shared_neurons_without_router_training_gets_its_calibration(src, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(sample_text(8000))
    result = run("convert", str(src), str(tmp_path / "out"), "--experts", "4", "--top-k", "2", "--shared-neurons", "8",
                 "--no-router-training", "--method", "random", "--no-refit", "--calib", str(text), "--calib-tokens", "512", "--seqlen", "32", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["moe"]["shared_size"] == 8


# 9. SIGTERM, logs, and a resume fingerprint that covers config.json
def test_sigterm_keeps_partial_exits_143_and_leaves_no_temp_file(tmp_path):
    src = build_dense("llama", tmp_path / "dense", num_hidden_layers=8)
    save_char_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text())
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    proc = subprocess.Popen([sys.executable, "-m", "moeconv.cli.app", "convert", str(src), str(out), "--experts", "6",
                             "--top-k", "2", "--method", "random", "--calib", str(text), "--calib-tokens", "4096",
                             "--seqlen", "64", "--max-shard-size", "1KB"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(partial.glob("model-*.safetensors")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "terminated" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert partial.is_dir() and not out.exists()
    assert not [p.name for p in partial.iterdir() if p.name.endswith(".tmp")]
    assert not (tmp_path / "out.lock").exists()


def test_progress_off_a_terminal_is_plain_lines(src, tmp_path):
    result = cli("convert", str(src), str(tmp_path / "out"), "--experts", "4", "--top-k", "2", "--calib-tokens", "512",
                 "--seqlen", "32")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "(layer 1/2) done" in result.stderr and "(layer 2/2) done" in result.stderr
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr and len(lines) < 20, result.stderr


def test_resume_refuses_a_changed_config(src, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "out.partial").mkdir()
    from moeconv.config import load_recipe
    from moeconv.convert import convert
    from moeconv.io.readers import open_checkpoint
    from moeconv.jobs import fingerprint

    recipe = load_recipe(None, {"experts": 4, "top_k": 4, "train_router": False, "partition.method": "random"})
    before = fingerprint(open_checkpoint(src), recipe, "none")
    _edit_config(src, rms_norm_eps=1e-3)
    assert fingerprint(open_checkpoint(src), recipe, "none") != before
    (tmp_path / "out.partial" / "progress.json").write_text(json.dumps({"fingerprint": before, "shards": {}}))
    with pytest.raises(Exception, match="another source"):
        convert(str(src), out, recipe, resume=True)


def test_killed_between_the_last_write_and_the_rename_resumes(src, tmp_path, monkeypatch):
    """A kill after finalize() parked progress.json beside OUT but before OUT.partial became OUT: --resume completes."""
    import moeconv.io.writer as writer

    reference = tmp_path / "reference"
    assert run("convert", str(src), str(reference), *IDENTITY).exit_code == 0
    real_replace = writer.os.replace

    def killed_at_the_rename(a, b):
        if str(a).endswith(".partial") and not str(b).endswith(".partial"):
            raise KeyboardInterrupt  # what SIGKILL leaves: progress parked, OUT.partial complete, no OUT
        return real_replace(a, b)

    monkeypatch.setattr(writer.os, "replace", killed_at_the_rename)
    out = tmp_path / "out"
    assert run("convert", str(src), str(out), *IDENTITY).exit_code == 130
    assert (tmp_path / "out.partial").is_dir() and (tmp_path / "out.progress.json").is_file() and not out.exists()
    monkeypatch.setattr(writer.os, "replace", real_replace)
    result = run("convert", str(src), str(out), *IDENTITY, "--resume")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference", "src"]
    for f in reference.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
