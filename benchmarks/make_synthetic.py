"""A Llama-3-8B-shaped checkpoint with random weights (or one 70B-shaped layer), written tensor by tensor, optionally also as a GGUF.

    python benchmarks/make_synthetic.py /data/synth-8b --gguf Q8_0          # 32 layers: 16.1 GB bf16 + 8.5 GB Q8_0 GGUF
    python benchmarks/make_synthetic.py /data/synth-8b-4l --layers 4        # the same model's first 4 layers
    python benchmarks/make_synthetic.py /data/synth-70b-layer --shape 70b-layer
    python benchmarks/make_synthetic.py /tmp/tiny --layers 2 --hidden 256 --ffn 512 --heads 4 --kv-heads 2 --vocab 1024

OUT is a Hugging Face llama folder: config.json, sharded safetensors with model.safetensors.index.json, and a
byte-level BPE tokenizer (tokenizers library, trained on the Shakespeare train split, so calibration text tokenizes;
its ids are < --tokenizer-vocab and the rest of the embedding rows are never used). Every tensor is drawn from its own
generator, seeded from --seed and the tensor's name, so the output is the same on every run and `--layers 4` gives the
first 4 layers of the 32-layer model. Nothing is held but the tensor being written (the embedding, 1 GB in bf16 at 8B).
--gguf TYPE then exports OUT with `moeconv export --to gguf` (tensor by tensor, llama.cpp's q/k row order, the
tokenizer carried in the GGUF metadata) into OUT-TYPE/model.gguf.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import zlib
from pathlib import Path

# Run as a script, this folder is first on sys.path and its kernels.py would shadow the `kernels` package that
# transformers imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, PreTrainedTokenizerFast  # noqa: E402

from moeconv.calib.sources import load_text  # noqa: E402
from moeconv.export.api import export  # noqa: E402
from moeconv.export.registry import ExportOptions  # noqa: E402
from moeconv.io.stream_shard import StreamingShard  # noqa: E402
from moeconv.io.writer import plan_shards, shard_name  # noqa: E402

# Llama-3-8B and one layer of Llama-3-70B (vocab 128256, GQA with 8 KV heads, rope theta 500000, untied lm_head)
SHAPES = {
    "8b": dict(layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256),
    "70b-layer": dict(layers=1, hidden=8192, ffn=28672, heads=64, kv_heads=8, vocab=128256),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
STD = 0.02  # transformers' initializer_range for llama
CHUNK_ELEMENTS = 1 << 24  # float32 values drawn per step (64 MiB)
GGUF_BYTES_PER_VALUE = {"F32": 4, "F16": 2, "BF16": 2, "Q8_0": 34 / 32, "Q5_0": 22 / 32, "Q5_1": 24 / 32, "Q4_0": 18 / 32,
                        "Q4_1": 20 / 32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the folder to write (refused if it exists, unless --force)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    for name in ("layers", "hidden", "ffn", "heads", "kv-heads", "vocab"):
        p.add_argument(f"--{name}", type=int, help="override the shape's value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GB per safetensors shard (default 2)")
    p.add_argument("--tokenizer-vocab", type=int, default=8192, help="tokens the BPE tokenizer learns (at most --vocab)")
    p.add_argument("--gguf", metavar="TYPE", help="also write OUT-TYPE/model.gguf at this tensor type (Q8_0, Q4_0, F16, ...)")
    p.add_argument("--force", action="store_true", help="replace OUT (and OUT-TYPE) if they exist")
    return p.parse_args(argv)


def resolve_shape(args: argparse.Namespace) -> dict[str, int]:
    shape = dict(SHAPES[args.shape])
    shape.update({k: v for k in shape if (v := getattr(args, k)) is not None})
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"] or (shape["hidden"] // shape["heads"]) % 2:
        raise SystemExit(f"--heads {shape['heads']} / --kv-heads {shape['kv_heads']} do not divide --hidden {shape['hidden']} "
                         "into even-sized heads")
    if args.tokenizer_vocab > shape["vocab"] or args.tokenizer_vocab < 260:
        raise SystemExit(f"--tokenizer-vocab must lie between 260 (256 bytes + specials) and --vocab ({shape['vocab']})")
    return shape


def llama_config(shape: dict[str, int], dtype: str, bos: int, eos: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], head_dim=shape["hidden"] // shape["heads"],
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                       bos_token_id=bos, eos_token_id=eos, dtype=dtype, architectures=["LlamaForCausalLM"])


def units(shape: dict[str, int]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors in write order, grouped into units (embedding, each layer, final norm + lm_head): [(name, shape)]."""
    d, f, v = shape["hidden"], shape["ffn"], shape["vocab"]
    kv = shape["kv_heads"] * (d // shape["heads"])
    out = [[("model.embed_tokens.weight", (v, d))]]
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        out.append([(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (d, d)),
                    (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                    (p + "self_attn.o_proj.weight", (d, d)), (p + "post_attention_layernorm.weight", (d,)),
                    (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)), (p + "mlp.down_proj.weight", (d, f))])
    out.append([("model.norm.weight", (d,)), ("lm_head.weight", (v, d))])
    return out


def make_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Norms are ones (as initialised); every other tensor N(0, STD) from a generator of its own, drawn a few rows at a
    time so that nothing larger than the tensor itself is ever held."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, CHUNK_ELEMENTS // shape[-1])
    for start in range(0, shape[0], rows):
        block = torch.randn((min(rows, shape[0] - start), *shape[1:]), generator=generator)
        out[start:start + rows] = block.mul_(STD)
    return out


def train_tokenizer(vocab: int) -> Tokenizer:
    """A byte-level BPE tokenizer learned from the Shakespeare train split (the calibration default)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(load_text("shakespeare:train").documents, trainer)
    return tok


def write_weights(folder: Path, shape: dict[str, int], seed: int, dtype: torch.dtype, max_shard_bytes: int) -> int:
    """Sharded safetensors + index, one tensor in memory at a time.  -> total bytes of the tensors."""
    groups = units(shape)
    unit_bytes = [sum(math.prod(s) * dtype.itemsize for _, s in unit) for unit in groups]
    shards = plan_shards(unit_bytes, max_shard_bytes)
    weight_map = {}
    for index, members in enumerate(shards):
        name = shard_name(index, len(shards))
        entries = [(t, s, dtype) for u in members for t, s in groups[u]]
        shard = StreamingShard(folder / name, entries, metadata={"format": "pt"})
        for tensor_name, tensor_shape, _ in entries:
            shard.write(tensor_name, make_tensor(tensor_name, tensor_shape, seed, dtype))
            weight_map[tensor_name] = name
        shard.close()
        print(f"  {name}: {len(entries)} tensors", file=sys.stderr, flush=True)
    total = sum(unit_bytes)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=2))
    return total


def gguf_bytes(shape: dict[str, int], qtype: str) -> int:
    """About what --gguf TYPE writes: 2-D weights at TYPE, norms float32."""
    per = GGUF_BYTES_PER_VALUE.get(qtype.upper(), 2)
    return int(sum(math.prod(s) * (per if len(s) == 2 else 4) for unit in units(shape) for _, s in unit))


def make(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shape = resolve_shape(args)
    dtype = DTYPES[args.dtype]
    out: Path = args.out
    gguf_out = out.with_name(f"{out.name}-{args.gguf.upper()}") if args.gguf else None
    for folder in filter(None, (out, gguf_out)):
        if folder.exists() and not args.force:
            raise SystemExit(f"{folder} exists; pass --force to replace it")
    need = sum(math.prod(s) for unit in units(shape) for _, s in unit) * dtype.itemsize
    need += gguf_bytes(shape, args.gguf) if args.gguf else 0
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise SystemExit(f"needs {need / 1e9:.1f} GB on {out.parent}, {free / 1e9:.1f} GB free")
    print(f"writing {out} ({shape}, {args.dtype}, seed {args.seed}): {need / 1e9:.2f} GB in all", file=sys.stderr, flush=True)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    tok = train_tokenizer(args.tokenizer_vocab)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    hf_tok.save_pretrained(partial)
    llama_config(shape, args.dtype, tok.token_to_id(BOS), tok.token_to_id(EOS)).save_pretrained(partial)
    total = write_weights(partial, shape, args.seed, dtype, int(args.max_shard_size * 1e9))
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    result = {"out": str(out), "shape": shape, "dtype": args.dtype, "seed": args.seed, "weight_bytes": total,
              "tokenizer_vocab": tok.get_vocab_size()}
    if gguf_out is not None:
        print(f"exporting {gguf_out}/model.gguf ({args.gguf.upper()})", file=sys.stderr, flush=True)
        export(out, gguf_out, "gguf", ExportOptions(tensor_type=args.gguf.upper()), force=args.force)
        result["gguf"] = str(gguf_out / "model.gguf")
        result["gguf_bytes"] = (gguf_out / "model.gguf").stat().st_size
    return result


if __name__ == "__main__":
    print(json.dumps(make(), indent=2))
