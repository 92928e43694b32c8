"""One check of a checkpoint's tensors against its config.json, before anything is computed from them."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from moeconv.errors import CheckpointError

_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
# Tensors that older checkpoints carry and transformers recomputes (never a sign of a wrong checkpoint).
_IGNORABLE = re.compile(r"rotary_emb\.inv_freq$|\.attn\.(masked_)?bias$")


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN or Inf in t, checked a chunk at a time: the temporary mask stays small however large the tensor."""
    if not t.is_floating_point():
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def expected_tensors(config: PretrainedConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(name -> shape of every tensor the model that config describes loads, names that may be absent because tied)."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001 - any config value can be wrong; each is the user's input
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"config.json describes no model transformers can build ({first}); fix config.json") from None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {})
    return shapes, tied


def check_tensors(where: str, config: PretrainedConfig, shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise a CheckpointError naming what is missing, extra or mis-shaped in `shapes` for `config`."""
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 1):
        raise CheckpointError(f"{where}: config.json's num_hidden_layers is {layers!r}, not a positive whole number; fix config.json")
    held = {int(m.group(1)) for n in shapes if (m := _LAYER.search(n))}
    if layers and held and max(held) + 1 != layers:  # said before building a model of (perhaps absurdly) many layers
        raise_if_inconsistent(where, config, list(shapes), [], [], [])
    expected, tied = expected_tensors(config)
    missing = [n for n in expected if n not in shapes and n not in tied]
    unexpected = [n for n in shapes if n not in expected and not _IGNORABLE.search(n)]
    mismatched = [(n, tuple(shapes[n]), expected[n]) for n in expected if n in shapes and tuple(shapes[n]) != expected[n]]
    raise_if_inconsistent(where, config, list(shapes), missing, unexpected, mismatched)


def raise_if_inconsistent(where: str, config: PretrainedConfig | None, present: list[str], missing: list[str],
                          unexpected: list[str], mismatched: list[tuple[str, tuple, tuple]]) -> None:
    """The one error for a checkpoint that does not match its config (also fed by transformers' own loading report)."""
    problems = []
    layers_in_config = getattr(config, "num_hidden_layers", None) if config is not None else None
    layers_in_files = {int(m.group(1)) for n in present if (m := _LAYER.search(n))}
    if isinstance(layers_in_config, int) and layers_in_files and max(layers_in_files) + 1 != layers_in_config:
        problems.append(f"config.json says {layers_in_config} layers, the weights hold {max(layers_in_files) + 1}")
    if not (problems or missing or unexpected or mismatched):
        return
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) ({_first(unexpected)})")
    if mismatched:
        name, got, want = mismatched[0]
        problems.append(f"{len(mismatched)} tensor(s) of the wrong shape ('{name}' is {list(got)}, config.json implies {list(want)})")
    raise CheckpointError(f"{where} does not match its config.json: {'; '.join(problems)}; "
                          "the checkpoint is incomplete or its config belongs to another model: re-export or fix it")


def _first(names: list[str], count: int = 2) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:count])
    return shown + (", ..." if len(names) > count else "")
