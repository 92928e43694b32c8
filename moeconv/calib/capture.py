"""Run a dense model one decoder layer at a time on calibration windows, capturing each FFN's inputs.

Only the embeddings, the final norm and the current decoder layer are materialised: the rest of
the model stays on the meta device, so memory is bounded by one layer plus the activations.
"""

from __future__ import annotations

import logging

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoModelForCausalLM

from moeconv.calib.sources import TextSource
from moeconv.errors import DataError
from moeconv.io.adapters import FamilyAdapter
from moeconv.io.readers import CheckpointReader

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


class StopLayer(Exception):
    """Raised by a hook to end a layer's forward on one batch once what it needed has been seen."""


class _Catcher(torch.nn.Module):
    """Stands in for a decoder layer: records the extra arguments the model passes it."""

    def __init__(self, layer: torch.nn.Module, store: dict, index: int, last: bool):
        super().__init__()
        self.layer, self.store, self.index, self.last = layer, store, index, last
        self.attention_type = getattr(layer, "attention_type", None)  # gemma picks masks by this

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.store[self.index] = (args[1:], kwargs)
        if self.index == 0:
            self.store["embeddings"] = hidden
        if self.last:
            raise _StopForward
        return hidden


def tokenize_windows(tokenizer, source: TextSource, tokens: int, seqlen: int, purpose: str = "calibration",
                     fix: str = "pass more text or lower --calib-tokens / the seqlen") -> torch.Tensor:
    """The first `tokens` tokens of the source (rounded up to whole windows).  -> [n, seqlen]"""
    windows = -(-tokens // seqlen)
    need = windows * seqlen
    ids: list[int] = []
    text = source.text
    step = max(4 * need, 1 << 16)
    for start in range(0, len(text), step):  # tokenize only as much text as the budget needs
        ids.extend(tokenizer(text[start : start + step], add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise DataError(
            f"{purpose} text '{source.name}' has {len(ids)} tokens but {need} are needed "
            f"({windows} windows of {seqlen}); {fix}"
        )
    return torch.tensor(ids[:need]).view(windows, seqlen)


class LayerRunner:
    """Walks the dense model layer by layer: hidden states in, FFN inputs and hidden states out."""

    def __init__(self, reader: CheckpointReader, adapter: FamilyAdapter | None, windows: torch.Tensor, batch_size: int = 8,
                 device: torch.device = torch.device("cpu"), ffn_path: str | None = None, converted_stream: bool = False):
        """`ffn_path` ("model.layers.{i}.mlp") replaces the adapter's, e.g. for a moeconv checkpoint (adapter None).
        `converted_stream`: also carry the hidden states of the converted model (run_converted / advance_converted)."""
        self.reader, self.adapter, self.device = reader, adapter, device
        ffn_path = ffn_path or adapter.ffn_path
        config = reader.config
        with init_empty_weights(include_buffers=False):
            try:
                self.model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
            except ValueError:  # no sdpa for this family (gemma2)
                self.model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        self.model.eval()  # from_config builds in training mode: dropout (gpt2's resid/attn/embd_pdrop) would be live
        for name, _ in list(self.model.named_buffers()):  # rotary tables etc. are real, move them
            set_module_tensor_to_device(self.model, name, device)
        layer0 = ffn_path.split(".{i}")[0]
        self.layers = self.model.get_submodule(layer0)
        self.layer_prefix = layer0
        self.ffn_suffix = ffn_path.split("{i}.")[1]
        # Capture stops at the last decoder layer: the LM head (2 GiB float32 at 8B) is never read, unless it is the
        # input embeddings themselves (tied). By identity, not by name: a moeconv checkpoint's base model is the whole model.
        head = self.model.get_output_embeddings()
        embeddings = {id(p) for p in self.model.get_input_embeddings().parameters()}
        unused = {id(p) for p in head.parameters()} - embeddings if head is not None else set()
        outside = [name for name, p in self.model.named_parameters()
                   if not name.startswith(layer0 + ".") and id(p) not in unused]
        for name in outside:
            if reader.has(name):
                set_module_tensor_to_device(self.model, name, device, value=reader.get(name).float())
        self.batches = list(windows.split(batch_size))
        self.hidden, self.layer_args = self._catch_inputs()
        for name in outside:  # only the windows' embedding needed them (2 GiB float32 at 8B): back to meta
            set_module_tensor_to_device(self.model, name, "meta")
        # The hidden states that the layers converted so far produce (None: calibrate on the dense model's alone).
        self.converted = [h.clone() for h in self.hidden] if converted_stream else None

    def _catch_inputs(self) -> tuple[list[torch.Tensor], list[dict]]:
        """Embeddings of every batch, and the per-layer extra arguments for each batch shape."""
        originals = list(self.layers)
        hidden, args_by_size = [], {}
        try:
            for batch in self.batches:
                store: dict = {}
                for i, layer in enumerate(originals):
                    self.layers[i] = _Catcher(layer, store, i, last=i == len(originals) - 1)
                try:
                    with torch.inference_mode():
                        self.model.base_model(input_ids=batch.to(self.device), use_cache=False)
                except _StopForward:
                    pass
                hidden.append(store.pop("embeddings").to("cpu").clone())
                args_by_size.setdefault(batch.shape[0], store)
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        return hidden, args_by_size

    def materialize(self, index: int, skip: str | None = None) -> torch.nn.Module:
        """Layer `index` with its source weights (fp32, on the device), except those under submodule `skip`;
        release() puts it back on meta."""
        prefix = f"{self.layer_prefix}.{index}."
        layer = self.layers[index]
        for name, _ in list(layer.named_parameters()):
            if skip is None or not name.startswith(skip + "."):
                set_module_tensor_to_device(self.model, prefix + name, self.device, value=self.reader.get(prefix + name).float())
        return layer

    def release(self, index: int) -> None:
        self.layers[index].to("meta")

    def forward(self, index: int, layer: torch.nn.Module, update: bool = True, stream: list[torch.Tensor] | None = None,
                keep: list[torch.Tensor] | None = None) -> None:
        """Run `layer` (materialized, possibly modified) on every batch of `stream` (default: the dense stream); with
        `update`, its outputs become the hidden states entering the next layer; `keep` collects them (on CPU).
        Hooks may raise StopLayer to end a batch early (update=False)."""
        stream = self.hidden if stream is None else stream
        with torch.inference_mode():
            for b, h in enumerate(stream):
                args, kwargs = self.layer_args[h.shape[0]][index]
                try:
                    out = layer(h.to(self.device), *args, **kwargs)
                except StopLayer:
                    if update:
                        raise
                    continue
                out = (out[0] if isinstance(out, tuple) else out).cpu()
                if update:
                    stream[b] = out
                if keep is not None:
                    keep.append(out)

    def _capture_ffn_inputs(self, layer: torch.nn.Module, captured: list[torch.Tensor]):
        ffn = layer.get_submodule(self.ffn_suffix)
        return ffn.register_forward_pre_hook(lambda _m, a: captured.append(a[0].reshape(-1, a[0].shape[-1]).cpu()))

    def run_layer(self, index: int, capture: bool = True) -> torch.Tensor | None:
        """Advance the hidden states through layer `index`; return its FFN inputs [T, d] (on CPU)."""
        layer = self.materialize(index)
        captured: list[torch.Tensor] = []
        hook = self._capture_ffn_inputs(layer, captured) if capture else None
        try:
            self.forward(index, layer)
        finally:
            if hook is not None:
                hook.remove()
            self.release(index)
        return torch.cat(captured) if capture else None

    def run_converted(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense layer `index` on both streams: the dense stream advances through it, the converted one only passes.
        Returns the converted stream's FFN inputs [T, d] and the gap [T, d] = dense stream's layer output minus the
        converted stream's with the dense FFN: what this layer's FFN would have to add to undo the earlier layers' error
        (exact for families that add the FFN output to the residual stream as is). Call advance_converted next."""
        layer = self.materialize(index)
        captured: list[torch.Tensor] = []
        passed: list[torch.Tensor] = []
        try:
            self.forward(index, layer)
            hook = self._capture_ffn_inputs(layer, captured)
            try:
                self.forward(index, layer, update=False, stream=self.converted, keep=passed)
            finally:
                hook.remove()
        finally:
            self.release(index)
        d = self.hidden[0].shape[-1]
        gap = torch.cat([(dense - conv).reshape(-1, d) for dense, conv in zip(self.hidden, passed, strict=True)])
        return torch.cat(captured), gap

    def advance_converted(self, index: int, ffn: torch.nn.Module) -> None:
        """The converted stream through layer `index` with `ffn` (the converted block) in place of the dense FFN."""
        layer = self.materialize(index, skip=self.ffn_suffix)
        parent_name, _, child = self.ffn_suffix.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        dense_ffn = getattr(parent, child)
        setattr(parent, child, ffn.to(self.device))
        try:
            self.forward(index, layer, stream=self.converted)
        finally:
            setattr(parent, child, dense_ffn)
            self.release(index)

    def state(self) -> dict[str, torch.Tensor]:
        """Hidden states entering the next layer, for resume: "hidden" [n, seqlen, d], and "converted" when carried."""
        state = {"hidden": torch.cat(self.hidden)}
        if self.converted is not None:
            state["converted"] = torch.cat(self.converted)
        return state

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        sizes = [h.shape[0] for h in self.hidden]
        self.hidden = list(state["hidden"].split(sizes))
        if self.converted is not None:
            if "converted" not in state:
                raise ValueError("internal: the saved calibration state has no converted stream")
            self.converted = list(state["converted"].split(sizes))
