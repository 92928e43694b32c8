"""Which tensors the MoE checkpoint holds, per unit (unit 0: everything outside the decoder layers; unit i+1: layer i)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from transformers import PretrainedConfig

from moeconv.io.adapters import FamilyAdapter
from moeconv.io.readers import CheckpointReader
from moeconv.modeling.hf.dag import DagAggregator
from moeconv.modeling.hf.moe_block import MoeconvMoeBlock


def moe_settings(recipe, adapter: FamilyAdapter, config: PretrainedConfig, expert_size: int, shared_size: int) -> dict:
    """The `moe` block of config.json (everything the modeling code needs to rebuild the layers)."""
    return {
        "ffn_path": adapter.ffn_path,
        "layers": list(range(config.num_hidden_layers)),
        "num_experts": recipe.experts,
        "top_k": recipe.top_k,
        "expert_size": expert_size,
        "shared_size": shared_size,
        "scoring": recipe.scoring,
        "renormalize": recipe.renormalize,
        "activation": adapter.activation(config),
        "gated": adapter.gated,
        "ffn_bias": adapter.has_bias(config),
        "down_bias": adapter.has_bias(config),
        "dag": recipe.dag.architecture() if recipe.dag is not None else None,
        "quant": None,
    }


def output_config(config: PretrainedConfig, moe: dict, dtype: str) -> dict:
    base = config.to_dict()
    base.pop("_name_or_path", None)
    return {
        "model_type": "moeconv",
        "architectures": ["MoeconvForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_moeconv.MoeconvConfig",
            "AutoModelForCausalLM": "modeling_moeconv.MoeconvForCausalLM",
        },
        "base_config": base,
        "moe": moe,
        "dtype": dtype,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _float(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


class _ReadOnLookup(Mapping):
    def __init__(self, names: list[str], read: Callable[[str], torch.Tensor]):
        self._names, self._read = list(names), read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class LayerLayout:
    """Names, sizes and contents of the output, unit by unit, computed without loading weights."""

    def __init__(self, reader: CheckpointReader, adapter: FamilyAdapter, moe: dict, dtype: torch.dtype):
        self.reader, self.adapter, self.moe, self.dtype = reader, adapter, moe, dtype
        config = reader.config
        self.num_layers = config.num_hidden_layers
        self.num_units = self.num_layers + 1
        self.layer_prefix = adapter.ffn_path.split(".{i}")[0]
        self.ffn_suffix = adapter.ffn_path.split("{i}.")[1]
        tied = getattr(config, "tie_word_embeddings", False)
        keys = [k for k in reader.keys() if not (tied and k == "lm_head.weight")]
        ffn_names = {n for i in range(self.num_layers) for n in adapter.ffn_tensor_names(i, config)}
        self._source_units: list[list[str]] = [[] for _ in range(self.num_units)]
        for k in keys:
            if k in ffn_names:
                continue
            self._source_units[self._unit_of(k)].append(k)
        self.d_model = int(config.hidden_size)
        with torch.device("meta"):
            block = MoeconvMoeBlock(self.d_model, moe)
            if moe.get("dag"):

                block.dag = DagAggregator(self.d_model, moe["top_k"], **moe["dag"])
        self._block_shapes = {k: (tuple(v.shape), v.dtype) for k, v in block.state_dict().items()}
        self._expert_params = sum(p.numel() for p in block.experts[0].parameters())

    def _unit_of(self, name: str) -> int:
        head = self.layer_prefix + "."
        if name.startswith(head):
            return int(name[len(head) :].split(".")[0]) + 1
        return 0

    def _ffn_prefix(self, layer: int) -> str:
        return self.adapter.ffn_path.format(i=layer)

    def unit_names(self, unit: int) -> list[str]:
        names = list(self._source_units[unit])
        if unit > 0:
            names += [f"{self._ffn_prefix(unit - 1)}.{k}" for k in self._block_shapes]
        return names

    def unit_entries(self, unit: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of every output tensor of the unit, in write order."""
        entries = [(k, tuple(self.reader.shape(k)), self.dtype) for k in self._source_units[unit]]
        if unit > 0:
            prefix = self._ffn_prefix(unit - 1)
            entries += [(f"{prefix}.{k}", s, self.dtype if d.is_floating_point else d) for k, (s, d) in self._block_shapes.items()]
        return entries

    def _nbytes(self, shape: Iterable[int], dtype: torch.dtype) -> int:
        n = 1
        for s in shape:
            n *= s
        return n * (self.dtype.itemsize if dtype.is_floating_point else dtype.itemsize)

    def unit_bytes(self, unit: int) -> int:
        total = sum(self._nbytes(self.reader.shape(k), torch.float32) for k in self._source_units[unit])
        if unit > 0:
            total += sum(self._nbytes(s, d) for s, d in self._block_shapes.values())
        return total

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token) parameters of the output model."""
        source = sum(torch.Size(self.reader.shape(k)).numel() for u in self._source_units for k in u)
        block = sum(torch.Size(s).numel() for k, (s, d) in self._block_shapes.items() if d.is_floating_point)
        total = source + block * self.num_layers
        idle = (self.moe["num_experts"] - self.moe["top_k"]) * self._expert_params * self.num_layers
        return total, total - idle

    def global_tensors(self) -> Mapping[str, torch.Tensor]:
        """The embeddings, final norm and LM head, each read when looked up and not kept (2 GiB each in float32 at
        8B: a dict of them all would hold them together)."""
        return _ReadOnLookup(self._source_units[0], lambda k: _float(self.reader.get(k), self.dtype))

    def layer_tensors(self, layer: int, block: MoeconvMoeBlock) -> dict[str, torch.Tensor]:
        out = {k: _float(self.reader.get(k), self.dtype) for k in self._source_units[layer + 1]}
        prefix = self._ffn_prefix(layer)
        out.update({f"{prefix}.{k}": _float(v.detach(), self.dtype) for k, v in block.state_dict().items()})
        return out
