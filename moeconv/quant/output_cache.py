"""Replays the outputs of finished submodules during layer-sequential GPTQ, so each calibration forward computes
only what the quantization of the current stage changed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _clone(out: Any) -> Any:
    """A copy of a module output (tensor, tuple/list of them, or other values kept as they are)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return out


class OutputCache:
    """Output of each finished submodule of one decoder layer, per calibration batch and per call within it.

    A submodule is finished when every quantized linear under it is done: its weights no longer change, and
    neither does its input, which depends only on modules that run before it (earlier stages, all done) and on
    the layer's input, fixed while the layer is quantized. `update(done)` caches the finished submodules; a cached
    module computes its output on the first forward that reaches it and replays a copy afterwards.
    The batch index comes from a pre-hook on the layer (runner.forward calls the layer once per batch, in order);
    call `new_pass()` before each runner.forward.
    """

    def __init__(self, layer: nn.Module, quantized: dict[str, nn.Module]):
        self.layer = layer
        self.quantized = set(quantized)
        self.batch = -1
        self.calls: dict[str, int] = {}
        self.outputs: dict[str, dict[tuple[int, int], Any]] = {}
        self.active: dict[str, tuple[nn.Module, Any]] = {}  # name -> (module, instance forward it shadowed)
        self.hook = layer.register_forward_pre_hook(self._next_batch)

    def _next_batch(self, _module, _args) -> None:
        self.batch += 1
        self.calls.clear()

    def new_pass(self) -> None:
        self.batch = -1

    def update(self, done: set[str]) -> None:
        """Cache every submodule whose quantized linears are all in `done`. Nested ones stay cached too: the first
        run of a newly finished parent then replays its children instead of recomputing them."""
        for name, module in self.layer.named_modules():
            inside = {q for q in self.quantized if q == name or q.startswith(name + ".")}
            if name and inside and inside <= done and name not in self.active:
                self._start(name, module)

    def _start(self, name: str, module: nn.Module) -> None:
        shadowed = module.__dict__.get("forward")
        original = module.forward
        store = self.outputs.setdefault(name, {})

        def forward(*args, **kwargs):
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            key = (self.batch, call)
            if key not in store:
                store[key] = original(*args, **kwargs)
            return _clone(store[key])  # the caller may modify what it gets in place

        module.__dict__["forward"] = forward  # instance attribute: shadows the class's forward for this module only
        self.active[name] = (module, shadowed)

    def _stop(self, name: str) -> None:
        module, shadowed = self.active.pop(name)
        module.__dict__.pop("forward", None)
        if shadowed is not None:
            module.__dict__["forward"] = shadowed
        self.outputs.pop(name, None)

    def close(self) -> None:
        for name in list(self.active):
            self._stop(name)
        self.hook.remove()
