"""Crash-safe output: shards are written into OUT.partial/, recorded in progress.json, and OUT appears only when complete.

Every file in OUT.partial is written to a temp name, fsynced and renamed, so a kill at any instant leaves
either the old file or the new one; OUT itself appears (or replaces a previous moeconv output) in one rename.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from moeconv.errors import MoeconvError
from moeconv.io.files import (
    atomic_write_text,
    exchange,
    fsync_dir,
    sha256_file,
    strict_json,
    write_error,
    written_atomically,
)
from moeconv.io.lock import OutputLock
from moeconv.io.stream_shard import StreamingShard
from moeconv.io.validate import all_finite

PROGRESS = "progress.json"
UMASK = os.umask(0o022)
os.umask(UMASK)  # read once (os.umask can only be read by setting it); restored at once
# The self-contained modeling code copied into every moeconv checkpoint (torch + transformers only).
HF_DIR = Path(__file__).parents[1] / "modeling" / "hf"
HF_FILES = ("configuration_moeconv.py", "modeling_moeconv.py", "moe_block.py", "dag.py", "quant_linear.py")
# Files that mark a folder as one moeconv wrote (convert, quantize, dag: provenance.json; heal of a dense model: heal.json).
OUTPUT_MARKERS = ("provenance.json", "heal.json")

RUST_TEMPFILE = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # the tempfile crate's default name: ".tmp" + 6 random characters


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


def check_out_path(out: Path) -> Path:
    """OUT as an absolute path, refused where writing a folder there could harm the user's files."""
    target = out.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents or target == Path.home().resolve() or target.parent == target:
        raise MoeconvError(f"OUT '{out}' is the current folder, one of its parents or the home folder; name a new folder for the output")
    if target.exists() and not target.is_dir():
        raise MoeconvError(f"OUT '{out}' is a file; moeconv writes a folder there: remove the file or choose another OUT")
    return target


def is_moeconv_output(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in OUTPUT_MARKERS)


class PartialOutput:
    """OUT.partial/: finished shards plus progress.json (fingerprint + finished shards with hashes).

    Holds OUT.lock from construction until finalize() or close(); use it as a context manager.
    """

    def __init__(self, out: Path, fingerprint: str, resume: bool, force: bool):
        self.out = check_out_path(Path(out))
        self.path = self.out.with_name(self.out.name + ".partial")
        # progress.json waits here while OUT.partial is renamed to OUT: a kill in between still resumes
        self.parked_progress = self.out.with_name(self.out.name + ".progress.json")
        self.fingerprint = fingerprint
        self.lock = OutputLock(self.out).acquire()
        try:
            self._open(resume, force)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, resume: bool, force: bool) -> None:
        if self.out.exists():
            if not force:
                raise MoeconvError(f"{self.out} already exists; pass --force to replace it or choose another OUT")
            if any(self.out.iterdir()) and not is_moeconv_output(self.out):
                raise MoeconvError(f"{self.out} holds files moeconv did not write (no provenance.json); --force replaces only "
                                   "moeconv outputs: remove it yourself or choose another OUT")
        self.done: dict[str, str] = {}
        self.pending: dict[str, str] = {}  # shard -> the hash it had before a rewrite that may not have landed
        self.state: dict = {}  # a job's own resumable state (per-layer metrics, a finished heal ...), never part of OUT
        if self.out.exists() and not self.path.exists():
            self.parked_progress.unlink(missing_ok=True)  # left by a run killed after its rename: OUT is complete
        if self.path.exists():
            previous = self._read_progress()
            if not resume:
                if previous is None and not force:
                    raise MoeconvError(f"{self.path} exists but is not a moeconv partial output; remove it or choose another OUT")
                shutil.rmtree(self.path)
            elif previous is None or previous.get("fingerprint") != self.fingerprint:
                raise MoeconvError(
                    f"{self.path} was started with another source, recipe or calibration data; rerun without --resume to start over"
                )
            else:
                earlier = previous.get("pending", {})
                self.done = {k: d for k, v in previous["shards"].items() if (d := self._intact(k, {v, earlier.get(k)}))}
                self.state = previous.get("state", {})
                self._sweep()
        self.parked_progress.unlink(missing_ok=True)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(self.path, err) from None
        self._save_progress()

    def _sweep(self) -> None:
        """Remove what a killed run was in the middle of writing (temp files, scratch folders): never part of OUT."""
        for leftover in self.path.iterdir():
            # ours end in .tmp; safetensors' save_file writes through a Rust NamedTempFile named .tmpXXXXXX in place
            if (leftover.name.endswith(".tmp") or RUST_TEMPFILE.fullmatch(leftover.name)) and leftover.is_file():
                leftover.unlink()
            elif leftover.name.startswith(".saving-") and leftover.is_dir():
                shutil.rmtree(leftover)

    def __enter__(self) -> PartialOutput:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release OUT.lock; OUT.partial stays for --resume unless finalize() ran."""
        self.lock.release()

    def _read_progress(self) -> dict | None:
        where = self.path / PROGRESS if (self.path / PROGRESS).is_file() else self.parked_progress
        try:
            progress = json.loads(where.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return progress if isinstance(progress, dict) and isinstance(progress.get("shards"), dict) else None

    def _intact(self, name: str, digests: set) -> str | None:
        """The shard's hash if the file on disk is one the progress record vouches for, else None."""
        f = self.path / name
        digest = sha256_file(f) if f.is_file() else None
        return digest if digest in digests else None

    def _save_progress(self) -> None:
        record = {"fingerprint": self.fingerprint, "shards": self.done, "pending": self.pending, "state": self.state}
        atomic_write_text(self.path / PROGRESS, strict_json(record, indent=1))

    def save_state(self, key: str, value) -> None:
        """Keep `value` (JSON) with the progress record: it survives a kill, resumes with the partial, never reaches OUT."""
        self.state[key] = value
        self._save_progress()

    def has_shard(self, name: str) -> bool:
        return name in self.done

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """A safetensors file in OUT.partial, whole or absent after any crash (not recorded as a shard)."""
        with written_atomically(self.path / name, self.path) as tmp:
            _save_safetensors(tmp, tensors)

    def write_shard(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write (or rewrite) a shard; its hash is recorded before the rename, so a kill on either side of it resumes."""
        for key, value in tensors.items():
            check_finite(key, value)
        with written_atomically(self.path / name, self.path) as tmp:
            _save_safetensors(tmp, tensors)
            if name in self.done:
                self.pending[name] = self.done[name]
            self.done[name] = sha256_file(tmp)
            self._save_progress()
        self.pending.pop(name, None)
        self._save_progress()

    @contextmanager
    def stream_shard(self, name: str, entries: list[tuple[str, tuple[int, ...], torch.dtype]]):
        """Yield a StreamingShard for `name`; it becomes visible (and recorded) only when complete."""
        with written_atomically(self.path / name, self.path) as tmp:
            shard = StreamingShard(tmp, entries, check=check_finite)
            try:
                yield shard
                shard.close()
            except BaseException:
                shard.abort()  # closes the file; written_atomically removes it
                raise
        self.done[name] = sha256_file(self.path / name)
        self._save_progress()

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def write_json(self, name: str, data) -> None:
        """Strict JSON (a non-finite float is written as null, never as a NaN literal that parsers reject)."""
        self.write_text(name, strict_json(data) + "\n")

    def copy_in(self, source: Path, name: str | None = None) -> None:
        """Copy a file into OUT.partial atomically."""
        with written_atomically(self.path / (name or source.name), self.path) as tmp:
            shutil.copyfile(source, tmp)

    def write_modeling_code(self) -> None:
        for name in HF_FILES:
            self.copy_in(HF_DIR / name)

    def write_saved(self, save: Callable[[Path], None]) -> None:
        """Let `save(folder)` (a save_pretrained) write into a scratch folder, then move each file in atomically."""
        with tempfile.TemporaryDirectory(dir=self.path, prefix=".saving-") as scratch:
            try:
                save(Path(scratch))
            except OSError as err:
                raise write_error(self.path, err) from None
            for f in sorted(Path(scratch).iterdir()):
                if f.is_file():
                    self.copy_in(f)

    def write_index(self, weight_map: dict[str, str], total_size: int) -> None:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        self.write_text("model.safetensors.index.json", json.dumps(index, indent=2) + "\n")

    def finalize(self) -> Path:
        """Put OUT.partial in place of OUT in one atomic step; a previous OUT (with --force) is removed only after it."""
        try:
            os.replace(self.path / PROGRESS, self.parked_progress)
            fsync_dir(self.path)
            trash = self.out.with_name(f".{self.out.name}.replaced-{os.getpid()}")  # never a name the user chose
            if self.out.exists() and exchange(self.path, self.out):
                os.replace(self.path, trash)  # OUT.partial now holds the previous output
                shutil.rmtree(trash)
            elif self.out.exists():  # no atomic exchange on this file system: two renames
                os.replace(self.out, trash)
                os.replace(self.path, self.out)
                shutil.rmtree(trash)
            else:
                os.replace(self.path, self.out)
            fsync_dir(self.out.parent)
            self.parked_progress.unlink()
            fsync_dir(self.out.parent)
        except OSError as err:
            raise write_error(self.out, err) from None
        finally:
            self.close()
        return self.out


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written from each tensor's own bytes in turn: safetensors' save_file serializes the whole
    shard into one buffer first, a second copy of it in memory (GiBs at 8B)."""
    items = sorted(tensors.items())  # by name: the bytes must not depend on the order a run happened to build the dict
    shard = StreamingShard(path, [(k, tuple(v.shape), v.dtype) for k, v in items], metadata={"format": "pt"})
    try:
        for key, value in items:
            shard.write(key, value)
        shard.close()
    except BaseException:
        shard.abort()
        raise


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse to write a NaN or Inf: an output is never computed from (or into) broken numbers."""
    if not all_finite(tensor):
        raise MoeconvError(f"output tensor '{name}' came out NaN or Inf, so nothing was written; rerun with -v to see "
                           "which layer and stage produced it, and check the source and recipe")
