"""Checkpoint readers: a local HF folder (safetensors or .bin), a .gguf file, or a Hub id when online.

Every reader exposes the model's config, its tensor names and shapes, and returns one tensor at a
time, so a converter never holds more than the tensors it is working on.
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from moeconv.dtypes import FROM_SAFETENSORS_CODE
from moeconv.errors import CheckpointError, MoeconvError
from moeconv.io import registration  # noqa: F401 - AutoConfig knows 'moeconv'
from moeconv.io.files import sha256_file
from moeconv.io.validate import all_finite, check_tensors

log = logging.getLogger(__name__)


class CheckpointReader(ABC):
    """Lazy access to a dense checkpoint's config and tensors."""

    path: Path
    config: PretrainedConfig

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def dtype(self, name: str) -> torch.dtype:
        """The dtype `get(name)` returns, without reading the tensor."""

    @abstractmethod
    def _read(self, name: str) -> torch.Tensor: ...

    def get(self, name: str) -> torch.Tensor:
        """One tensor, checked finite as it streams: nothing is ever computed from a NaN or Inf weight.
        (One pass over memory just read: 0.86 s for SmolLM2's 135M values on a busy 2-core machine, < 1% of a conversion.)"""
        t = self._read(name)
        if not all_finite(t):
            raise CheckpointError(f"source tensor '{name}' contains NaN or Inf; fix the source checkpoint first")
        return t

    @abstractmethod
    def source_files(self) -> list[Path]: ...

    def tokenizer_kwargs(self) -> dict:
        """Arguments for AutoTokenizer.from_pretrained that find this checkpoint's tokenizer."""
        return {"pretrained_model_name_or_path": str(self.path)}

    def validate(self) -> None:
        """A CheckpointError naming missing, extra or mis-shaped tensors, before anything is computed from them."""
        check_tensors(str(self.path), self.config, {name: self.shape(name) for name in self.keys()})

    def has(self, name: str) -> bool:
        return name in self._key_set()

    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def fingerprint(self) -> dict[str, str]:
        """sha256 of each source file and of config.json (identifies the exact input for resume and provenance)."""
        files = list(self.source_files())
        if (self.path / "config.json").is_file():  # a folder: its config shapes the output as much as its weights
            files.append(self.path / "config.json")
        return {f.name: sha256_file(f) for f in files}


def _load_config(folder: Path) -> PretrainedConfig:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: it is not a Hugging Face model folder; pass a model folder or a .gguf file")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - every field is the user's input; transformers' validators raise many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {first}; check that it is a valid transformers config") from None


def _read_index(folder: Path, index: Path) -> dict[str, Path]:
    """tensor name -> shard file, from a sharded checkpoint's index (every shard inside the folder)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index} is not a valid index (no weight_map); regenerate it") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise CheckpointError(f"{index} has no usable weight_map (tensor name -> shard file name); regenerate it")
    return {name: _resolve_inside(folder, shard, index) for name, shard in weight_map.items()}


def _resolve_inside(folder: Path, name: str, index: Path) -> Path:
    target = (folder / name).resolve()
    if folder.resolve() not in target.parents:
        raise CheckpointError(f"{index} names '{name}', a path outside {folder}; fix or regenerate the index file")
    if not target.is_file():
        raise CheckpointError(f"{index} names shard '{name}', which is missing; copy the missing shard into {folder}")
    return target


class SafetensorsReader(CheckpointReader):
    """A folder with model.safetensors or a sharded model.safetensors.index.json."""

    def __init__(self, folder: Path):
        self.path = folder
        self.config = _load_config(folder)
        self._handles: dict[Path, object] = {}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self._files = _read_index(folder, index)
        else:
            single = folder / "model.safetensors"
            self._files = {name: single for name in self._open(single).keys()}
        for f in sorted(set(self._files.values())):
            handle = self._open(f)
            missing = [n for n, p in self._files.items() if p == f and n not in handle.keys()]
            if missing:
                raise CheckpointError(f"{f.name} lacks tensor '{missing[0]}' that the index promises; the shard is stale or corrupt")

    def _open(self, f: Path):
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{f} is truncated or corrupt ({err}); re-download or re-export the checkpoint") from None
        return self._handles[f]

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._files[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._open(self._files[name]).get_slice(name).get_dtype()
        if code not in FROM_SAFETENSORS_CODE:
            raise CheckpointError(f"tensor '{name}' has dtype {code}, which moeconv does not read; convert it to float32 or bfloat16")
        return FROM_SAFETENSORS_CODE[code]

    def _read(self, name: str) -> torch.Tensor:
        # safetensors hands out tensors backed by a memory map of the whole file; pages they touch stay
        # resident (and count as ours) while any handle maps the file. A private copy from a handle that
        # is closed at once keeps the process at one layer's worth of weights whatever the depth.
        try:
            with safe_open(str(self._files[name]), framework="pt") as handle:
                return handle.get_tensor(name).clone()
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read tensor '{name}' from {self._files[name].name} ({err}); the file is corrupt") from None

    def source_files(self) -> list[Path]:
        return sorted(set(self._files.values()))


class TorchBinReader(CheckpointReader):
    """A folder with pytorch_model.bin (or its sharded index), loaded with weights_only=True and mmap."""

    def __init__(self, folder: Path):
        self.path = folder
        self.config = _load_config(folder)
        self._cache: tuple[Path, dict] | None = None  # the one open state dict (mmap), before any _load
        index = folder / "pytorch_model.bin.index.json"
        if index.is_file():
            self._files = _read_index(folder, index)
        else:
            single = folder / "pytorch_model.bin"
            self._files = {name: single for name in self._load(single)}

    def _load(self, f: Path) -> dict:
        if self._cache is None or self._cache[0] != f:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
                raise CheckpointError(f"{f} cannot be read safely ({type(err).__name__}); convert it to safetensors") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{f} does not hold a state dict of tensors; convert it to safetensors")
            self._cache = (f, state)
        return self._cache[1]

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._load(self._files[name])[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._load(self._files[name])[name].dtype

    def _read(self, name: str) -> torch.Tensor:
        state = self._load(self._files[name])
        if name not in state:
            raise CheckpointError(f"{self._files[name].name} lacks tensor '{name}' that the index promises; the shard is stale or corrupt")
        return state[name]

    def source_files(self) -> list[Path]:
        return sorted(set(self._files.values()))


class GGUFReader(CheckpointReader):
    """A .gguf file: config and tokenizer from its metadata (transformers), tensors read one at a time from the file and
    dequantized on reading (moeconv.io.gguf_reader), equal to what transformers' whole-model GGUF loader gives."""

    def __init__(self, file: Path):
        self.path = file
        try:
            from moeconv.io import gguf_reader  # needs the optional gguf package (extra 'gguf'): only GGUF sources do

            table = gguf_reader.read_table(file)
            self.config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)
            blocks = {int(m.group(1)) for t in table.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
            layers = getattr(self.config, "num_hidden_layers", None)
            if blocks and layers != max(blocks) + 1:  # before building (and name-mapping) a model of that many layers
                raise CheckpointError(f"{file} does not match its own metadata: it says {layers} layers, its tensors hold "
                                      f"{max(blocks) + 1}; the file is corrupt: re-download or re-export it")
            self._gguf = gguf_reader.LazyGGUF(table, self.config)
        except ImportError:
            raise CheckpointError("reading .gguf files needs the gguf package: pip install gguf") from None
        except MoeconvError:  # already one line that names the problem (a corrupt file, an unreadable type, a MoE GGUF)
            raise
        except Exception as err:  # noqa: BLE001 - gguf/numpy/struct raise many types for a truncated or corrupt file
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"cannot read {file} as GGUF ({first}); the file is truncated, corrupt or not a model") from None

    def keys(self) -> list[str]:
        return self._gguf.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._gguf.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32  # every type is dequantized on reading

    def _read(self, name: str) -> torch.Tensor:
        return self._gguf.read(name)

    def source_files(self) -> list[Path]:
        return [self.path]

    def tokenizer_kwargs(self) -> dict:
        return {"pretrained_model_name_or_path": str(self.path.parent), "gguf_file": self.path.name}


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download  # only a Hub id needs it (and the network)

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception:  # noqa: BLE001 - offline, unknown repo, no auth: all mean the same to the user
        raise CheckpointError(
            f"'{repo_id}' is not a local path and could not be fetched from the Hub; pass a local model folder or .gguf file"
        ) from None


def open_checkpoint(source: str | Path, validate: bool = True) -> CheckpointReader:
    """The reader for SOURCE (folder, .gguf file, or Hub id), its tensors checked against its config.json
    (validate=False: the caller checks first that it supports the family, then calls reader.validate())."""
    reader = _reader_for(source)
    if validate:
        reader.validate()
    return reader


def _reader_for(source: str | Path) -> CheckpointReader:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFReader(path)
        raise CheckpointError(f"{path} is a file but not a .gguf; pass a model folder or a .gguf file")
    if not path.exists():
        looks_like_hub_id = str(source).count("/") == 1 and not str(source).startswith((".", "/", "~"))
        if looks_like_hub_id:
            path = _download(str(source))
        else:
            raise CheckpointError(f"{source} does not exist; pass a model folder, a .gguf file or a Hub id")
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return SafetensorsReader(path)
    if (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        return TorchBinReader(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFReader(ggufs[0])
    raise CheckpointError(f"{path} holds no model weights (no model.safetensors, pytorch_model.bin or single .gguf); pass a model folder")
