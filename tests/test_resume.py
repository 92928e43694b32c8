"""Interruption: SIGKILL during convert, then --resume, gives byte-identical output; a partial OUT never looks complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_dense, sample_text, save_char_tokenizer


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _convert_cmd(src: Path, out: Path, text: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moeconv.cli.app", "convert", str(src), str(out), "--experts", "6", "--top-k", "2",
            "--method", "random", "--calib", str(text), "--calib-tokens", "2048", "--seqlen", "64",
            "--max-shard-size", "1KB", "-q", *extra]


@pytest.mark.parametrize("inputs", ["dense", "converted"])
def test_sigkill_then_resume_is_byte_identical(tmp_path, inputs):
    """Also with calibration on the converted stream, whose states (both streams) must resume with the shards."""
    src = build_dense("llama", tmp_path / "dense", num_hidden_layers=10)
    save_char_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text())
    extra = ("--calib-inputs", inputs)

    reference = tmp_path / "reference"
    subprocess.run(_convert_cmd(src, reference, text, *extra), check=True)

    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    proc = subprocess.Popen(_convert_cmd(src, out, text, *extra))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads((partial / "progress.json").read_text())["shards"]
        except (OSError, json.JSONDecodeError, KeyError):
            done = {}
        if len(done) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the conversion finished before it could be interrupted"
    assert not out.exists(), "an interrupted conversion must not leave a complete-looking OUT"
    assert partial.is_dir()

    subprocess.run(_convert_cmd(src, out, text, *extra, "--resume"), check=True)
    assert not partial.exists()
    assert _files(out) == _files(reference)


def test_resume_refuses_other_recipe(tmp_path):
    src = build_dense("llama", tmp_path / "dense", num_hidden_layers=2)
    save_char_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text())
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "progress.json").write_text(json.dumps({"fingerprint": "something-else", "shards": {}}))
    result = subprocess.run(_convert_cmd(src, tmp_path / "out", text, "--resume"), capture_output=True, text=True)
    assert result.returncode == 2
    assert "another source, recipe or calibration" in result.stderr and "Traceback" not in result.stderr
