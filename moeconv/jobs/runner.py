"""One runner for every command that writes a checkpoint: refusals first, then OUT.partial under OUT.lock, the
job's units of work (each skipped by --resume once written), and one atomic finalize."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moeconv.errors import MoeconvError
from moeconv.io.files import write_error
from moeconv.io.writer import PartialOutput, check_out_path


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


def run_job(out: Path, fingerprint: str, work: Callable[[PartialOutput], dict], *, force: bool, resume: bool,
            progress: ProgressFn | None = None) -> dict:
    """Hold OUT.lock, let `work` fill OUT.partial (it skips what partial.has_shard() says is written), then put OUT in place.

    -> what `work` returned (the job's provenance or metrics)."""
    with PartialOutput(out, fingerprint, resume=resume, force=force) as partial:
        try:
            result = work(partial)
        except OSError as err:
            raise write_error(partial.path, err) from None
        partial.finalize()
    if progress is not None:
        progress(ProgressEvent("complete"))
    return result
