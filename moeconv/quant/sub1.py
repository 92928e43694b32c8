"""QMoE's sub-1-bit code for ternary matrices: a Tunstall-style dictionary of symbol-pair sequences -> uint16 codes."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moeconv.errors import CheckpointError, RecipeError
from moeconv.modeling.hf.quant_linear import SUB1_LENGTH_SHIFT, SUB1_MAX_PAIRS, decode_sub1

NUM_PAIRS = 9  # ternary symbols {0, 1 = lo, 2 = hi} taken two at a time
MAX_ENTRIES = 2**16  # codes are uint16


def _pair_index(symbols: Tensor) -> Tensor:
    """uint8 symbols [rows, cols] -> pair letters [rows, ceil(cols/2)] in 0..8 (an odd row's last pair is padded with 0)."""
    s = torch.nn.functional.pad(symbols.long(), (0, symbols.shape[1] % 2)).reshape(symbols.shape[0], -1, 2)
    return s[..., 0] + 3 * s[..., 1]  # [rows, P]


def pair_counts(symbols: Tensor) -> Tensor:
    """int64 [9] counts of the pair letters of a ternary symbol matrix; sum them over tensors to share a dictionary."""
    return torch.bincount(_pair_index(symbols).flatten(), minlength=NUM_PAIRS)


@dataclass
class Sub1Dictionary:
    """Decode table, int64 [N]: entry bits 2k..2k+1 hold symbol k (k < 28) of the sequence, bits 56..59 its pair count."""

    table: Tensor
    _lookup: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return self.table.numel()

    def lookup(self) -> tuple[Tensor, Tensor]:
        """(sorted sequence keys, code of each) for longest-match encoding; a key has base-10 digit j = letter j + 1."""
        if self._lookup is None:
            n_pairs = (self.table >> SUB1_LENGTH_SHIFT) & 15  # [N]
            keys = torch.zeros_like(self.table)
            for j in range(SUB1_MAX_PAIRS):
                nibble = (self.table >> (4 * j)) & 15
                letter = (nibble & 3) + 3 * (nibble >> 2)
                keys += torch.where(j < n_pairs, (letter + 1) * 10**j, 0)
            sorted_keys, order = torch.sort(keys)
            self._lookup = (sorted_keys, order)
        return self._lookup


def build_dictionary(counts: Tensor, size: int = MAX_ENTRIES, max_pairs: int = SUB1_MAX_PAIRS) -> Sub1Dictionary:
    """The `size` most probable sequences of 1..max_pairs pair letters under i.i.d. letter probabilities `counts` [9].

    Codes 0..8 are the single letters (always present, so every row can be encoded); the rest are grown
    best-first from a heap. The set is prefix-closed, so greedy longest-match parsing always succeeds.
    """
    if not NUM_PAIRS <= size <= MAX_ENTRIES or not 1 <= max_pairs <= SUB1_MAX_PAIRS:
        raise RecipeError(f"sub1 dictionary size {size} / max pairs {max_pairs} out of range; use <= {MAX_ENTRIES} / <= 14")
    counts = [float(c) for c in counts.tolist()]
    total = sum(counts)
    probs = [c / total for c in counts] if total > 0 else [1.0 / NUM_PAIRS] * NUM_PAIRS
    by_prob = sorted(range(NUM_PAIRS), key=lambda a: (-probs[a], a))
    nibble = [(a % 3) | ((a // 3) << 2) for a in range(NUM_PAIRS)]  # letter -> (s0, s1) bits in a table entry

    entries = [nibble[a] | (1 << SUB1_LENGTH_SHIFT) for a in range(NUM_PAIRS)]
    keys = [a + 1 for a in range(NUM_PAIRS)]  # lookup keys (see Sub1Dictionary.lookup), built alongside
    heap: list[tuple[float, int, float, int, int, int, int]] = []  # -p, tiebreak, parent p/bits/key, length, rank
    tiebreak = 0

    def push_child(parent_p: float, parent_bits: int, parent_key: int, length: int, rank: int) -> None:
        # Children of a node are pushed one at a time in decreasing probability: popping child `rank`
        # pushes child `rank + 1`, so the heap holds O(entries) items instead of 9x that.
        nonlocal tiebreak
        p = parent_p * probs[by_prob[rank]]
        if p > 0:
            heapq.heappush(heap, (-p, tiebreak, parent_p, parent_bits, parent_key, length, rank))
            tiebreak += 1

    if max_pairs > 1:
        for a in range(NUM_PAIRS):
            if probs[a] > 0:
                push_child(probs[a], nibble[a], a + 1, 2, 0)
    while heap and len(entries) < size:
        neg_p, _, parent_p, parent_bits, parent_key, length, rank = heapq.heappop(heap)
        letter = by_prob[rank]
        bits = parent_bits | (nibble[letter] << (4 * (length - 1)))
        key = parent_key + (letter + 1) * 10 ** (length - 1)
        entries.append(bits | (length << SUB1_LENGTH_SHIFT))
        keys.append(key)
        if rank + 1 < NUM_PAIRS:
            push_child(parent_p, parent_bits, parent_key, length, rank + 1)
        if length < max_pairs:
            push_child(-neg_p, bits, key, length + 1, 0)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    lookup = (torch.tensor([keys[i] for i in order]), torch.tensor(order))
    return Sub1Dictionary(torch.tensor(entries, dtype=torch.int64), lookup)


def encode(symbols: Tensor, dictionary: Sub1Dictionary) -> tuple[Tensor, Tensor]:
    """Greedy longest-match encoding of each row of ternary symbols [rows, cols] (uint8 in {0, 1, 2}).

    Returns (codes uint16 [n], row_offsets int32 [rows]): row r's codes start at row_offsets[r].
    All rows are parsed in lockstep: first the longest match at every position, then one jump per step.
    """
    rows = symbols.shape[0]
    letters = _pair_index(symbols)  # [rows, P]
    n_positions = letters.shape[1]
    sorted_keys, code_of = dictionary.lookup()
    best_len = torch.zeros_like(letters)  # longest match starting at each position
    best_code = torch.zeros_like(letters)
    keys = torch.zeros_like(letters)
    for length in range(1, min(SUB1_MAX_PAIRS, n_positions) + 1):
        span = n_positions - length + 1  # positions where a sequence of this length fits
        keys = keys[:, :span] + (letters[:, length - 1 :] + 1) * 10 ** (length - 1)  # [rows, span]
        idx = torch.searchsorted(sorted_keys, keys).clamp(max=sorted_keys.numel() - 1)
        hit = sorted_keys[idx] == keys
        if not hit.any():
            break  # prefix-closed: no longer match exists either
        best_len[:, :span] = torch.where(hit, length, best_len[:, :span])
        best_code[:, :span] = torch.where(hit, code_of[idx], best_code[:, :span])
    if n_positions and bool((best_len == 0).any()):
        raise RecipeError("sub1 dictionary lacks a single-pair entry; build it with build_dictionary")

    pos = torch.zeros(rows, dtype=torch.long)
    step_codes, step_active = [], []
    while n_positions and bool((active := pos < n_positions).any()):
        at = pos.clamp(max=n_positions - 1)[:, None]
        step_codes.append(best_code.gather(1, at)[:, 0])
        step_active.append(active)
        pos = pos + torch.where(active, best_len.gather(1, at)[:, 0], 0)
    if not step_codes:
        return torch.zeros(0, dtype=torch.uint16), torch.zeros(rows, dtype=torch.int32)
    active = torch.stack(step_active, dim=1)  # [rows, steps]
    codes = torch.stack(step_codes, dim=1)[active]  # row-major: each row's codes are contiguous
    per_row = active.sum(dim=1)
    row_offsets = torch.cumsum(per_row, 0) - per_row
    return codes.to(torch.int32).to(torch.uint16), row_offsets.to(torch.int32)


def decode(codes: Tensor, dictionary: Sub1Dictionary, rows: int, cols: int) -> Tensor:
    """Inverse of encode: uint8 symbols [rows, cols]."""
    return decode_sub1(codes, dictionary.table, rows, cols)


def check_row_offsets(codes: Tensor, table: Tensor, row_offsets: Tensor, cols: int) -> None:
    """Raise CheckpointError unless row r's codes start exactly where r full (padded) rows of symbols end."""
    pairs = (table[codes.long()] >> SUB1_LENGTH_SHIFT) & 15  # [n]
    pairs_before = torch.cumsum(pairs, 0) - pairs  # pairs decoded before each code
    offsets = row_offsets.long()
    expected = torch.arange(offsets.numel()) * ((cols + 1) // 2)
    in_range = bool(((offsets >= 0) & (offsets < max(codes.numel(), 1))).all())
    if not in_range or (codes.numel() and not torch.equal(pairs_before[offsets.clamp(max=codes.numel() - 1)], expected)):
        raise CheckpointError("sub1 row offsets do not match the code stream; re-run moeconv quantize")
