"""PartialOutput's own promises: every written file readable like the user's files, NaN/Inf refused chunk by chunk."""

from __future__ import annotations

import torch


def test_written_shards_are_as_readable_as_the_users_files(tmp_path):
    """safetensors creates files 0600; a shard written by moeconv gets the mode any new file of the user's gets."""
    from moeconv.io.writer import UMASK, PartialOutput

    with PartialOutput(tmp_path / "out", "fp", resume=False, force=False) as partial:
        partial.write_shard("model-00001-of-00001.safetensors", {"w": torch.ones(2)})
        partial.write_text("config.json", "{}")
        partial.finalize()
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == {"model-00001-of-00001.safetensors": 0o666 & ~UMASK, "config.json": 0o666 & ~UMASK}


def test_finite_check_sees_every_chunk():
    from moeconv.io.validate import all_finite

    t = torch.zeros(10, 7)
    assert all_finite(t, chunk=3) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i in (0, 35, 69):  # first chunk, a chunk boundary, the short last chunk
            u = t.clone()
            u.view(-1)[i] = bad
            assert not all_finite(u, chunk=3), (bad, i)


def test_resume_sweeps_what_a_killed_save_left(tmp_path):
    """A SIGKILL inside safetensors' save_file leaves its Rust temp file (.tmpXXXXXX) in OUT.partial; a resume removes
    it with moeconv's own .tmp files and scratch folders, so it never reaches OUT (a CI run once found one there)."""
    from moeconv.io.writer import PartialOutput

    with PartialOutput(tmp_path / "out", "fp", resume=False, force=False) as partial:
        partial.write_text("config.json", "{}")
        for name in (".tmp54XBKJ", "model.safetensors.tmp"):
            (partial.path / name).write_bytes(b"")
        (partial.path / ".saving-abc").mkdir()
        (partial.path / ".tmpkeep").write_bytes(b"x")  # not the crate's pattern (5 characters): a user's file stays
    with PartialOutput(tmp_path / "out", "fp", resume=True, force=False) as partial:
        partial.finalize()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".tmpkeep", "config.json"]
