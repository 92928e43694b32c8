"""QMoE sub1 dictionary code: exact round trips, row blocks, Tunstall dictionary invariants, greedy parsing, rate."""

import hashlib
import math

import pytest
import torch

from moeconv.config import QuantSpec
from moeconv.errors import CheckpointError, RecipeError
from moeconv.modeling.hf.quant_linear import SUB1_BLOCK_ROWS, SUB1_LENGTH_SHIFT, build_sub1_table
from moeconv.quant import sub1
from moeconv.quant.grids import QuantizedTensor
from moeconv.quant.packing import pack


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Elementwise ops on mid-size tensors: intra-op threads only add synchronisation, and make the rate
    # tests several times slower on a loaded 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ternary(rows, cols, zero_fraction, generator):
    u = torch.rand(rows, cols, generator=generator)
    nonzero = torch.where(u < (1 + zero_fraction) / 2, 1, 2)
    return torch.where(u < zero_fraction, 0, nonzero).to(torch.uint8)


def _sequences(dictionary):
    """Each table entry as a tuple of pair letters (0..8)."""
    out = []
    for entry in dictionary.table.tolist():
        n = (entry >> SUB1_LENGTH_SHIFT) & 15
        out.append(tuple(((entry >> 4 * j) & 3) + 3 * ((entry >> (4 * j + 2)) & 3) for j in range(n)))
    return out


def _letters(symbols):
    padded = torch.nn.functional.pad(symbols.long(), (0, symbols.shape[1] % 2))
    return padded[:, 0::2] + 3 * padded[:, 1::2]  # [rows, P]


def test_encode_decode_bit_exact_on_random_ternary_matrices():
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        zero_fraction = 0.5 + 0.45 * trial / 11
        rows, cols = int(torch.randint(1, 80, (1,), generator=g)), int(torch.randint(1, 301, (1,), generator=g))
        block_rows = (1, 3, 7, 32)[trial % 4]  # row counts that are and are not multiples of the block
        symbols = _ternary(rows, cols, zero_fraction, g)
        size = int(torch.randint(9, 5000, (1,), generator=g))
        dictionary = sub1.build_dictionary(sub1.pair_counts(symbols), size=size)
        codes, offsets = sub1.encode(symbols, dictionary, block_rows)
        assert codes.dtype == torch.uint16 and offsets.dtype == torch.int32 and offsets.shape == (-(-rows // block_rows),)
        assert torch.equal(sub1.decode(codes, dictionary, rows, cols), symbols)
        sub1.check_block_offsets(codes, dictionary.table, offsets, rows, cols, block_rows)
        # each block decodes alone from its offset: the index lets a kernel start anywhere
        ends = offsets[1:].tolist() + [codes.numel()]
        for b, (start, end) in enumerate(zip(offsets.tolist(), ends, strict=True)):
            r0, r1 = b * block_rows, min(rows, (b + 1) * block_rows)
            block = sub1.decode(codes[start:end], dictionary, 1, (r1 - r0) * (cols + cols % 2))
            assert torch.equal(block.reshape(r1 - r0, -1)[:, :cols], symbols[r0:r1])


def test_codes_span_rows_inside_a_block_only():
    g = torch.Generator().manual_seed(5)
    rows, cols, block_rows = 10, 9, 4  # 5 pairs per row (the last one padded), blocks of 4, 4, 2 rows
    symbols = _ternary(rows, cols, 0.9, g)
    dictionary = sub1.build_dictionary(sub1.pair_counts(symbols), size=2000)
    codes, offsets = sub1.encode(symbols, dictionary, block_rows)
    letters = _letters(symbols)
    expected = []
    for r0 in range(0, rows, block_rows):  # each block parsed alone as one sequence, blocks back to back
        block = letters[r0 : r0 + block_rows].reshape(1, -1)
        expected.append(sub1._parse(block, dictionary)[0].to(torch.int32).to(torch.uint16))
    assert torch.equal(codes, torch.cat(expected))
    pairs = (dictionary.table[codes.long()] >> SUB1_LENGTH_SHIFT) & 15
    assert int(pairs.sum()) == rows * 5
    spans = torch.cumsum(pairs, 0)
    assert bool(((spans % 5 != 0) & (spans % 20 != 0)).any())  # at 90 % zeros some code crosses a row end
    assert offsets.tolist()[0] == 0 and len(offsets) == 3


def test_corrupted_block_offsets_raise():
    g = torch.Generator().manual_seed(6)
    symbols = _ternary(70, 45, 0.8, g)
    dictionary = sub1.build_dictionary(sub1.pair_counts(symbols), size=1000)
    codes, offsets = sub1.encode(symbols, dictionary, 16)
    sub1.check_block_offsets(codes, dictionary.table, offsets, 70, 45, 16)
    for b, delta in ((1, 1), (2, -1), (4, 10**6), (0, -1)):
        bad = offsets.clone()
        bad[b] += delta
        with pytest.raises(CheckpointError, match="block offsets"):
            sub1.check_block_offsets(codes, dictionary.table, bad, 70, 45, 16)
    with pytest.raises(CheckpointError, match="shape"):
        sub1.check_block_offsets(codes, dictionary.table, offsets[:-1], 70, 45, 16)
    with pytest.raises(CheckpointError, match="block offsets"):  # offsets right for another block size
        sub1.check_block_offsets(codes, dictionary.table, sub1.encode(symbols, dictionary, 8)[1][:5], 70, 45, 16)
    with pytest.raises(RecipeError, match="block_rows"):
        sub1.encode(symbols, dictionary, 0)


def test_degenerate_matrices_round_trip():
    for symbols in (torch.zeros(5, 33, dtype=torch.uint8), torch.full((3, 8), 2, dtype=torch.uint8)):
        dictionary = sub1.build_dictionary(sub1.pair_counts(symbols))
        assert dictionary.size < 100  # only the single letters and chains of the one letter seen
        codes, _ = sub1.encode(symbols, dictionary)
        assert torch.equal(sub1.decode(codes, dictionary, *symbols.shape), symbols)
    # a dictionary built from other data still encodes anything (all single letters are present)
    g = torch.Generator().manual_seed(1)
    other = _ternary(7, 29, 0.6, g)
    dictionary = sub1.build_dictionary(sub1.pair_counts(torch.zeros(4, 4, dtype=torch.uint8)))
    codes, _ = sub1.encode(other, dictionary)
    assert torch.equal(sub1.decode(codes, dictionary, 7, 29), other)


def test_dictionary_is_a_tunstall_tree_of_the_most_probable_sequences():
    counts = torch.tensor([700, 40, 30, 60, 5, 5, 90, 50, 0])  # letter 8 never seen: never a child
    dictionary = sub1.build_dictionary(counts, size=2000, max_pairs=6)
    seqs = _sequences(dictionary)
    assert seqs[:9] == [(a,) for a in range(9)]  # codes 0..8: the single letters
    assert len(set(seqs)) == len(seqs) and 2000 - 8 < len(seqs) <= 2000  # full expansions of 8 children
    assert all(1 <= len(s) <= 6 for s in seqs)
    members = set(seqs)
    assert all(s[:-1] in members for s in seqs if len(s) > 1)  # prefix-closed
    assert all(8 not in s[1:] for s in seqs)
    p = counts.double() / counts.sum()

    def prob(s):
        return math.prod(float(p[a]) for a in s)

    expanded = {s[:-1] for s in seqs if len(s) > 1}
    seen = [a for a in range(9) if counts[a] > 0]
    for s in expanded:  # complete: an expanded sequence has every seen letter as a child
        assert all(s + (a,) in members for a in seen)
    # best-first: every expandable sequence left unexpanded is no more probable than any expanded one
    least_expanded = min(prob(s) for s in expanded)
    unexpanded = [s for s in seqs if s not in expanded and len(s) < 6 and s[-1] != 8]
    assert max(prob(s) for s in unexpanded) <= least_expanded * (1 + 1e-12)


def test_tunstall_parse_matches_its_expected_length_on_iid_letters():
    # Parsing stops only at unexpanded sequences, without looking at the next letter, so on i.i.d. letters the
    # mean pairs per code is the sum of the probabilities of the expanded sequences plus 1 (the root).
    g = torch.Generator().manual_seed(8)
    symbols = _ternary(1, 200_000, 0.85, g)
    counts = sub1.pair_counts(symbols)
    dictionary = sub1.build_dictionary(counts, size=3000)
    p = counts.double() / counts.sum()
    seqs = _sequences(dictionary)
    expanded = {s[:-1] for s in seqs if len(s) > 1}
    expected = 1 + sum(math.prod(float(p[a]) for a in s) for s in expanded)
    codes, _ = sub1.encode(symbols, dictionary)
    assert 100_000 / codes.numel() == pytest.approx(expected, rel=0.01)


def test_lookup_from_table_equals_lookup_built_with_the_dictionary():
    dictionary = sub1.build_dictionary(torch.tensor([50, 3, 4, 2, 1, 1, 5, 1, 2]), size=3000)
    rebuilt = sub1.Sub1Dictionary(dictionary.table)
    for a, b in zip(dictionary.lookup(), rebuilt.lookup(), strict=True):
        assert torch.equal(a, b)


def _greedy_reference(sequences, code_of):
    """Walk the trie (here: the set of sequences) as far as it goes, for each letter sequence."""
    expected = []
    for row in sequences:
        pos = 0
        while pos < len(row):
            length = 1
            while pos + length < len(row) and tuple(row[pos : pos + length + 1]) in code_of:
                length += 1
            expected.append(code_of[tuple(row[pos : pos + length])])
            pos += length
    return expected


def test_encoding_is_greedy_longest_match():
    g = torch.Generator().manual_seed(2)
    symbols = _ternary(6, 57, 0.7, g)
    dictionary = sub1.build_dictionary(sub1.pair_counts(symbols), size=150)
    code_of = {s: i for i, s in enumerate(_sequences(dictionary))}
    letters = _letters(symbols)
    per_row, _ = sub1.encode(symbols, dictionary, block_rows=1)
    assert per_row.long().tolist() == _greedy_reference(letters.tolist(), code_of)
    blocked, offsets = sub1.encode(symbols, dictionary, block_rows=4)  # rows 0-3 as one sequence, then rows 4-5
    assert blocked.long().tolist() == _greedy_reference([letters[:4].flatten().tolist(), letters[4:].flatten().tolist()], code_of)
    assert offsets.tolist() == [0, len(_greedy_reference([letters[:4].flatten().tolist()], code_of))]


def test_bad_dictionary_size_raises():
    with pytest.raises(RecipeError, match="dictionary size"):
        sub1.build_dictionary(torch.ones(9), size=2**16 + 1)
    with pytest.raises(RecipeError, match="max pairs"):
        sub1.build_dictionary(torch.ones(9), max_pairs=15)


def _rates(rows, zero_fraction, seed):
    """Bits per weight of a rows x 576 i.i.d. ternary matrix: (without dictionary, with a private one)."""
    symbols = _ternary(rows, 576, zero_fraction, torch.Generator().manual_seed(seed))
    lo_hi = torch.tensor([-1.0, 1.0]).expand(rows, 2)
    mag_range = torch.tensor([1.0, 1.0]).expand(rows, 2)  # every magnitude 1: one log8 level
    packed = pack(QuantizedTensor(QuantSpec("sub1"), symbols, scales=mag_range, lo_hi=lo_hi))
    assert SUB1_BLOCK_ROWS == packed.fmt["block_rows"] == 32  # the documented default
    index_bits = 32 * -(-rows // 32)
    assert packed.stored_bits(False) == 16 * packed.fmt["num_codes"] + index_bits + 16 * rows + 64
    return packed.bits_per_weight(include_dictionary=False), packed.bits_per_weight()


def test_rate_at_88_percent_zeros_on_a_1536x576_matrix():
    # Codes alone are ~0.77 bits/weight; 8-bit lo/hi add 16/576 = 0.028 and the int32 offset per block of 32 rows
    # 1/576. A private ~2^16-entry table (64 bits/entry) would add 4.7: share it across tensors.
    without, with_table = _rates(1536, 0.88, seed=3)
    assert without < 0.82
    assert with_table == pytest.approx(without + 64 * 65529 / (1536 * 576))  # 9 + 8 x 8190 entries


def test_rate_falls_with_sparsity():
    values = [_rates(256, z, seed=4)[0] for z in (0.5, 0.8, 0.95)]
    assert values == sorted(values, reverse=True)
    assert values[0] < 2.0  # still better than 2-bit packing at 50 % zeros


# Pair-letter counts of GPTQ-ternary SmolLM2 (8,4) and a small skewed vector -> sha256 of the little-endian int64 table.
# Checkpoints store only the counts: a builder change that alters these tables would break every one of them.
GOLDEN = [
    ([11787563, 1016345, 1168050, 1023445, 94112, 104917, 1146826, 105318, 121133], 65529,
     "064c40eb38783fd474aa3f4b9dffff0b4e0e9a8481f0645ab39bbd603767bb03"),
    ([50, 3, 4, 2, 1, 1, 5, 1, 2], 65529, "dca6f4edc87e7416fc94ad927dc4dba082f061f76a709861f3c48c2e0e6f199e"),
]


@pytest.mark.parametrize(("counts", "size", "digest"), GOLDEN)
def test_table_built_from_counts_is_golden(counts, size, digest):
    table = build_sub1_table(counts)
    assert table.dtype == torch.int64 and table.numel() == size
    assert hashlib.sha256(table.numpy().astype("<i8").tobytes()).hexdigest() == digest


def test_table_rebuilt_from_counts_decodes_what_was_encoded():
    symbols = _ternary(70, 45, 0.85, torch.Generator().manual_seed(12))
    counts = sub1.pair_counts(symbols)
    used = sub1.build_dictionary(counts)
    codes, _ = sub1.encode(symbols, used)
    for rebuilt in (build_sub1_table(counts), build_sub1_table(counts.tolist()), sub1.build_dictionary(counts.clone()).table):
        assert torch.equal(rebuilt, used.table)
        assert torch.equal(sub1.decode(codes, sub1.Sub1Dictionary(rebuilt), 70, 45), symbols)


def test_bad_counts_raise():
    with pytest.raises(RecipeError, match="9 non-negative"):
        sub1.build_dictionary(torch.ones(8))
    with pytest.raises(RecipeError, match="9 non-negative"):
        sub1.build_dictionary(torch.tensor([1, 1, 1, 1, -1, 1, 1, 1, 1]))
