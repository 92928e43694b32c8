"""A safetensors file written tensor by tensor, so a shard never has to sit in memory whole.

The safetensors format is an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw bytes. The converter knows every output
tensor's name, shape and dtype before computing any of them (the plan), so the header can be
written first and each layer's tensors appended as soon as they exist. The safetensors package
only writes whole dicts, hence this small writer; files it writes are read back by safetensors.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from moeconv.dtypes import SAFETENSORS_CODES


class StreamingShard:
    """Write the tensors of `entries` ([(name, shape, dtype)], in that order) into `path`."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None = None,
                 check: Callable[[str, torch.Tensor], None] | None = None):
        self.path = path
        self._check = check  # called on each tensor before it is written (the writer refuses NaN/Inf)
        self._order = [name for name, _, _ in entries]
        self._spec = {name: (tuple(shape), dtype) for name, shape, dtype in entries}
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, shape, dtype in entries:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next] if self._next < len(self._order) else None
        if name != expected:
            raise RuntimeError(f"internal: shard {self.path.name} expected tensor {expected!r}, got {name!r}")
        shape, dtype = self._spec[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"internal: {name} is {tuple(tensor.shape)} {tensor.dtype}, the plan said {shape} {dtype}")
        if self._check is not None:
            self._check(name, tensor)
        # the tensor's own bytes, not a copy of them (tobytes() would double an 8B model's 2 GiB embedding)
        self._file.write(memoryview(tensor.detach().cpu().contiguous().view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"internal: shard {self.path.name} closed after {self._next} of {len(self._order)} tensors")
        self._file.flush()
        self._file.close()

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
