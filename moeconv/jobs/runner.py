"""One runner for every command that writes a checkpoint: refusals first, then OUT.partial under OUT.lock, the
job's units of work (each skipped by --resume once written), and one atomic finalize."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moeconv.errors import MoeconvError
from moeconv.io.files import write_error
from moeconv.io.writer import PartialOutput, check_out_path
from moeconv.jobs.malloc import keep_large_buffers_mapped


@dataclass
class ProgressEvent:
    """What a job is doing: `(layer i/N) stage`."""

    stage: str
    layer: int | None = None
    layers: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


ProgressFn = Callable[[ProgressEvent], None]


def job_fingerprint(**parts) -> str:
    """Identifies what a job computes from (source hashes, settings, data): a partial output resumes only under the same one."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def check_destination(src: str | Path, out: Path, force: bool) -> Path:
    """OUT, refused before any compute where writing it would touch the source or the user's files."""
    source = Path(src).expanduser().resolve()
    target = out.expanduser().resolve()
    if source.exists() and (target == source or source in target.parents or target in source.parents):
        raise MoeconvError(f"OUT {out} overlaps the source {src}; choose an OUT outside the source so the input stays untouched")
    if source.is_file() and target == source.parent:
        raise MoeconvError(f"OUT {out} is the folder holding the source {src}; choose another OUT")
    target = check_out_path(out)
    if target.exists() and not force:
        raise MoeconvError(f"{out} already exists; pass --force to replace it or choose another OUT")
    return target


def available_memory() -> int | None:
    """Bytes the system can give this process without swapping (MemAvailable of /proc/meminfo); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_disk(out: Path, needed: int, resume: bool = False) -> None:
    """Refuse before compute when the filesystem that will hold OUT.partial has less free space than `needed` bytes
    (what is already in OUT.partial counts towards it on --resume)."""
    target = out.expanduser().resolve()
    folder = target.parent
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    partial = target.with_name(target.name + ".partial")
    written = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file()) if resume and partial.is_dir() else 0
    free = shutil.disk_usage(folder).free
    if free + written < needed:
        raise MoeconvError(f"not enough disk space for {out}: the output needs {_gib(needed)} ({needed} bytes) but {folder} has "
                           f"{_gib(free)} free{f' (+{_gib(written)} already written)' if written else ''}; free "
                           f"{_gib(needed - free - written)} or choose an OUT on another disk")


def check_memory(needed: int, what: str, fix: str) -> None:
    """Refuse before compute when the planned peak memory (`what` says of what) exceeds the memory available now."""
    free = available_memory()
    if free is not None and needed > free:
        raise MoeconvError(f"not enough memory: the plan needs about {_gib(needed)} ({what}) but {_gib(free)} is available; {fix}")


def run_job(out: Path, fingerprint: str, work: Callable[[PartialOutput], dict], *, force: bool, resume: bool,
            progress: ProgressFn | None = None) -> dict:
    """Hold OUT.lock, let `work` fill OUT.partial (it skips what partial.has_shard() says is written), then put OUT in place.

    -> what `work` returned (the job's provenance or metrics)."""
    keep_large_buffers_mapped()  # a long job's freed layers must not stay in the heap (moeconv/jobs/malloc.py)
    with PartialOutput(out, fingerprint, resume=resume, force=force) as partial:
        try:
            result = work(partial)
        except OSError as err:
            raise write_error(partial.path, err) from None
        partial.finalize()
    if progress is not None:
        progress(ProgressEvent("complete"))
    return result
