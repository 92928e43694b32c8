"""Load any model moeconv can read (dense folder, .gguf, moeconv checkpoint) as a transformers model + tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from moeconv.dtypes import DTYPES
from moeconv.errors import CheckpointError, MoeconvError
from moeconv.io import registration  # noqa: F401 - AutoConfig/AutoModelForCausalLM know 'moeconv'
from moeconv.io.gguf_model import load_gguf_model
from moeconv.io.validate import raise_if_inconsistent

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda if available else cpu; anything else is checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MoeconvError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoeconvError(f"device '{device}' asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def resolve_dtype(dtype: str, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype == "auto":
        return default
    if dtype not in DTYPES:
        raise MoeconvError(f"unknown dtype '{dtype}'; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_source(path: str | Path) -> tuple[str, dict]:
    """(folder, extra from_pretrained kwargs) for a folder or a .gguf file."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if (p / "config.json").is_file():
            return str(p), {}
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), {"gguf_file": ggufs[0].name}
        raise CheckpointError(f"{p} has no config.json and no single .gguf file; pass a model folder or a .gguf file")
    raise CheckpointError(f"{path} does not exist or is not a model; pass a model folder or a .gguf file")


def is_moeconv_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "moeconv"
    except json.JSONDecodeError:
        return False


def load_tokenizer(path: str | Path, tokenizer: str | None = None, purpose: str | None = None) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, or the one at TOKENIZER (a folder or .gguf).  Never runs a tokenizer's own code."""
    folder, extra = model_source(tokenizer or path)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False, **extra)
    except Exception as err:  # noqa: BLE001 - tokenizers/sentencepiece/json raise many types for a missing or corrupt file
        reason = _tokenizer_problem(Path(folder), err)
        if purpose:
            raise CheckpointError(f"{purpose} needs a tokenizer, and {tokenizer or path} {reason}; add the source model's "
                                  "tokenizer files to that folder (or pass --method random --no-router-training --no-refit with "
                                  "--top-k equal to --experts, which needs no text)") from None
        raise CheckpointError(f"{tokenizer or path} {reason}; pass --tokenizer PATH pointing at one") from None


def _tokenizer_problem(folder: Path, err: Exception) -> str:
    if "trust_remote_code" in str(err) or "custom code" in str(err):
        return "has a tokenizer that needs its own code, which moeconv never runs"
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")
    if folder.is_dir() and not any((folder / n).is_file() for n in names) and not any(folder.glob("*.gguf")):
        return "has no tokenizer"
    return f"has a tokenizer that cannot be read ({(str(err).strip().splitlines() or [type(err).__name__])[0][:120]})"


def load_model(
    path: str | Path,
    dtype: str = "float32",
    device: str = "auto",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """A causal LM in eval mode on `device`.  Remote code runs only if the user asked for it."""
    folder, extra = model_source(path)
    if "gguf_file" in extra:
        model = load_gguf_model(Path(folder) / extra["gguf_file"], resolve_dtype(dtype), attn_implementation or "sdpa")
        return model.to(resolve_device(device))
    kwargs = dict(dtype=resolve_dtype(dtype), local_files_only=True, trust_remote_code=trust_remote_code,
                  output_loading_info=True, ignore_mismatched_sizes=True, **extra)  # mismatches are reported below, as one line
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except ValueError as err:  # a family without the requested attention kernel (gemma2 has no sdpa)
            if "attn_implementation" not in kwargs or "attention" not in str(err):
                raise
            model, info = AutoModelForCausalLM.from_pretrained(folder, **{**kwargs, "attn_implementation": "eager"})
    except SafetensorError as err:
        raise CheckpointError(f"a weight file of {path} is truncated or corrupt ({err}); re-create or re-download it") from None
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"cannot load {path} as a causal LM: {first}") from None
    missing, unexpected = list(info["missing_keys"]), list(info["unexpected_keys"])
    mismatched = [(m[0], tuple(m[1]), tuple(m[2])) for m in info["mismatched_keys"]]
    present = [n for n in model.state_dict() if n not in missing] + unexpected
    raise_if_inconsistent(str(path), model.config, present, missing, unexpected, mismatched)
    return model.to(resolve_device(device)).eval()
