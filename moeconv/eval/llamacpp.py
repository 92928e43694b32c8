"""Perplexity of a GGUF in llama.cpp (llama-cpp-python) on moeconv's windows, fed the HF tokenizer's ids."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from moeconv.calib.tokenize import Windows
from moeconv.errors import MoeconvError
from moeconv.eval.scoring import score_tokens
from moeconv.eval.stats import ParameterCounts

ENGINES = ("auto", "transformers", "llama.cpp")
GGML_TYPE_F32 = 0  # ggml_type of an F32 KV cache: the default F16 cache would round every key and value
DEVICE = "cpu (llama.cpp)"


def gguf_file(path: str | Path) -> Path | None:
    """The .gguf a model path names (the file, or a folder's only .gguf beside no config.json), else None."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(p.glob("*.gguf"))
        return found[0] if len(found) == 1 else None
    return None


def _fields(path: Path) -> dict:
    from gguf import GGUFReader  # gguf is optional (extra 'gguf'): only GGUF models need it

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    fields["tensors"] = [(t.name, tuple(int(n) for n in t.shape), t.tensor_type.name) for t in reader.tensors]
    return fields


def is_moe_gguf(path: Path) -> bool:
    try:
        fields = _fields(path)
    except Exception:  # noqa: BLE001 - an unreadable GGUF: transformers' loader reports it, as for any model
        return False
    return bool(fields.get(f"{fields.get('general.architecture')}.expert_count"))


def use_llamacpp(model_path: str | Path, engine: str) -> bool:
    """Whether `moeconv eval` runs MODEL in llama.cpp: asked for, or a MoE GGUF (transformers has no loader for those)."""
    if engine not in ENGINES:
        raise MoeconvError(f"unknown --engine '{engine}'; use one of {', '.join(ENGINES)}")
    found = gguf_file(model_path)
    if engine == "llama.cpp" and found is None:
        raise MoeconvError(f"--engine llama.cpp runs .gguf files and {model_path} is not one; export it first "
                           "(moeconv export SRC OUT --to gguf)")
    if engine == "transformers" or found is None:
        return False
    return engine == "llama.cpp" or is_moe_gguf(found)


def require_llama_cpp():
    try:
        import llama_cpp  # optional (extra 'serve'): only llama.cpp evaluation needs it
    except ImportError:
        raise MoeconvError("this GGUF runs in llama.cpp (transformers cannot load MoE GGUFs), and llama-cpp-python is not "
                           "installed: pip install '.[serve]' (make setup installs it)") from None
    return llama_cpp


def gguf_parameters(path: Path) -> ParameterCounts:
    """Parameter counts read from the GGUF's tensor shapes: a token uses all but (E - k)/E of the expert tensors."""
    fields = _fields(path)
    arch = fields.get("general.architecture")
    experts, top_k = fields.get(f"{arch}.expert_count"), fields.get(f"{arch}.expert_used_count")
    sizes = {name: math.prod(shape) for name, shape, _ in fields["tensors"]}
    expert = sum(n for name, n in sizes.items() if name.endswith("_exps.weight"))
    total = sum(sizes.values())
    inactive = expert * (experts - top_k) // experts if experts else 0
    return ParameterCounts(
        total=total, active=total - inactive, expert=expert,
        embedding=sizes.get("token_embd.weight", 0) + sizes.get("output.weight", 0),
        moe_layers=sum(1 for name in sizes if name.endswith("ffn_gate_inp.weight")),
        num_experts=experts or None, top_k=top_k or None,
    )


def gguf_tensor_type(path: Path) -> str:
    """The type most of the GGUF's weight matrices are stored in (F32, F16, Q8_0, ...)."""
    counts: dict[str, int] = {}
    for _, shape, qtype in _fields(path)["tensors"]:
        if len(shape) >= 2:
            counts[qtype] = counts.get(qtype, 0) + math.prod(shape)
    return max(counts, key=counts.get) if counts else "unknown"


def open_llama(path: Path, n_ctx: int, threads: int | None = None, all_logits: bool = True, f32_cache: bool = True):
    """A llama_cpp.Llama on the CPU, quiet; an F32 KV cache unless asked otherwise (evaluation measures the weights)."""
    llama_cpp = require_llama_cpp()
    threads = threads or torch.get_num_threads()
    cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), n_threads=threads,
                           n_threads_batch=threads, logits_all=all_logits, n_gpu_layers=0, verbose=False, **cache)


def window_logits(llm, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits at every position of one fresh sequence.  -> [len(ids), V] float32"""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def window_nll(logits: torch.Tensor, ids: torch.Tensor, first: bool, pred: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and top-1 hits of one window as moeconv.eval.perplexity scores it: its last `pred` tokens (window 0:
    all after the first).  logits [L, V], ids [L]"""
    seqlen = ids.shape[0]
    start = 0 if first else seqlen - 1 - pred
    return score_tokens(logits[start : seqlen - 1], ids[start + 1 :], None, chunk)  # [N, V], [N]


def evaluate_gguf(model_path: str | Path, windows: Windows, progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity of a GGUF in llama.cpp on `windows` (one window per fresh sequence, as transformers sees them).

    -> the EvalResult fields this engine determines: perplexity, params, dtype, device, batch_size."""
    path, threads = gguf_file(model_path), torch.get_num_threads()
    llm = open_llama(path, windows.seqlen, threads)
    pred = windows.predicted_after_first
    nll, hits = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
    start = time.perf_counter()
    for w in range(windows.count):
        ids = windows.ids[w]  # [L]
        window, window_hits = window_nll(window_logits(llm, ids.tolist()), ids, w == 0, pred)
        nll, hits = nll + window, hits + window_hits
        if progress:
            progress(w + 1, windows.count)
    seconds = time.perf_counter() - start
    llm.close()
    nll_sum = float(nll)
    if not math.isfinite(nll_sum):
        raise MoeconvError(f"llama.cpp's logits of {path} are NaN or Inf, so there is no perplexity to report; check the "
                           "file with `moeconv inspect` or re-export it")
    mean = nll_sum / windows.predicted
    tokens = windows.count * windows.seqlen
    perplexity = dict(ppl=math.exp(mean), mean_nll=mean, nll_sum=nll_sum, predicted=windows.predicted, windows=windows.count,
                      tokens=tokens, seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9), loss_path="llama.cpp",
                      top1=int(hits) / windows.predicted, top1_hits=int(hits))
    return {"perplexity": perplexity, "params": gguf_parameters(path), "dtype": gguf_tensor_type(path),
            "device": f"{DEVICE}, {threads} thread{'s' if threads > 1 else ''}", "batch_size": 1}
