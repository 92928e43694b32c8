"""Packing round trips of every format and the runtime QuantLinear (exact outputs, safetensors state_dict)."""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moeconv.errors import CheckpointError
from moeconv.modeling.hf import quant_linear
from moeconv.modeling.hf.quant_linear import QuantLinear, unpack_bits
from moeconv.quant import sub1
from moeconv.quant.grids import QuantSpec, dequantize, quantize_rtn
from moeconv.quant.packing import pack, pack_bits, stored_bits_of_format, unpack

# (spec, out, in): odd shapes, groups that are and are not the whole row
CASES = [
    (QuantSpec(8, 9), 7, 45),
    (QuantSpec(8, -1, True), 5, 33),
    (QuantSpec(4, 5), 13, 35),
    (QuantSpec(4, 16, True), 3, 48),
    (QuantSpec(3, 7), 11, 21),
    (QuantSpec(3, -1), 6, 13),
    (QuantSpec(3, 3, True), 4, 9),
    (QuantSpec(2, 11), 9, 33),
    (QuantSpec(2, -1, True), 5, 7),
    (QuantSpec(4, 5, float_zeros=True), 13, 35),
    (QuantSpec(3, -1, float_zeros=True), 6, 13),
    (QuantSpec(2, 11, float_zeros=True), 9, 33),
    (QuantSpec("ternary"), 17, 31),
    (QuantSpec("sub1"), 17, 31),
    (QuantSpec("sub1"), 6, 1),
    (QuantSpec("sub1"), 70, 20),  # 3 blocks of 32 rows, the last one short
]
IDS = [f"{s.format}-g{s.group_size}{'-sym' if s.symmetric else ''}{'-fz' if s.float_zeros else ''}-{o}x{i}" for s, o, i in CASES]


def _quantized(spec, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[w.abs() < 0.8] = 0  # many zeros, as ternary matrices have
    return quantize_rtn(w, spec)


def _pack(q):
    """pack(), with a small sub1 dictionary: the default 2^16 entries would only slow these tests down."""
    if q.spec.bits != "sub1":
        return pack(q)
    return pack(q, sub1.build_dictionary(sub1.pair_counts(q.codes), size=300))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 2, 3, 7, 8, 9, 17, 64, 101):
        codes = torch.randint(0, 2**bits, (3, n), generator=g).to(torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape[1] == quant_linear.packed_bytes(n, bits)
        assert torch.equal(unpack_bits(packed, bits, n), codes)
    # documented layout: int4 low nibble first, int3 eight values little-endian in three bytes
    assert pack_bits(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    assert pack_bits(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 7]], dtype=torch.uint8), 3).tolist() == [[1, 0, 0xE0]]


@pytest.mark.parametrize(("spec", "rows", "cols"), CASES, ids=IDS)
def test_pack_unpack_is_bit_exact(spec, rows, cols):
    for seed in range(3):
        q = _quantized(spec, rows, cols, seed)
        packed = _pack(q)
        back = unpack(packed.buffers, packed.fmt)
        assert back.spec == spec
        assert torch.equal(back.codes, q.codes)
        for name in ("scales", "zeros", "lo_hi"):
            a, b = getattr(q, name), getattr(back, name)
            assert (a is None and b is None) or torch.equal(a, b)
        assert torch.equal(dequantize(back), dequantize(q))


@pytest.mark.parametrize(("spec", "rows", "cols"), CASES, ids=IDS)
def test_quant_linear_matches_dequantized_linear_exactly(spec, rows, cols):
    q = _quantized(spec, rows, cols, seed=5)
    packed = _pack(q)
    bias = torch.randn(rows)
    module = QuantLinear.from_packed(packed.buffers, packed.fmt, bias=bias)
    x = torch.randn(2, 3, cols)
    weight = dequantize(q)
    assert torch.equal(module(x), F.linear(x, weight, bias))
    assert torch.equal(module.dequantize_weight(), weight)
    x16 = x.bfloat16()
    assert torch.equal(module(x16), F.linear(x16, weight.bfloat16(), bias.bfloat16()))


@pytest.mark.parametrize(("spec", "rows", "cols"), CASES, ids=IDS)
def test_state_dict_round_trips_through_safetensors(spec, rows, cols, tmp_path):
    packed = _pack(_quantized(spec, rows, cols, seed=7))
    module = QuantLinear.from_packed(packed.buffers, packed.fmt, bias=torch.randn(rows))
    path = tmp_path / "q.safetensors"
    save_file(module.state_dict(), str(path))
    loaded = QuantLinear(packed.fmt, bias=True)  # built from the format dict alone, as from config.json
    loaded.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(4, cols)
    assert torch.equal(loaded(x), module(x))


def test_shared_sub1_dictionary_is_stored_once_and_attached():
    g = torch.Generator().manual_seed(3)
    qs = [_quantized(QuantSpec("sub1"), 8, 20 + i, seed=i) for i in range(3)]
    shared = sub1.build_dictionary(sum(sub1.pair_counts(q.codes) for q in qs), size=500)
    for q in qs:
        packed = pack(q, shared, shared_dictionary=True)
        module = QuantLinear.from_packed(packed.buffers, packed.fmt)
        assert "dictionary" not in module.state_dict() and module.dictionary is shared.table
        fresh = QuantLinear(packed.fmt)
        fresh.load_state_dict(module.state_dict(), strict=True)
        fresh.attach_dictionary(shared.table)
        assert fresh.dictionary is shared.table  # referenced, not copied
        x = torch.randn(2, q.shape[1], generator=g)
        assert torch.equal(fresh(x), F.linear(x, dequantize(q)))
        assert packed.bits_per_weight(include_dictionary=False) < packed.bits_per_weight()


def test_sub1_pack_builds_a_full_private_dictionary_by_default():
    q = _quantized(QuantSpec("sub1"), 5, 23, seed=4)
    packed = pack(q)
    assert bool((sub1.pair_counts(q.codes) > 0).all())  # all 9 letters: entries 9 + 9 per expansion, <= 2^16
    assert packed.fmt["dictionary_size"] == 65529 and packed.fmt["shared_dictionary"] is False
    assert torch.equal(unpack(packed.buffers, packed.fmt).codes, q.codes)
    assert packed.fmt["block_rows"] == 32 and packed.buffers["block_offsets"].shape == (1,)
    expected = 16 * packed.fmt["num_codes"] + 32 * 1 + 32 * 5 + 64 * 65529  # codes, one block offset, lo/hi, table
    assert packed.stored_bits() == expected
    assert stored_bits_of_format(packed.fmt) == expected
    assert stored_bits_of_format({**packed.fmt, "shared_dictionary": True}) == expected - 64 * 65529


def test_sub1_block_offsets_are_counted_per_block_of_rows():
    q = _quantized(QuantSpec("sub1"), 70, 40, seed=2)
    dictionary = sub1.build_dictionary(sub1.pair_counts(q.codes), size=300)
    for block_rows, blocks in ((1, 70), (16, 5), (32, 3), (70, 1), (100, 1)):
        packed = pack(q, dictionary, block_rows=block_rows)
        assert packed.buffers["block_offsets"].shape == (blocks,) and packed.fmt["block_rows"] == block_rows
        assert packed.stored_bits(include_dictionary=False) == 16 * packed.fmt["num_codes"] + 32 * blocks + 32 * 70
        assert stored_bits_of_format(packed.fmt, include_dictionary=False) == packed.stored_bits(include_dictionary=False)
        assert torch.equal(unpack(packed.buffers, packed.fmt).codes, q.codes)


def test_older_sub1_layout_with_row_offsets_still_loads():
    # Checkpoints written before row blocks: no "block_rows" key, an int32 `row_offsets` per row, codes per row.
    q = _quantized(QuantSpec("sub1"), 9, 21, seed=3)
    dictionary = sub1.build_dictionary(sub1.pair_counts(q.codes), size=300)
    packed = pack(q, dictionary, block_rows=1)
    fmt = {k: v for k, v in packed.fmt.items() if k != "block_rows"}
    buffers = {("row_offsets" if k == "block_offsets" else k): v for k, v in packed.buffers.items()}
    assert torch.equal(unpack(buffers, fmt).codes, q.codes)
    module = QuantLinear.from_packed(buffers, fmt)
    assert torch.equal(module.dequantize_weight(), dequantize(q))
    bad = buffers["row_offsets"].clone()
    bad[3] += 1
    with pytest.raises(CheckpointError, match="block offsets"):
        unpack(dict(buffers, row_offsets=bad), fmt)


def test_bits_per_weight_counts_every_buffer():
    packed = pack(quantize_rtn(torch.randn(64, 256), QuantSpec(4, 128)))
    assert packed.bits_per_weight() == 4 + (16 + 4) / 128
    packed = pack(quantize_rtn(torch.randn(64, 256), QuantSpec("ternary")))
    assert packed.bits_per_weight() == 2 + 32 / 256


def test_corrupt_buffers_raise_checkpoint_error():
    packed = pack(_quantized(QuantSpec(4, 5), 4, 10, seed=1))
    bad = dict(packed.buffers, scales=packed.buffers["scales"][:, :1].contiguous())
    with pytest.raises(CheckpointError, match="scales"):
        unpack(bad, packed.fmt)
    with pytest.raises(CheckpointError, match="qzeros"):
        unpack({k: v for k, v in packed.buffers.items() if k != "qzeros"}, packed.fmt)
    with pytest.raises(CheckpointError, match="format"):
        unpack(packed.buffers, dict(packed.fmt, format="int5"))
    packed = _pack(_quantized(QuantSpec("sub1"), 70, 30, seed=1))  # blocks of 32, 32 and 6 rows
    for block, delta in ((1, 1), (2, -1), (2, 10**6)):
        offsets = packed.buffers["block_offsets"].clone()
        offsets[block] += delta
        with pytest.raises(CheckpointError, match="block offsets"):
            unpack(dict(packed.buffers, block_offsets=offsets), packed.fmt)
    with pytest.raises(CheckpointError, match="block_offsets"):  # one offset per row, as the older layout
        unpack(dict(packed.buffers, block_offsets=torch.zeros(70, dtype=torch.int32)), packed.fmt)
    with pytest.raises(CheckpointError, match="block offsets"):  # the offsets of another block size
        unpack(packed.buffers, dict(packed.fmt, block_rows=24))
    with pytest.raises(CheckpointError, match="code stream"):
        codes = packed.buffers["codes"][:-1].contiguous()
        unpack(dict(packed.buffers, codes=codes), dict(packed.fmt, num_codes=codes.numel()))


def test_from_packed_rejects_mismatched_buffers():
    packed = pack(_quantized(QuantSpec(3, 7), 4, 14, seed=0))
    with pytest.raises(ValueError, match="scales"):
        QuantLinear.from_packed(dict(packed.buffers, scales=packed.buffers["scales"].float()), packed.fmt)
    with pytest.raises(ValueError, match="unknown quantization format"):
        QuantLinear(dict(packed.fmt, format="nf4"))


def test_quant_linear_imports_only_torch_and_stdlib():
    tree = ast.parse(Path(quant_linear.__file__).read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add((node.module or "").split(".")[0])
    assert modules <= {"__future__", "math", "collections", "typing", "torch"}, modules
