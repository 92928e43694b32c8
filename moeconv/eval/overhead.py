"""Measured forward-time cost of DAG-MoE aggregators: the same window timed with and without them."""

from __future__ import annotations

import statistics
import time

import torch
from pydantic import BaseModel, ConfigDict, computed_field, model_validator
from torch import nn

from moeconv.eval.stats import find_moe_layers


class DagOverhead(BaseModel):
    """Median seconds of one forward over `tokens` tokens with the aggregators and with them removed (plain MoE sum)."""

    model_config = ConfigDict(extra="forbid")

    tokens: int
    repeats: int
    seconds_with: float
    seconds_without: float

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data):
        """Saved results carry the derived `overhead`; it is recomputed, not read back."""
        return {k: v for k, v in data.items() if k != "overhead"} if isinstance(data, dict) else data

    @computed_field
    @property
    def overhead(self) -> float:
        """Relative extra forward time: 0.05 = 5% slower with the aggregators."""
        return self.seconds_with / max(self.seconds_without, 1e-12) - 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_dag_overhead(model: nn.Module, ids: torch.Tensor, repeats: int = 3) -> DagOverhead | None:
    """Time model(ids) [1, L] with and without its MoE layers' aggregators, alternating, after one warm-up of each;
    None when the model has no aggregator. The model is left exactly as it was."""
    blocks = [layer.block for layer in find_moe_layers(model) if getattr(layer.block, "dag", None) is not None]
    if not blocks:
        return None
    device = next(model.parameters()).device
    ids = ids.to(device)
    aggregators = [block.dag for block in blocks]
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for i in range(repeats + 1):
            for with_dag in (True, False):
                for block, dag in zip(blocks, aggregators, strict=True):
                    block.dag = dag if with_dag else None
                _sync(device)
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                _sync(device)
                if i:  # the first round warms caches and the aggregator's factored weights
                    times[with_dag].append(time.perf_counter() - start)
    finally:
        for block, dag in zip(blocks, aggregators, strict=True):
            block.dag = dag
    return DagOverhead(tokens=int(ids.numel()), repeats=repeats, seconds_with=statistics.median(times[True]),
                       seconds_without=statistics.median(times[False]))
