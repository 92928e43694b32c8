"""Runtime quantized linear layer (pure PyTorch; copied into checkpoints, so it imports only torch and the stdlib).

Formats and bit layouts are documented in docs/quant-formats.md. A module is described by a format dict
(config.json's per-module `quant` entry):
    {"format": "int8"|"int4"|"int3"|"int2"|"ternary"|"sub1", "in_features": I, "out_features": O,
     "group_size": G or -1, "symmetric": bool,                         # intN only
     "num_codes": n, "dictionary_size": N, "shared_dictionary": bool,  # sub1 only
     "block_rows": R,  # sub1: rows per code block (absent in checkpoints written before blocks: one row, `row_offsets`)
     "lo_hi": "log8"}  # ternary/sub1: 8-bit lo/hi codes on a per-tensor log scale (absent: the older bf16 `lo_hi`)
Other keys (e.g. "method") are ignored.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # the native kernels, present only where moeconv itself is installed (moeconv/kernels/quant_api.py)
    from moeconv.kernels.quant_api import quantized_linear as _native_linear
except Exception:  # noqa: BLE001 - any failure means: use the pure-PyTorch path below
    _native_linear = None

LAYOUT_VERSION = 1  # config.moe.quant["layout"]: the stored layout below (docs/quant-formats.md); absent = 1
INT_BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
FORMATS = (*INT_BITS, "ternary", "sub1")
SUB1_MAX_PAIRS = 14  # pairs per dictionary entry: 28 symbols x 2 bits + a 4-bit length fit one int64
SUB1_LENGTH_SHIFT = 56
SUB1_BLOCK_ROWS = 32  # rows per sub1 code block: one int32 offset per block; codes may span rows inside a block
SUB1_NUM_LETTERS = 9  # ternary symbols {0, 1 = lo, 2 = hi} taken two at a time
SUB1_MAX_ENTRIES = 2**16  # codes are uint16
LOG8_STEPS = 254  # lo/hi magnitude codes 1..255 span the tensor's [smallest, largest] magnitude in 254 log steps


def chunk_layout(bits: int) -> tuple[int, int]:
    """(values, bytes) of one packing chunk: the smallest whole number of bytes holding whole values."""
    chunk_bits = bits * 8 // math.gcd(bits, 8)
    return chunk_bits // bits, chunk_bits // 8


def packed_bytes(n: int, bits: int) -> int:
    """Bytes taken by `n` values of `bits` bits (the row is padded to whole chunks)."""
    values, nbytes = chunk_layout(bits)
    return -(-n // values) * nbytes


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """uint8 [..., packed_bytes(n, bits)] -> uint8 codes [..., n] (little-endian bit order within each chunk)."""
    values, nbytes = chunk_layout(bits)
    lead = packed.shape[:-1]
    chunks = packed.reshape(*lead, -1, nbytes).long()  # [..., n_chunks, nbytes]
    byte_shifts = torch.arange(0, 8 * nbytes, 8, device=packed.device)
    words = (chunks << byte_shifts).sum(dim=-1, keepdim=True)  # [..., n_chunks, 1]
    value_shifts = torch.arange(0, bits * values, bits, device=packed.device)
    codes = (words >> value_shifts) & (2**bits - 1)  # [..., n_chunks, values]
    return codes.reshape(*lead, -1)[..., :n].to(torch.uint8)


def sub1_block_rows(fmt: Mapping) -> int:
    """Rows per code block of a sub1 format dict (1 in the older per-row layout)."""
    return int(fmt.get("block_rows", 1))


def sub1_index_name(fmt: Mapping) -> str:
    """Buffer holding the code index of the first code of each block: `block_offsets`, or the older `row_offsets`."""
    return "block_offsets" if "block_rows" in fmt else "row_offsets"


def decode_sub1(codes: Tensor, table: Tensor, rows: int, row_len: int) -> Tensor:
    """Decode a sub1 code stream (uint16 [n]) with its dictionary (int64 [N]) into symbols uint8 [rows, row_len].

    The stream is the concatenation of every row's padded pairs, so it decodes in one piece whatever the block
    size: block offsets only let a kernel start at a block without decoding the codes before it."""
    entries = table[codes.long()]  # [n] int64
    n_pairs = (entries >> SUB1_LENGTH_SHIFT) & 15  # [n]
    shifts = torch.arange(0, 4 * SUB1_MAX_PAIRS, 2, device=codes.device)  # [28]
    symbols = ((entries[:, None] >> shifts) & 3).to(torch.uint8)  # [n, 28]
    keep = shifts[None, :] < 4 * n_pairs[:, None]  # symbol k is valid when k < 2 * pairs
    flat = symbols[keep]  # row-major: the code stream order
    padded = row_len + row_len % 2  # odd rows end with a half-used pair
    if flat.numel() != rows * padded:
        raise ValueError(f"sub1 stream decodes to {flat.numel()} symbols, expected {rows} rows x {padded}")
    return flat.reshape(rows, padded)[:, :row_len]


def ternary_values(symbols: Tensor, lo_hi: Tensor) -> Tensor:
    """fp32 [rows, k] values of ternary symbols given lo_hi [rows, 2]."""
    lo_hi = lo_hi.float()
    zero = torch.zeros((), dtype=torch.float32, device=symbols.device)
    return torch.where(symbols == 2, lo_hi[:, 1:], torch.where(symbols == 1, lo_hi[:, :1], zero))


def log8_levels(smallest: float, largest: float) -> Tensor:
    """float32 [256]: the magnitude of each 8-bit lo/hi code of a tensor whose nonzero lo/hi magnitudes span
    [smallest, largest]. Code 0 is 0; codes 1..255 are geometric from `smallest` (code 1) to `largest` (code 255),
    both exact, so the grid of a set of levels can be found again from its own extremes.

    Computed with Python floats (one libm exp per level, rounded once to float32) so that the quantizer's grid and
    every decoder agree bit for bit whatever the device or tensor shape."""
    if not (math.isfinite(smallest) and math.isfinite(largest) and 0 <= smallest <= largest):
        raise ValueError(f"lo/hi magnitude range ({smallest}, {largest}) is invalid; expected 0 <= smallest <= largest")
    if smallest == 0:  # a tensor whose lo and hi are all 0
        if largest != 0:
            raise ValueError(f"lo/hi magnitude range ({smallest}, {largest}) is invalid; the smallest magnitude is > 0")
        return torch.zeros(LOG8_STEPS + 2, dtype=torch.float32)
    start = math.log(smallest)
    step = (math.log(largest) - start) / LOG8_STEPS
    inner = [math.exp(start + k * step) for k in range(1, LOG8_STEPS)]
    return torch.tensor([0.0, smallest, *inner, largest], dtype=torch.float32)


def log8_lo_hi(codes: Tensor, mag_range: Tensor) -> Tensor:
    """fp32 lo_hi [rows, 2] from 8-bit magnitude codes [rows, 2] (uint8) and the tensor's range [2] (float32):
    lo = -level(code 0), hi = +level(code 1)."""
    smallest, largest = mag_range.tolist()
    levels = log8_levels(smallest, largest).to(codes.device)[codes.long()]  # [rows, 2]
    return (levels * torch.tensor([-1.0, 1.0], device=codes.device)).add_(0.0)  # + 0.0: a zero lo is +0, not -0


def lo_hi_of(buffers: Mapping[str, Tensor], fmt: Mapping) -> Tensor:
    """fp32 lo_hi [rows, 2] of a ternary/sub1 module: decoded from `lo_hi_codes`/`lo_hi_range` (log8), or bf16 `lo_hi`."""
    if fmt.get("lo_hi") == "log8":
        return log8_lo_hi(buffers["lo_hi_codes"], buffers["lo_hi_range"])
    return buffers["lo_hi"].float()


def _lo_hi_specs(fmt: Mapping, rows: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    layout = fmt.get("lo_hi", "bf16")
    if layout == "log8":
        return {"lo_hi_codes": ((rows, 2), torch.uint8), "lo_hi_range": ((2,), torch.float32)}
    if layout == "bf16":
        return {"lo_hi": ((rows, 2), torch.bfloat16)}
    raise ValueError(f"unknown lo/hi layout {layout!r}; expected 'log8' or 'bf16'")


def build_sub1_table(counts: Sequence[int] | Tensor, size: int = SUB1_MAX_ENTRIES, max_pairs: int = SUB1_MAX_PAIRS) -> Tensor:
    """The sub1 decode table (int64 [N], N <= size): a Tunstall dictionary of 1..max_pairs pair letters for i.i.d.
    letters with `counts` [9]. A deterministic function of the counts, so a checkpoint may store only them.

    Codes 0..8 are the single letters (always present, so every row can be encoded). Then, best-first from a heap,
    the most probable sequence shorter than max_pairs is expanded: all its children (one more letter, each letter
    seen in `counts`) become entries, while a whole expansion still fits. Bit-for-bit reproducible: Python floats
    (IEEE double: the same products on every platform) and a heap whose ties are broken by creation order.
    """
    counts = [float(c) for c in (counts.tolist() if isinstance(counts, Tensor) else counts)]
    if len(counts) != SUB1_NUM_LETTERS or not all(c >= 0 for c in counts):
        raise ValueError(f"sub1 pair counts must be {SUB1_NUM_LETTERS} non-negative numbers, got {counts}")
    total = sum(counts)
    probs = [c / total for c in counts] if total > 0 else [1.0 / SUB1_NUM_LETTERS] * SUB1_NUM_LETTERS
    seen = [a for a in range(SUB1_NUM_LETTERS) if probs[a] > 0]
    nibble = [(a % 3) | ((a // 3) << 2) for a in range(SUB1_NUM_LETTERS)]  # letter -> (s0, s1) bits of an entry
    entries = [nibble[a] | (1 << SUB1_LENGTH_SHIFT) for a in range(SUB1_NUM_LETTERS)]
    heap = [(-probs[a], a, probs[a], nibble[a], 1) for a in seen]  # (-p, tiebreak, p, entry bits, pairs)
    heapq.heapify(heap)
    tiebreak = SUB1_NUM_LETTERS  # unique: equal probabilities expand the older sequence first
    while heap and len(entries) + len(seen) <= size:
        _, _, p, bits, length = heapq.heappop(heap)
        if length >= max_pairs:
            continue
        for letter in seen:
            child_bits = bits | (nibble[letter] << (4 * length))
            entries.append(child_bits | ((length + 1) << SUB1_LENGTH_SHIFT))
            heapq.heappush(heap, (-p * probs[letter], tiebreak, p * probs[letter], child_bits, length + 1))
            tiebreak += 1
    return torch.tensor(entries, dtype=torch.int64)


def buffer_specs(fmt: Mapping) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every stored buffer of a format dict."""
    name, rows, cols = fmt["format"], int(fmt["out_features"]), int(fmt["in_features"])
    if name in INT_BITS:
        bits, group = INT_BITS[name], int(fmt.get("group_size", -1))
        n_groups = 1 if group == -1 else cols // group
        specs = {"qweight": ((rows, packed_bytes(cols, bits)), torch.uint8), "scales": ((rows, n_groups), torch.float16)}
        if fmt.get("float_zeros", False):  # fp16 zero points: w = (code - zero) * scale with a fractional zero
            specs["zeros"] = ((rows, n_groups), torch.float16)
        elif not fmt.get("symmetric", False):
            specs["qzeros"] = ((rows, packed_bytes(n_groups, bits)), torch.uint8)
        return specs
    if name == "ternary":
        return {"qweight": ((rows, packed_bytes(cols, 2)), torch.uint8), **_lo_hi_specs(fmt, rows)}
    if name == "sub1":
        block_rows = sub1_block_rows(fmt)
        if block_rows < 1:
            raise ValueError(f"sub1 block_rows {block_rows} must be >= 1")
        return {
            "codes": ((int(fmt["num_codes"]),), torch.uint16),
            sub1_index_name(fmt): ((-(-rows // block_rows),), torch.int32),
            **_lo_hi_specs(fmt, rows),
            "dictionary": ((int(fmt["dictionary_size"]),), torch.int64),
        }
    raise ValueError(f"unknown quantization format {name!r}; expected one of {FORMATS}")


def dequantize_buffers(buffers: Mapping[str, Tensor], fmt: Mapping) -> Tensor:
    """fp32 [out, in] weight from stored buffers."""
    name, rows, cols = fmt["format"], int(fmt["out_features"]), int(fmt["in_features"])
    if name == "ternary":
        return ternary_values(unpack_bits(buffers["qweight"], 2, cols), lo_hi_of(buffers, fmt))
    if name == "sub1":
        symbols = decode_sub1(buffers["codes"], buffers["dictionary"], rows, cols)
        return ternary_values(symbols, lo_hi_of(buffers, fmt))
    bits = INT_BITS[name]
    codes = unpack_bits(buffers["qweight"], bits, cols)  # [out, in]
    scales = buffers["scales"].float()  # [out, n_groups]
    n_groups = scales.shape[1]
    if "zeros" in buffers:
        zeros = buffers["zeros"].float()  # [out, n_groups]
    elif "qzeros" in buffers:
        zeros = unpack_bits(buffers["qzeros"], bits, n_groups).float()  # [out, n_groups]
    else:  # symmetric: the zero point is the middle code
        zeros = torch.full_like(scales, float(2 ** (bits - 1)))
    grouped = codes.reshape(rows, n_groups, cols // n_groups).float()  # [out, n_groups, G]
    return ((grouped - zeros[..., None]) * scales[..., None]).reshape(rows, cols)


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored packed; W is dequantized on every call (nothing cached).

    With fmt["shared_dictionary"] (sub1), the dictionary is not part of this module's state_dict: the model
    stores one table and hands it to every such module with attach_dictionary() after loading.
    """

    def __init__(self, fmt: Mapping, bias: bool = False, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        if fmt.get("format") not in FORMATS:
            raise ValueError(f"unknown quantization format {fmt.get('format')!r}; expected one of {FORMATS}")
        self.fmt = dict(fmt)
        self.in_features, self.out_features = int(fmt["in_features"]), int(fmt["out_features"])
        shared = bool(fmt.get("shared_dictionary", False))
        for name, (shape, buf_dtype) in buffer_specs(fmt).items():
            persistent = not (shared and name == "dictionary")
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device), persistent=persistent)
        bias_dtype = dtype or torch.get_default_dtype()
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=bias_dtype)) if bias else None

    @classmethod
    def from_packed(cls, buffers: Mapping[str, Tensor], fmt: Mapping, bias: Tensor | None = None) -> QuantLinear:
        """Build from packed tensors (packing.pack's output) and their format dict."""
        module = cls(fmt, bias=bias is not None, device=next(iter(buffers.values())).device)
        expected = buffer_specs(fmt)
        if set(buffers) != set(expected):
            raise ValueError(f"buffers {sorted(buffers)} do not match format {fmt['format']}: {sorted(expected)}")
        for name, (shape, buf_dtype) in expected.items():
            tensor = buffers[name]
            if tuple(tensor.shape) != shape or tensor.dtype != buf_dtype:
                raise ValueError(f"buffer {name}: got {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {buf_dtype}")
            shared = name == "dictionary" and bool(fmt.get("shared_dictionary", False))
            setattr(module, name, tensor if shared else tensor.clone())  # a shared table is referenced
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return module

    def attach_dictionary(self, table: Tensor) -> None:
        """Point a sub1 module at a (possibly shared) dictionary table; the tensor is referenced, not copied."""
        if self.fmt["format"] != "sub1" or table.shape != self.dictionary.shape or table.dtype != torch.int64:
            raise ValueError(f"dictionary {tuple(table.shape)} {table.dtype} does not fit this {self.fmt['format']} module")
        self.dictionary = table

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        buffers = dict(self.named_buffers(recurse=False))
        return dequantize_buffers(buffers, self.fmt).to(dtype)  # [out, in]

    def lo_hi_float(self) -> Tensor:
        """fp32 lo_hi [out, 2] (ternary/sub1), decoded again only when its buffers change (the kernels read it per call)."""
        sources = [self._buffers[n] for n in ("lo_hi_codes", "lo_hi_range", "lo_hi") if n in self._buffers]
        key = tuple((id(t), t._version, t.device) for t in sources)
        cached = self.__dict__.get("_lo_hi_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_lo_hi_cache"] = (key, lo_hi_of(self._buffers, self.fmt))
        return cached[1]

    def forward(self, x: Tensor) -> Tensor:
        y = None if _native_linear is None else _native_linear(self, x)  # the same function, without a float W
        if y is not None:
            return y
        weight = self.dequantize_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.fmt.get('group_size')}" if self.fmt["format"] in INT_BITS else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt['format']}{group}"


SUB1_DICTIONARY_KEY = "quant.sub1_dictionary"  # state-dict key of the model's one shared sub1 table (older checkpoints)
SUB1_PAIR_COUNTS_KEY = "quant.sub1_pair_counts"  # ... or of its 9 pair-letter counts, from which the table is rebuilt


class SharedDictionary(nn.Module):
    """The model's one sub1 decode table (int64 [N]), stored either as its 9 pair-letter counts
    (`quant.sub1_pair_counts`, the table rebuilt with build_sub1_table when first needed) or, in older checkpoints,
    as the table itself (`quant.sub1_dictionary`)."""

    def __init__(self, size: int, device=None, from_counts: bool = False):
        super().__init__()
        self.size, self.from_counts = size, from_counts
        if from_counts:
            self.register_buffer("sub1_pair_counts", torch.zeros(SUB1_NUM_LETTERS, dtype=torch.int64, device=device))
            self._built: tuple[tuple, list[int], Tensor] | None = None  # (buffer identity, counts, table)
        else:
            self.register_buffer("sub1_dictionary", torch.zeros(size, dtype=torch.int64, device=device), persistent=True)

    def table(self) -> Tensor:
        if not self.from_counts:
            return self.sub1_dictionary
        counts = self.sub1_pair_counts
        identity = (id(counts), counts._version, counts.device)  # changes when loading or .to() replaces/fills it
        if self._built is not None and self._built[0] == identity:
            return self._built[2]
        values = [int(c) for c in counts.tolist()]
        if self._built is not None and self._built[1] == values:
            table = self._built[2].to(counts.device)
        else:
            if not any(values):
                raise ValueError(f"{SUB1_PAIR_COUNTS_KEY} is all zeros: the checkpoint lacks it; re-run moeconv quantize")
            table = build_sub1_table(values).to(counts.device)
            if table.numel() != self.size:
                raise ValueError(f"the sub1 table rebuilt from {SUB1_PAIR_COUNTS_KEY} has {table.numel()} entries, the config "
                                 f"says {self.size}: the checkpoint is corrupt; re-run moeconv quantize")
        self._built = (identity, values, table)
        return table


def quant_modules(quant: Mapping) -> dict[str, dict]:
    """Module name -> format dict, from config.moe["quant"] in either form:
    {"modules": {name: fmt}, "default": {...}, ...} (what moeconv quantize writes) or a plain {name: fmt}."""
    modules = quant.get("modules") if isinstance(quant.get("modules"), Mapping) else quant
    return {name: dict(fmt) for name, fmt in modules.items() if isinstance(fmt, Mapping) and "format" in fmt}


class SharedDictionaryLinear(QuantLinear):
    """A sub1 QuantLinear whose decode table is the model's one SharedDictionary buffer, read at every call
    (so loading, .to() and dtype casts of the model need no re-attaching and never copy the table per module)."""

    def __init__(self, fmt: Mapping, holder: SharedDictionary, bias: bool = False, device=None, dtype: torch.dtype | None = None):
        super().__init__({**fmt, "shared_dictionary": True}, bias=bias, device=device, dtype=dtype)
        del self._buffers["dictionary"]
        self._non_persistent_buffers_set.discard("dictionary")
        object.__setattr__(self, "holder", holder)  # a plain reference: the holder is registered once, on the model

    @property
    def dictionary(self) -> Tensor:
        return self.holder.table()

    def attach_dictionary(self, table: Tensor) -> None:
        raise ValueError("this module reads the model's shared dictionary; load the table into model.quant instead")

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        buffers = {**dict(self.named_buffers(recurse=False)), "dictionary": self.dictionary}
        return dequantize_buffers(buffers, self.fmt).to(dtype)  # [out, in]


def replace_with_quant_linear(model: nn.Module, quant: Mapping) -> nn.Module:
    """Swap every module named in `quant` (nn.Linear or transformers' Conv1D) for a QuantLinear of its format.

    sub1 modules with a shared dictionary read it from one SharedDictionary added to the model as `quant`
    (state-dict key `quant.sub1_pair_counts` when quant["sub1_dictionary"] names it, else the older `quant.sub1_dictionary`).
    """
    layout = int(quant.get("layout", 1))
    if layout > LAYOUT_VERSION:
        raise ValueError(f"quantized layout version {layout} is newer than this code's {LAYOUT_VERSION}; upgrade moeconv")
    modules = quant_modules(quant)
    shared = [fmt for fmt in modules.values() if fmt["format"] == "sub1" and fmt.get("shared_dictionary")]
    holder = None
    if shared:
        from_counts = quant.get("sub1_dictionary") == SUB1_PAIR_COUNTS_KEY
        holder = SharedDictionary(int(shared[0]["dictionary_size"]), from_counts=from_counts)
        model.add_module(SUB1_DICTIONARY_KEY.split(".")[0], holder)
    for name, fmt in modules.items():
        old = model.get_submodule(name)
        bias = getattr(old, "bias", None)
        kwargs = dict(bias=isinstance(bias, Tensor), device=bias.device if isinstance(bias, Tensor) else None,
                      dtype=bias.dtype if isinstance(bias, Tensor) else None)
        if holder is not None and fmt["format"] == "sub1" and fmt.get("shared_dictionary"):
            new = SharedDictionaryLinear(fmt, holder, **kwargs)
        else:
            new = QuantLinear(fmt, **kwargs)
        model.set_submodule(name, new)
    return model
