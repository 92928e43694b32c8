"""The healed weights written back under the student's own names, shards and dtypes."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from torch import nn

from moeconv.dtypes import FROM_SAFETENSORS_CODE
from moeconv.errors import CheckpointError
from moeconv.io.writer import PartialOutput


def write_like_student(model: nn.Module, student_dir: Path, partial: PartialOutput) -> int:
    """The healed weights under the student's own tensor names, shards and dtypes; other files copied.  -> tensors written"""

    state = model.state_dict()
    shards = sorted(student_dir.glob("*.safetensors"))
    written = 0
    for shard in shards:
        tensors = {}
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if name not in state:
                    raise CheckpointError(f"{shard.name} holds '{name}' which the loaded student lacks; the student folder is inconsistent")
                dtype = FROM_SAFETENSORS_CODE.get(f.get_slice(name).get_dtype()) or f.get_tensor(name).dtype
                tensors[name] = state[name].detach().to("cpu", dtype)
        partial.write_shard(shard.name, tensors)
        written += len(tensors)
    same = student_dir.resolve() == partial.path.resolve()  # convert heals its own OUT.partial in place
    for f in [] if same else sorted(student_dir.iterdir()):  # config, modeling code, tokenizer, recipe, provenance, index
        if f.is_file() and f.suffix != ".safetensors":
            partial.copy_in(f)
    return written
