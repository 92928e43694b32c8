"""Writing jobs: the one runner (plan -> OUT.partial -> units -> atomic finalize) and the checkpoint files every job writes."""

from moeconv.jobs.checkpoint import fingerprint, provenance, versions, write_checkpoint_files
from moeconv.jobs.malloc import release_freed_memory
from moeconv.jobs.runner import (
    ProgressEvent,
    ProgressFn,
    available_memory,
    check_destination,
    check_disk,
    check_memory,
    job_fingerprint,
    run_job,
)

__all__ = ["ProgressEvent", "ProgressFn", "available_memory", "check_destination", "check_disk", "check_memory", "fingerprint", "job_fingerprint", "provenance", "release_freed_memory", "run_job", "versions",
           "write_checkpoint_files"]
