"""A dense .gguf as a transformers model, filled tensor by tensor from the lazy reader.

transformers' own GGUF path dequantizes every tensor into float32 arrays before it builds the model, so loading an
8B GGUF peaks near 32 GB plus the model; here the model is built without weights (init_empty_weights keeps the real
buffers such as rotary tables) and each parameter is read, dequantized and cast on its own: peak = the model in the
requested dtype + one tensor in float32.  The values equal transformers' loader (tests/test_gguf_model.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoModelForCausalLM

from moeconv.io.readers import GGUFReader
from moeconv.io.validate import raise_if_inconsistent


def load_gguf_model(file: Path, dtype: torch.dtype, attn_implementation: str | None) -> torch.nn.Module:
    """The model of a dense `file` on the CPU in `dtype`, eval mode.  Errors (unreadable file or type, a MoE GGUF,
    tensors that do not fit the metadata) are one-line CheckpointErrors from the reader and the validator."""
    reader = GGUFReader(file)
    reader.validate()  # tensors against the metadata's config, before anything is allocated
    config = reader.config
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        except ValueError:  # a family without the requested attention kernel (gemma2 has no sdpa)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    model.tie_weights()  # before listing: a tied head is the embedding's Parameter, listed (and read) once
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if not reader.has(name)]
    raise_if_inconsistent(str(file), config, [n for n in names if n not in missing], missing, [], [])
    for name in names:
        set_module_tensor_to_device(model, name, "cpu", value=reader.get(name).to(dtype))
    model.tie_weights()  # the output head shares the (replaced) embedding Parameter again
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:  # never hand out a model with unfilled weights
        raise_if_inconsistent(str(file), config, [n for n in names if n not in leftover], leftover, [], [])
    return model.eval()
