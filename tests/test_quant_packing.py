"""Packing round trips of every format and the runtime QuantLinear (exact outputs, safetensors state_dict)."""

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moeconv.config import QuantSpec
from moeconv.errors import CheckpointError, RecipeError
from moeconv.modeling.hf import quant_linear
from moeconv.modeling.hf.quant_linear import QuantLinear, unpack_bits
from moeconv.quant import sub1
from moeconv.quant.grids import dequantize, quantize_rtn
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
def test_quant_linear_matches_dequantized_linear_exactly(spec, rows, cols, monkeypatch):
    # The pure-PyTorch path, bit for bit; the native kernels sum in another order (tests/test_quant_linear_kernels.py).
    monkeypatch.setattr(quant_linear, "_native_linear", None)
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


def test_shared_sub1_dictionary_is_stored_once_and_attached(monkeypatch):
    monkeypatch.setattr(quant_linear, "_native_linear", None)  # exact checks: the pure-PyTorch path
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
    # codes, one block offset, 8-bit lo and hi per row, the tensor's float32 magnitude range, the table
    expected = 16 * packed.fmt["num_codes"] + 32 * 1 + 16 * 5 + 64 + 64 * 65529
    assert packed.stored_bits() == expected
    assert stored_bits_of_format(packed.fmt) == expected
    assert stored_bits_of_format({**packed.fmt, "shared_dictionary": True}) == expected - 64 * 65529


def test_sub1_block_offsets_are_counted_per_block_of_rows():
    q = _quantized(QuantSpec("sub1"), 70, 40, seed=2)
    dictionary = sub1.build_dictionary(sub1.pair_counts(q.codes), size=300)
    for block_rows, blocks in ((1, 70), (16, 5), (32, 3), (70, 1), (100, 1)):
        packed = pack(q, dictionary, block_rows=block_rows)
        assert packed.buffers["block_offsets"].shape == (blocks,) and packed.fmt["block_rows"] == block_rows
        assert packed.stored_bits(include_dictionary=False) == 16 * packed.fmt["num_codes"] + 32 * blocks + 16 * 70 + 64
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
    assert packed.bits_per_weight() == 2 + 16 / 256 + 64 / (64 * 256)  # 8-bit lo and hi per row, one range per tensor


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
    # The one exception: the native kernels, imported inside `try: ... except Exception:` (absent without moeconv).
    optional = [n for n in tree.body if isinstance(n, ast.Try)]
    assert all(h.type is not None and ast.unparse(h.type) == "Exception" for n in optional for h in n.handlers)
    assert {node.module for n in optional for node in ast.walk(n) if isinstance(node, ast.ImportFrom)} <= {"moeconv.kernels.quant_api"}
    tree.body = [n for n in tree.body if not isinstance(n, ast.Try)]
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add((node.module or "").split(".")[0])
    assert modules <= {"__future__", "heapq", "math", "collections", "typing", "torch"}, modules


def _ternary_weights(rows, cols, zero_fraction, seed):
    """Random weights whose ternary rounding has about `zero_fraction` zeros, with a row of each special kind:
    no negative weight (lo = 0), no positive weight (hi = 0), all zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g).add(0.1)  # row scales over ~10x
    w[torch.rand(rows, cols, generator=g) < zero_fraction] = 0
    if rows >= 3:
        w[0], w[1], w[2] = w[0].abs(), -w[1].abs(), 0.0
    return w


@pytest.mark.parametrize("fmt", ["ternary", "sub1"])
def test_log8_lo_hi_round_trips_bit_exact(fmt):
    for rows, cols, zero_fraction, seed in ((33, 17, 0.5, 0), (5, 3, 0.8, 1), (70, 101, 0.95, 2), (1, 1, 0.5, 3)):
        w = _ternary_weights(rows, cols, zero_fraction, seed)
        q = quantize_rtn(w, QuantSpec(fmt))
        packed = _pack(q)
        assert packed.fmt["lo_hi"] == "log8" and "lo_hi" not in packed.buffers
        assert packed.buffers["lo_hi_codes"].dtype == torch.uint8 and packed.buffers["lo_hi_codes"].shape == (rows, 2)
        assert packed.buffers["lo_hi_range"].dtype == torch.float32 and packed.buffers["lo_hi_range"].shape == (2,)
        back = unpack(packed.buffers, packed.fmt)
        assert torch.equal(back.codes, q.codes) and torch.equal(back.lo_hi, q.lo_hi) and torch.equal(back.scales, q.scales)
        module = QuantLinear.from_packed(packed.buffers, packed.fmt)
        assert torch.equal(module.dequantize_weight(), dequantize(q))
        if rows >= 3:  # lo = 0 / hi = 0 rows store code 0, and decode to +0
            codes = packed.buffers["lo_hi_codes"]
            assert codes[0, 0] == 0 and codes[1, 1] == 0 and codes[2].tolist() == [0, 0]
            assert not torch.signbit(back.lo_hi[0, 0]) and not torch.signbit(back.lo_hi[2]).any()
        codes = packed.buffers["lo_hi_codes"]
        if rows > 30:  # the smallest and largest magnitude are the grid's ends, exactly
            smallest, largest = packed.buffers["lo_hi_range"].tolist()
            assert codes.max() == 255 and codes[codes > 0].min() == 1
            assert back.lo_hi.abs().max() == largest and back.lo_hi.abs()[back.lo_hi != 0].min() == smallest


def test_log8_tensor_whose_magnitudes_are_all_equal():
    w = torch.tensor([[0.5, -0.5, 0.1, 0.0], [-0.5, 0.2, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])  # |lo| = hi = 0.5 (or 0)
    for fmt in ("ternary", "sub1"):
        q = quantize_rtn(w, QuantSpec(fmt))
        packed = _pack(q)
        assert packed.buffers["lo_hi_range"].tolist() == [0.5, 0.5]
        assert packed.buffers["lo_hi_codes"].tolist() == [[1, 1], [1, 1], [0, 0]]
        assert torch.equal(QuantLinear.from_packed(packed.buffers, packed.fmt).dequantize_weight(), dequantize(q))
        assert dequantize(q).tolist() == [[0.5, -0.5, 0.0, 0.0], [-0.5, 0.0, 0.5, 0.5], [0.0] * 4]
    q = quantize_rtn(torch.zeros(2, 3), QuantSpec("sub1"))  # nothing nonzero: range (0, 0), all codes 0
    packed = _pack(q)
    assert packed.buffers["lo_hi_range"].tolist() == [0.0, 0.0] and not bool(packed.buffers["lo_hi_codes"].any())
    assert not bool(QuantLinear.from_packed(packed.buffers, packed.fmt).dequantize_weight().any())


def test_pack_refuses_lo_hi_that_are_not_on_the_log8_grid():
    q = quantize_rtn(_ternary_weights(8, 16, 0.5, 4), QuantSpec("ternary"))
    off = q.lo_hi.clone()
    off[3, 1] = torch.nextafter(off[3, 1], torch.tensor(10.0))
    with pytest.raises(RecipeError, match="log8 grid"):
        pack(replace(q, lo_hi=off))
    ranges = q.scales.clone()
    ranges[2] *= 2
    with pytest.raises(RecipeError, match="different lo/hi ranges"):
        pack(replace(q, scales=ranges))


@pytest.mark.parametrize("fmt", ["ternary", "sub1"])
def test_older_bf16_lo_hi_layout_still_loads(fmt):
    # Checkpoints written before log8: no "lo_hi" key in the format dict, a bf16 `lo_hi` buffer [out, 2].
    q = quantize_rtn(_ternary_weights(9, 21, 0.7, 5), QuantSpec(fmt))
    old = replace(q, scales=None, lo_hi=q.lo_hi.bfloat16().float())
    packed = _pack(old)
    assert "lo_hi" not in packed.fmt and packed.buffers["lo_hi"].dtype == torch.bfloat16 and "lo_hi_codes" not in packed.buffers
    back = unpack(packed.buffers, packed.fmt)
    assert back.scales is None and torch.equal(back.lo_hi, old.lo_hi) and torch.equal(back.codes, q.codes)
    module = QuantLinear(packed.fmt)
    module.load_state_dict(QuantLinear.from_packed(packed.buffers, packed.fmt).state_dict(), strict=True)
    assert torch.equal(module.dequantize_weight(), dequantize(old))


def test_corrupt_log8_lo_hi_raise_checkpoint_error():
    packed = _pack(quantize_rtn(_ternary_weights(6, 10, 0.5, 6), QuantSpec("sub1")))
    for bad_range in ([float("nan"), 1.0], [-1.0, 1.0], [2.0, 1.0], [0.0, 1.0], [1.0, float("inf")]):
        with pytest.raises(CheckpointError, match="lo/hi") as info:
            unpack(dict(packed.buffers, lo_hi_range=torch.tensor(bad_range)), packed.fmt)
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="lo_hi_codes"):
        unpack(dict(packed.buffers, lo_hi_codes=packed.buffers["lo_hi_codes"].to(torch.int16)), packed.fmt)
    with pytest.raises(CheckpointError, match="lo_hi_range"):
        unpack({k: v for k, v in packed.buffers.items() if k != "lo_hi_range"}, packed.fmt)
    with pytest.raises(CheckpointError, match="lo/hi layout"):
        unpack(packed.buffers, dict(packed.fmt, lo_hi="log7"))


def test_shared_dictionary_stored_as_pair_counts_is_rebuilt_at_load():
    qs = [quantize_rtn(_ternary_weights(8, 20 + i, 0.5, i), QuantSpec("sub1")) for i in range(2)]
    counts = sum(sub1.pair_counts(q.codes) for q in qs)
    shared = sub1.build_dictionary(counts)
    assert shared.size == 65529  # all nine letters seen
    model = torch.nn.Module()
    quant = {"modules": {}, "sub1_dictionary": quant_linear.SUB1_PAIR_COUNTS_KEY}
    state = {quant_linear.SUB1_PAIR_COUNTS_KEY: counts}
    for i, q in enumerate(qs):
        model.add_module(f"l{i}", torch.nn.Linear(q.shape[1], q.shape[0], bias=False))
        packed = pack(q, shared, shared_dictionary=True)
        quant["modules"][f"l{i}"] = packed.fmt
        state.update({f"l{i}.{k}": v for k, v in packed.buffers.items() if k != "dictionary"})
    quant_linear.replace_with_quant_linear(model, quant)
    assert set(model.state_dict()) == set(state)  # the counts are the only dictionary state
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.quant.table(), shared.table)
    assert model.quant.table() is model.quant.table()  # built once, not at every call
    for i, q in enumerate(qs):
        assert torch.equal(model.get_submodule(f"l{i}").dequantize_weight(), dequantize(q))
    other = torch.tensor([50, 3, 4, 2, 1, 1, 5, 1, 2])  # all nine letters: the same size, another table
    model.quant.sub1_pair_counts.copy_(other)
    assert torch.equal(model.quant.table(), sub1.build_dictionary(other).table)
    model.quant.sub1_pair_counts.zero_()
    with pytest.raises(ValueError, match="all zeros"):
        model.l0.dequantize_weight()
    wrong = quant_linear.SharedDictionary(1000, from_counts=True)
    wrong.sub1_pair_counts.copy_(counts)
    with pytest.raises(ValueError, match="config says 1000"):
        wrong.table()
