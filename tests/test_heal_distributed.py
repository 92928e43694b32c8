"""Heal on several processes (issue 16): `accelerate launch -m moeconv.cli heal` with 2 CPU processes (gloo, DDP)
follows the single-process loss curve at the same global batch, and a killed multi-process heal resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
from heal_support import SEQ, heal_models
from safetensors.torch import load_file
from typer.testing import CliRunner

from moeconv.cli.app import app


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return heal_models(tmp_path_factory.mktemp("heal-ddp"))


def _recipe(lab, name: str, steps: int, checkpoint_every: int = 0):
    """Float32 (bf16 rounding would turn a reordered gradient sum into visible differences) on the fast engine."""
    path = lab["root"] / f"{name}.yaml"
    path.write_text(f"heal:\n  tokens: {SEQ * 4 * steps}\n  seqlen: {SEQ}\n  batch: 4\n  micro_batch: 2\n  lr: 3.0e-3\n"
                    f"  warmup: 0.1\n  mixed_precision: 'no'\n  source: {lab['train']}\n  checkpoint_every: {checkpoint_every}\n")
    return path


def _args(lab, out, recipe) -> list[str]:
    return ["heal", str(lab["moe"]), str(out), "--teacher", str(lab["dense"]), "--recipe", str(recipe), "--device", "cpu",
            "--json", "-q"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], processes: int = 2) -> subprocess.Popen:
    """The documented command: accelerate launch --multi_gpu --num_processes N -m moeconv.cli heal ... (gloo on CPUs)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_port()),
               "-m", "moeconv.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(args: list[str]) -> dict:
    proc = _launch(args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)  # one document: the main process alone reports


def _history(out) -> list[dict]:
    return json.loads((out / "heal.json").read_text())["history"]


def test_two_processes_follow_the_single_process_loss_curve(lab, tmp_path):
    recipe = _recipe(lab, "curve", steps=3)
    one = CliRunner().invoke(app, _args(lab, tmp_path / "one", recipe))
    assert one.exit_code == 0, one.output
    two = _run(_args(lab, tmp_path / "two", recipe))
    assert two["steps"] == 3 and two["main_process"]
    h1, h2 = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert len(h1) == len(h2) == 3
    for a, b in zip(h1, h2, strict=True):
        for key in ("loss", "kl", "ce", "grad_norm_body", "grad_norm_router"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)
    assert h1[-1]["loss"] < h1[0]["loss"]  # it trains: the curve compared is not flat
    (shard,) = [f.name for f in (tmp_path / "one").glob("*.safetensors")]
    w1, w2, w0 = (load_file(str(d / shard)) for d in (tmp_path / "one", tmp_path / "two", lab["moe"]))
    moved = max(float((w1[k] - w0[k]).abs().max()) for k in w0)
    gap = max(float((w1[k] - w2[k]).abs().max()) for k in w0)
    assert moved > 1e-3 and gap < 1e-3 * moved, (moved, gap)  # same weights up to float summation order
    assert not (tmp_path / "two.partial").exists() and not (tmp_path / "two.lock").exists()


@pytest.mark.slow
def test_killed_multi_process_heal_resumes_to_the_uninterrupted_result(lab, tmp_path):
    steps = 12
    recipe = _recipe(lab, "resume", steps=steps, checkpoint_every=2)
    _run(_args(lab, tmp_path / "clean", recipe))
    killed = tmp_path / "killed"
    proc = _launch(_args(lab, killed, recipe))
    meta = tmp_path / "killed.partial" / "heal-state" / "heal.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if meta.is_file() and json.loads(meta.read_text() or "{}").get("step", 0) >= 2:
            for child in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                child.send_signal(signal.SIGKILL)  # both training processes (own session) and the launcher, mid-heal
            break
        time.sleep(0.02)
    proc.communicate(timeout=60)
    assert not killed.exists(), "the heal finished before the kill; the test proved nothing"
    resumed = _run([*_args(lab, killed, recipe), "--resume"])
    assert 2 <= resumed["resumed_from_step"] < steps
    assert (killed / "heal.json").read_bytes() == (tmp_path / "clean" / "heal.json").read_bytes()
    for shard in (tmp_path / "clean").glob("*.safetensors"):
        a, b = load_file(str(shard)), load_file(str(killed / shard.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
