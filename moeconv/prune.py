"""Static structured FFN pruning baseline: keep each layer's neurons of largest mean |activation| (a smaller dense model)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from moeconv.calib.capture import LayerRunner, tokenize_windows
from moeconv.calib.sources import load_text
from moeconv.config import RefitConfig
from moeconv.errors import MoeconvError, RecipeError
from moeconv.io.adapters import FamilyAdapter, adapter_for
from moeconv.io.load import load_model, load_tokenizer
from moeconv.io.writer import PartialOutput
from moeconv.jobs import check_destination, job_fingerprint, run_job
from moeconv.refit import HeldOut, normal_equations, refit_with_holdout

log = logging.getLogger(__name__)


def _layers(model: nn.Module) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.num_hidden_layers)


def _ffn(model: nn.Module, adapter: FamilyAdapter, i: int) -> nn.Module:
    return model.get_submodule(adapter.ffn_path.format(i=i))


@torch.no_grad()
def neuron_importance(model: nn.Module, windows: torch.Tensor, batch: int = 4) -> list[torch.Tensor]:
    """Mean |intermediate activation| of every FFN neuron, per layer, over windows [N, L].  -> layers x [d_ff]

    The intermediate activation is the down projection's input: act(gate(x)) * up(x), or act(up(x)).
    """
    adapter = adapter_for(model.config)
    device = next(model.parameters()).device
    sums: list[torch.Tensor | None] = [None] * _layers(model)
    counts = [0] * len(sums)

    def hook(i: int):
        def record(module: nn.Module, args: tuple) -> None:
            h = args[0].detach().float().flatten(0, -2)  # [T, d_ff]
            total = h.abs().sum(0)  # [d_ff]
            sums[i] = total if sums[i] is None else sums[i] + total
            counts[i] += h.shape[0]
        return record

    handles = [getattr(_ffn(model, adapter, i), adapter.down).register_forward_pre_hook(hook(i)) for i in range(len(sums))]
    was_training = model.training
    model.eval()
    try:
        for b in range(0, windows.shape[0], batch):
            model(input_ids=windows[b : b + batch].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if any(s is None for s in sums):
        raise MoeconvError("pruning saw no FFN activations; pass calibration windows with at least one token")
    return [s.cpu() / c for s, c in zip(sums, counts, strict=True)]


def _rows(param: nn.Parameter, idx: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(param.data.index_select(dim, idx.to(param.device)).clone(), requires_grad=param.requires_grad)


def _slice_ffn(ffn: nn.Module, adapter: FamilyAdapter, keep: torch.Tensor, d_ff: int) -> None:
    """Keep neurons `keep` [k] of one FFN module, in place (Linear [out, in] or gpt2 Conv1D [in, out])."""
    inputs = [adapter.fused_gate_up] if adapter.fused_gate_up else [n for n in (adapter.gate, adapter.up) if n]
    for name in inputs:
        lin = getattr(ffn, name)
        idx = torch.cat([keep, keep + d_ff]) if name == adapter.fused_gate_up else keep  # fused: gate rows, then up rows
        out_dim = 1 if adapter.conv1d else 0
        lin.weight = _rows(lin.weight, idx, out_dim)
        if getattr(lin, "bias", None) is not None:
            lin.bias = _rows(lin.bias, idx, 0)
        if adapter.conv1d:
            lin.nf = idx.numel()
        else:
            lin.out_features = idx.numel()
    down = getattr(ffn, adapter.down)
    down.weight = _rows(down.weight, keep, 0 if adapter.conv1d else 1)
    if not adapter.conv1d:
        down.in_features = keep.numel()


def _down_weight(down: nn.Module, adapter: FamilyAdapter) -> torch.Tensor:
    """The down projection as [d, d_ff] whatever the module layout (gpt2's Conv1D stores [in, out])."""
    return down.weight.data.T if adapter.conv1d else down.weight.data


class _LoadedModel:
    """A loaded model's weights behind the reader interface LayerRunner walks (config, has, get)."""

    def __init__(self, model: nn.Module):
        self.config = model.config
        self.tensors = model.state_dict()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


@torch.no_grad()
def _refit_kept(model: nn.Module, adapter: FamilyAdapter, keeps: list[torch.Tensor], windows: torch.Tensor,
                config: RefitConfig, batch: int) -> list[tuple[torch.Tensor, dict[str, float]]]:
    """Least-squares refit of each layer's down projection on its kept neurons, to reproduce the full FFN
    output on calibration windows (the last holdout_fraction of them judge the fit). The windows walk the model
    one decoder layer at a time (calib.capture.LayerRunner on the loaded weights): each layer's normal equations
    are filled, solved and dropped before the next layer's exist, so memory is one layer's (keep² or rows x keep
    numbers, moeconv.refit) plus the hidden states [windows, seqlen, d], not layers x keep².
    -> per layer (down [d, keep], metrics)"""
    held = max(1, int(round(windows.shape[0] * config.holdout_fraction)))
    if held >= windows.shape[0]:
        raise RecipeError(f"refit needs at least 2 calibration windows, got {windows.shape[0]}; pass more calibration tokens")
    first_held = windows.shape[0] - held
    device = next(model.parameters()).device
    runner = LayerRunner(_LoadedModel(model), adapter, windows, batch_size=batch, device=device)
    results = []
    for i, keep in enumerate(keeps):
        w0 = _down_weight(getattr(_ffn(model, adapter, i), adapter.down), adapter)[:, keep.to(device)].float()
        train = normal_equations(keep.numel(), w0.shape[0], first_held * windows.shape[1], config, device)
        stats, seen = (train, HeldOut(device)), [0]

        def record(module: nn.Module, args: tuple, output: torch.Tensor, keep=keep, stats=stats, seen=seen) -> None:
            h = args[0].detach().float()[..., keep.to(args[0].device)]  # [b, L, keep]
            y = output.detach().float()  # [b, L, d]
            if getattr(module, "bias", None) is not None:
                y = y - module.bias.float()
            is_held = torch.arange(seen[0], seen[0] + h.shape[0]) >= first_held  # windows in order: the last ones judge
            seen[0] += h.shape[0]
            for part, rows in zip(stats, (~is_held, is_held), strict=True):
                if rows.any():
                    part.add(h[rows].flatten(0, -2), y[rows].flatten(0, -2))

        layer = runner.materialize(i)
        handle = layer.get_submodule(f"{runner.ffn_suffix}.{adapter.down}").register_forward_hook(record)
        try:
            runner.forward(i, layer)
        finally:
            handle.remove()
            runner.release(i)
        results.append(refit_with_holdout(*stats, w0, config.damp))
        del train, stats
    return results


def prune_ffn_to_active(
    model: nn.Module, keep_fraction: float, calib_windows: torch.Tensor, *, keep: int | None = None, batch: int = 4,
    refit: RefitConfig | None = None,
) -> nn.Module:
    """Shrink every FFN of a dense HF causal LM to its `keep` (default round(keep_fraction * d_ff)) neurons of
    largest mean |activation| on calib_windows [N, L]; in place, config updated; returns the model.

    To match a MoE with top_k of E experts (plus S shared neurons), keep = top_k * expert_size + S:
    the pruned model then has the same number of active FFN neurons per token. With `refit`, each
    layer's down projection is then re-solved by least squares on the kept neurons (moeconv.refit).
    """
    adapter = adapter_for(model.config)  # refuses MoE / unsupported families
    d_ff = adapter.d_ff(model.config)
    if keep is None:
        if not 0 < keep_fraction <= 1:
            raise RecipeError(f"keep_fraction {keep_fraction} is outside (0, 1]; pass the fraction of FFN neurons to keep")
        keep = max(1, int(round(keep_fraction * d_ff)))
    if not 1 <= keep <= d_ff:
        raise RecipeError(f"cannot keep {keep} of {d_ff} FFN neurons; pass 1 <= keep <= {d_ff}")
    importance = neuron_importance(model, calib_windows, batch)
    keeps = [torch.topk(score, keep).indices.sort().values for score in importance]  # [keep], in neuron order
    kept_mass = [float(score[k].sum() / score.sum().clamp_min(1e-30)) for score, k in zip(importance, keeps, strict=True)]
    refits = _refit_kept(model, adapter, keeps, calib_windows, refit, batch) if refit is not None else None
    for i, chosen in enumerate(keeps):
        ffn = _ffn(model, adapter, i)
        _slice_ffn(ffn, adapter, chosen, d_ff)
        if refits is not None:
            down = getattr(ffn, adapter.down)
            fitted = refits[i][0].to(down.weight.dtype)
            down.weight.data.copy_(fitted.T if adapter.conv1d else fitted)
    key = adapter.d_ff_keys[0]
    setattr(model.config, key, keep)
    log.info("pruned FFNs to %d of %d neurons; kept %.3f of the activation mass on average", keep, d_ff,
             sum(kept_mass) / len(kept_mass))
    model.prune_metrics = {"d_ff": d_ff, "kept": keep, "layers": len(importance), "kept_activation_mass": kept_mass}
    if refits is not None:
        model.prune_metrics["refit"] = [metrics for _, metrics in refits]
    return model


def prune_checkpoint(
    src: str, out: str | Path, keep_fraction: float, *, calib_source: str = "shakespeare", calib_tokens: int = 16384,
    seqlen: int = 512, force: bool = False, refit: RefitConfig | None = None,
) -> dict:
    """Write SRC pruned to keep_fraction of its FFN neurons (largest mean |activation| on the calibration
    text) as a transformers folder at OUT, through OUT.partial.  -> the pruning metrics."""

    out = Path(out)
    check_destination(src, out, force)
    model = load_model(src, "float32", "cpu")
    tokenizer = load_tokenizer(src)
    windows = tokenize_windows(tokenizer, load_text(calib_source), calib_tokens, seqlen)  # [N, L]
    prune_ffn_to_active(model, keep_fraction, windows, refit=refit)
    tag = f"prune:{src}:{keep_fraction}:{calib_source}:{calib_tokens}:{seqlen}:{refit.model_dump_json() if refit else None}"

    def work(partial: PartialOutput) -> dict:
        partial.write_saved(model.save_pretrained)
        partial.write_saved(tokenizer.save_pretrained)
        partial.write_json("provenance.json", {"source": str(src), "prune": tag, "metrics": model.prune_metrics})
        return model.prune_metrics

    return run_job(out, job_fingerprint(tag=tag), work, force=force, resume=False)
