"""Crash-safe output: shards are written into OUT.partial/, recorded in progress.json, and OUT appears only when complete."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeconv.errors import MoeconvError
from moeconv.io.stream_shard import StreamingShard

PROGRESS = "progress.json"


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def plan_shards(unit_bytes: list[int], max_bytes: int) -> list[list[int]]:
    """Group consecutive units (globals, layer 0, layer 1, ...) into shards of at most max_bytes
    (a unit larger than max_bytes gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for unit, nbytes in enumerate(unit_bytes):
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += nbytes
    return shards


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def no_space_error(path: Path) -> MoeconvError:
    return MoeconvError(
        f"no space left on the device holding {path}; free space or choose another OUT, then rerun with --resume"
    )


class PartialOutput:
    """OUT.partial/: finished shards plus progress.json (fingerprint + finished shards with hashes)."""

    def __init__(self, out: Path, fingerprint: str, resume: bool, force: bool):
        self.out = out
        self.path = out.with_name(out.name + ".partial")
        self.fingerprint = fingerprint
        if out.exists() and not force:
            raise MoeconvError(f"{out} already exists; pass --force to replace it or choose another OUT")
        self.done: dict[str, str] = {}
        if self.path.exists():
            previous = self._read_progress()
            if not resume:
                if previous is None and not force:
                    raise MoeconvError(f"{self.path} exists but is not a moeconv partial output; remove it or choose another OUT")
                shutil.rmtree(self.path)
            elif previous is None or previous.get("fingerprint") != fingerprint:
                raise MoeconvError(
                    f"{self.path} was started with another source, recipe or calibration data; rerun without --resume to start over"
                )
            else:
                self.done = {k: v for k, v in previous["shards"].items() if self._intact(k, v)}
        self.path.mkdir(parents=True, exist_ok=True)
        self._save_progress()

    def _read_progress(self) -> dict | None:
        try:
            return json.loads((self.path / PROGRESS).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _intact(self, name: str, digest: str) -> bool:
        f = self.path / name
        return f.is_file() and _sha256(f) == digest

    def _save_progress(self) -> None:
        tmp = self.path / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "shards": self.done}, indent=1))
        os.replace(tmp, self.path / PROGRESS)

    def has_shard(self, name: str) -> bool:
        return name in self.done

    def write_shard(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.path / (name + ".tmp")
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, self.path / name)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno == errno.ENOSPC:
                raise no_space_error(self.path) from None
            raise
        self.done[name] = _sha256(self.path / name)
        self._save_progress()

    @contextmanager
    def stream_shard(self, name: str, entries: list[tuple[str, tuple[int, ...], torch.dtype]]):
        """Yield a StreamingShard for `name`; it becomes visible (and recorded) only when complete."""
        tmp = self.path / (name + ".tmp")
        shard = None
        try:
            shard = StreamingShard(tmp, entries)
            yield shard
            shard.close()
            os.replace(tmp, self.path / name)
        except OSError as err:
            if shard is not None:
                shard.abort()
            if err.errno == errno.ENOSPC:
                raise no_space_error(self.path) from None
            raise
        except BaseException:
            if shard is not None:
                shard.abort()
            raise
        self.done[name] = _sha256(self.path / name)
        self._save_progress()

    def write_text(self, name: str, text: str) -> None:
        try:
            (self.path / name).write_text(text)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise no_space_error(self.path) from None
            raise

    def write_index(self, weight_map: dict[str, str], total_size: int) -> None:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        self.write_text("model.safetensors.index.json", json.dumps(index, indent=2) + "\n")

    def finalize(self) -> Path:
        """Swap OUT.partial into place; an old OUT (with --force) is removed only after the swap."""
        (self.path / PROGRESS).unlink(missing_ok=True)
        old = None
        if self.out.exists():
            old = self.out.with_name(self.out.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out, old)
        os.replace(self.path, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out
