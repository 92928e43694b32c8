"""Perplexity by the GPTQ/WikiText protocol (or HF's strided variant), batched, with chunked cross-entropy."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from moeconv.calib.sources import load_text
from moeconv.calib.tokenize import Windows, cut_windows, tokenize_source, tokens_fingerprint
from moeconv.errors import MoeconvError
from moeconv.eval.llamacpp import evaluate_gguf, use_llamacpp
from moeconv.eval.overhead import DagOverhead, measure_dag_overhead
from moeconv.eval.scoring import score_tokens
from moeconv.eval.stats import LayerRouting, ParameterCounts, RoutingRecorder, bytes_on_disk, count_parameters
from moeconv.io.load import load_model, load_tokenizer, resolve_device, resolve_dtype
from moeconv.io.validate import all_finite

log = logging.getLogger(__name__)

# progress(stage, done, total): stage is "tokenize" (characters) or "eval" (windows).
StageProgress = Callable[[str, int, int], None]

DEFAULT_DATA = "shakespeare:heldout"


class EvalSettings(BaseModel):
    """How to measure; every field is recorded beside the result."""

    model_config = ConfigDict(extra="forbid")

    data: str = DEFAULT_DATA
    text_field: str = "text"
    seqlen: int = 2048
    stride: int | None = None  # None: non-overlapping windows (stride = seqlen)
    max_tokens: int | None = None  # evaluate only the first N tokens of the stream
    batch_size: int = 0  # windows per forward; 0 = 1 on CPU (fastest there), 8 on a GPU
    loss_chunk: int = 1024  # rows of logits materialised at once by the chunked cross-entropy
    dtype: str = "auto"
    device: str = "auto"
    tokenizer: str | None = None
    trust_remote_code: bool = False
    dag_overhead: bool = True  # time one window with and without DAG-MoE aggregators (only models that have them)
    engine: str = "auto"  # transformers | llama.cpp (a .gguf) | auto: llama.cpp for a MoE .gguf (transformers cannot load it)


class PerplexityResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ppl: float
    mean_nll: float
    nll_sum: float
    predicted: int  # tokens scored
    windows: int
    tokens: int  # tokens covered by the windows (what the forward passes see once)
    seconds: float
    tokens_per_s: float  # tokens fed through the model per second of forward + loss
    loss_path: str  # "chunked" (decoder + lm_head in chunks) or "logits" (the model's own logits)
    top1: float | None = None  # next-token accuracy: share of predicted tokens that are the argmax (None: older results)
    top1_hits: int | None = None


class EvalResult(BaseModel):
    """One model measured on one token stream; comparable to another only when the settings match."""

    model_config = ConfigDict(extra="forbid")

    model: str
    moe: bool
    data: str
    data_fingerprint: str
    tokens_fingerprint: str  # same text + same tokenizer <=> same value
    seqlen: int
    stride: int
    max_tokens: int | None
    tokens_available: int
    dtype: str
    device: str
    batch_size: int
    perplexity: PerplexityResult
    params: ParameterCounts
    bytes_on_disk: int | None
    routing: list[LayerRouting] = []
    dag_overhead: DagOverhead | None = None  # measured for models with DAG-MoE aggregators
    lm_eval: dict | None = None


def split_lm_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder returning last_hidden_state, lm_head) if the model's logits are exactly lm_head(hidden)."""
    inner = getattr(model, "_dense", model)  # MoeconvForCausalLM delegates to the dense family's class
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if not isinstance(head, nn.Linear) or decoder is None or decoder is inner:
        return None
    return decoder, head


def _verified_split(model: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, nn.Module] | None:
    """The split, if on a short probe it reproduces the model's logits (catches softcapping, logit scales)."""
    split = split_lm_head(model)
    if split is None:
        return None
    decoder, head = split
    try:
        full = model(input_ids=probe, use_cache=False).logits.float()  # [1, P, V]
        mine = head(decoder(input_ids=probe, use_cache=False).last_hidden_state).float()  # [1, P, V]
    except (TypeError, AttributeError) as err:
        log.info("chunked loss unavailable (%s); using the model's logits", err)
        return None
    scale = full.abs().max().clamp_min(1e-6)
    if full.shape != mine.shape or not ((full - mine).abs().max() <= 1e-3 * scale):
        log.info("lm_head(hidden) differs from the model's logits; using the model's logits")
        return None
    return split


def _batch_nll(
    model: nn.Module, split: tuple[nn.Module, nn.Module] | None, x: torch.Tensor, first: bool, pred: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and top-1 hits of the predicted tokens of windows x [B, L]; window 0 of the stream is in x[0] if `first`."""
    seqlen = x.shape[1]
    if split is not None:
        decoder, head = split
        out = decoder(input_ids=x, use_cache=False).last_hidden_state  # [B, L, d]
    else:
        head, out = None, model(input_ids=x, use_cache=False).logits  # [B, L, V]
    # Position p predicts token p + 1: the last `pred` tokens of every window...
    rows = [(out[:, seqlen - 1 - pred : seqlen - 1], x[:, seqlen - pred :])]  # [B, pred, *], [B, pred]
    if first and pred < seqlen - 1:  # ...and, in window 0, every token after its first
        rows.append((out[:1, : seqlen - 1 - pred], x[:1, 1 : seqlen - pred]))
    nll = torch.zeros((), dtype=torch.float64, device=x.device)
    hits = torch.zeros((), dtype=torch.int64, device=x.device)
    for states, targets in rows:
        row_nll, row_hits = score_tokens(states.flatten(0, 1), targets.flatten(), head, chunk)  # [N, *], [N]
        nll, hits = nll + row_nll, hits + row_hits
    return nll, hits


def first_non_finite_module(model: nn.Module, x: torch.Tensor) -> str:
    """The name of the first module, in execution order, whose output holds a NaN or Inf on input x."""
    found: list[str] = []

    def hook(name: str):
        def check(module, args, output) -> None:
            out = output[0] if isinstance(output, tuple) else getattr(output, "logits", output)
            if not found and isinstance(out, torch.Tensor) and not all_finite(out):
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(input_ids=x, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "the loss only"


def auto_batch_size(device: torch.device) -> int:
    return 8 if device.type == "cuda" else 1


@torch.inference_mode()
def evaluate_perplexity(
    model: nn.Module,
    windows: Windows,
    batch_size: int = 0,
    loss_chunk: int = 1024,
    progress: Callable[[int, int], None] | None = None,
    recorder: RoutingRecorder | None = None,
) -> PerplexityResult:
    """exp(mean NLL over all predicted tokens) of `model` on `windows`; one forward per batch of windows.

    `recorder` (if given) tallies routing over exactly the evaluation forwards, not the probe.
    """
    device = next(model.parameters()).device
    batch_size = batch_size or auto_batch_size(device)
    if loss_chunk < 1 or batch_size < 1:
        raise MoeconvError("--batch-size and the loss chunk must be positive")
    ids = windows.ids
    split = _verified_split(model, ids[:1, : min(windows.seqlen, 32)].to(device))
    pred = windows.predicted_after_first
    nll = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros((), dtype=torch.int64, device=device)
    with recorder if recorder is not None else contextlib.nullcontext():
        start = time.perf_counter()
        for b in range(0, windows.count, batch_size):
            x = ids[b : b + batch_size].to(device, non_blocking=True)  # [B, L]
            if b == 0 and pred < windows.seqlen - 1 and x.shape[0] > 1:  # window 0 predicts more: run it alone
                parts = [_batch_nll(model, split, x[:1], True, pred, loss_chunk),
                         _batch_nll(model, split, x[1:], False, pred, loss_chunk)]
            else:
                parts = [_batch_nll(model, split, x, b == 0, pred, loss_chunk)]
            for part_nll, part_hits in parts:
                nll, hits = nll + part_nll, hits + part_hits
            if progress:
                progress(min(b + batch_size, windows.count), windows.count)
        nll_sum = float(nll)  # synchronises the device
        seconds = time.perf_counter() - start
    if not math.isfinite(nll_sum):  # a perplexity from broken numbers is never reported as a result
        where = first_non_finite_module(model, ids[:1].to(device))
        raise MoeconvError(f"the model's outputs are NaN or Inf (first in {where} on window 0), so there is no perplexity to "
                           "report; its weights are broken: check the checkpoint (moeconv inspect) or re-create it")
    mean = nll_sum / windows.predicted
    return PerplexityResult(
        ppl=math.exp(mean),
        mean_nll=mean,
        nll_sum=nll_sum,
        predicted=windows.predicted,
        windows=windows.count,
        tokens=windows.count * windows.seqlen,
        seconds=seconds,
        tokens_per_s=windows.count * windows.seqlen / max(seconds, 1e-9),
        loss_path="chunked" if split is not None else "logits",
        top1=int(hits) / windows.predicted,
        top1_hits=int(hits),
    )


def _tokenize(model_path: str, settings: EvalSettings, progress: StageProgress | None):
    source = load_text(settings.data, settings.text_field)
    tokenizer = load_tokenizer(model_path, settings.tokenizer)
    tick = (lambda done, total: progress("tokenize", done, total)) if progress else None
    tokens = tokenize_source(source, tokenizer, progress=tick)  # [N]
    windows = cut_windows(tokens, settings.seqlen, settings.stride, settings.max_tokens)
    return source, tokenizer, tokens, windows


def evaluate_model(
    model_path: str | Path, settings: EvalSettings | None = None, progress: StageProgress | None = None, lm_eval_tasks: str | None = None
) -> EvalResult:
    """Load MODEL, tokenize the data once, and measure perplexity, speed, size and routing."""
    settings = settings or EvalSettings()
    model_path = str(model_path)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype)
    if lm_eval_tasks:
        require_lm_eval()
    # Data and tokenizer first: bad input fails in a second, before a slow model load.
    source, tokenizer, tokens, windows = _tokenize(model_path, settings, progress)
    tick = (lambda done, total: progress("eval", done, total)) if progress else None
    if use_llamacpp(model_path, settings.engine):  # the same windows of the same token ids, run by llama.cpp
        if lm_eval_tasks:
            raise MoeconvError("--lm-eval runs transformers models, and this model runs in llama.cpp (--engine)")
        run = evaluate_gguf(model_path, windows, tick)  # perplexity, params, dtype, device, batch_size
        return EvalResult(model=model_path, moe=run["params"].moe_layers > 0, data=source.name,
                          data_fingerprint=source.fingerprint, tokens_fingerprint=tokens_fingerprint(tokens),
                          seqlen=windows.seqlen, stride=windows.stride, max_tokens=settings.max_tokens,
                          tokens_available=windows.tokens_available, bytes_on_disk=bytes_on_disk(model_path), **run)
    model = load_model(model_path, dtype=settings.dtype, device=str(device), trust_remote_code=settings.trust_remote_code)
    batch_size = settings.batch_size or auto_batch_size(device)
    recorder = RoutingRecorder(model)
    result = evaluate_perplexity(model, windows, batch_size, settings.loss_chunk, tick, recorder)
    overhead = measure_dag_overhead(model, windows.ids[:1]) if settings.dag_overhead else None
    harness = run_lm_eval(model, tokenizer, lm_eval_tasks, batch_size) if lm_eval_tasks else None
    return EvalResult(
        model=model_path,
        moe=recorder.has_moe,
        data=source.name,
        data_fingerprint=source.fingerprint,
        tokens_fingerprint=tokens_fingerprint(tokens),
        seqlen=windows.seqlen,
        stride=windows.stride,
        max_tokens=settings.max_tokens,
        tokens_available=windows.tokens_available,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        batch_size=batch_size,
        perplexity=result,
        params=count_parameters(model),
        bytes_on_disk=bytes_on_disk(model_path),
        routing=recorder.layers(),
        dag_overhead=overhead,
        lm_eval=harness,
    )


def require_lm_eval():
    """(lm_eval, HFLM) or a one-line error saying how to install the harness."""
    try:
        import lm_eval  # optional (extra "lm-eval"): only --lm-eval needs it
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise MoeconvError("--lm-eval needs lm-evaluation-harness, which is not installed: pip install lm-eval") from None
    return lm_eval, HFLM


def run_lm_eval(model: nn.Module, tokenizer, tasks: str, batch_size: int) -> dict:
    """Hand the loaded model to lm-evaluation-harness (its own protocol: never compare with our perplexity)."""
    lm_eval, hflm = require_lm_eval()
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise MoeconvError("--lm-eval got no task names; pass e.g. --lm-eval arc_easy,hellaswag")
    out = lm_eval.simple_evaluate(model=hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=names)
    return {"tasks": names, "results": (out or {}).get("results", {})}
