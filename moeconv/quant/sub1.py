"""QMoE's sub-1-bit code for ternary matrices: a Tunstall dictionary of symbol-pair sequences -> uint16 codes, per row block."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moeconv.errors import CheckpointError, RecipeError
from moeconv.modeling.hf.quant_linear import (
    SUB1_BLOCK_ROWS,
    SUB1_LENGTH_SHIFT,
    SUB1_MAX_ENTRIES,
    SUB1_MAX_PAIRS,
    SUB1_NUM_LETTERS,
    build_sub1_table,
    decode_sub1,
)

NUM_PAIRS = SUB1_NUM_LETTERS  # ternary symbols {0, 1 = lo, 2 = hi} taken two at a time
MAX_ENTRIES = SUB1_MAX_ENTRIES  # codes are uint16


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
    """A Tunstall dictionary of at most `size` sequences of 1..max_pairs pair letters for i.i.d. letters with `counts` [9]
    (quant_linear.build_sub1_table, which checkpoints carry so that a loader can rebuild the table from the counts).

    Expanding a whole node at a time (all its children) rather than adding the single most probable sequences one at a
    time, as QMoE describes, keeps the greedy parse from stopping early at a missing child: measured on GPTQ-ternary
    symbols of SmolLM2 (8,4), 0.942 -> 0.912 code bits per weight on expert down projections, 0.842 -> 0.829 on gate.
    """
    if not NUM_PAIRS <= size <= MAX_ENTRIES or not 1 <= max_pairs <= SUB1_MAX_PAIRS:
        raise RecipeError(f"sub1 dictionary size {size} / max pairs {max_pairs} out of range; use <= {MAX_ENTRIES} / <= 14")
    try:
        return Sub1Dictionary(build_sub1_table(counts, size, max_pairs))
    except ValueError as exc:
        raise RecipeError(f"{exc}; pass sub1.pair_counts of the symbols") from None


def _parse(letters: Tensor, dictionary: Sub1Dictionary) -> tuple[Tensor, Tensor]:
    """Greedy longest-match parsing of each row of pair letters [n, L] -> (codes int64, row-major; codes per row [n])."""
    rows, n_positions = letters.shape
    sorted_keys, code_of = dictionary.lookup()
    best_len = torch.zeros_like(letters)  # longest match starting at each position
    best_code = torch.zeros_like(letters)
    keys = torch.zeros_like(letters)
    for length in range(1, min(SUB1_MAX_PAIRS, n_positions) + 1):
        span = n_positions - length + 1  # positions where a sequence of this length fits
        keys = keys[:, :span] + (letters[:, length - 1 :] + 1) * 10 ** (length - 1)  # [n, span]
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
        return torch.zeros(0, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
    active = torch.stack(step_active, dim=1)  # [n, steps]
    return torch.stack(step_codes, dim=1)[active], active.sum(dim=1)  # row-major: each row's codes contiguous


def encode(symbols: Tensor, dictionary: Sub1Dictionary, block_rows: int = SUB1_BLOCK_ROWS) -> tuple[Tensor, Tensor]:
    """Greedy longest-match encoding of ternary symbols [rows, cols] (uint8 in {0, 1, 2}), one block of rows at a time.

    The pair letters of the `block_rows` rows of a block (the last block may have fewer) are parsed as one sequence,
    so a code may span two rows of a block but never two blocks. Returns (codes uint16 [n], block_offsets int32
    [ceil(rows / block_rows)]): block b's codes start at block_offsets[b]. Blocks are parsed in lockstep.
    """
    if block_rows < 1:
        raise RecipeError(f"sub1 block_rows {block_rows} must be >= 1")
    rows = symbols.shape[0]
    letters = _pair_index(symbols)  # [rows, P]
    full = rows - rows % block_rows
    parts = [letters[:full].reshape(full // block_rows, -1)] if full else []  # [blocks, block_rows * P]
    if full < rows:
        parts.append(letters[full:].reshape(1, -1))  # the short last block
    codes, per_block = [], []
    for part in parts:
        c, n = _parse(part, dictionary)
        codes.append(c)
        per_block.append(n)
    if not parts:
        return torch.zeros(0, dtype=torch.uint16), torch.zeros(0, dtype=torch.int32)
    counts = torch.cat(per_block)  # [blocks]
    offsets = torch.cumsum(counts, 0) - counts
    return torch.cat(codes).to(torch.int32).to(torch.uint16), offsets.to(torch.int32)


def decode(codes: Tensor, dictionary: Sub1Dictionary, rows: int, cols: int) -> Tensor:
    """Inverse of encode: uint8 symbols [rows, cols]."""
    return decode_sub1(codes, dictionary.table, rows, cols)


def check_block_offsets(codes: Tensor, table: Tensor, offsets: Tensor, rows: int, cols: int, block_rows: int) -> None:
    """Raise CheckpointError unless block b's codes start exactly where b * block_rows full (padded) rows of symbols
    end (block_rows 1: the older per-row `row_offsets`), so no code spans two blocks and every offset is a code."""
    n_blocks = -(-rows // block_rows)
    if offsets.shape != (n_blocks,) or codes.dim() != 1:
        raise CheckpointError(f"sub1 block offsets have shape {tuple(offsets.shape)}, expected ({n_blocks},); re-run moeconv quantize")
    pairs = (table[codes.long()] >> SUB1_LENGTH_SHIFT) & 15  # [n]
    pairs_before = torch.cumsum(pairs, 0) - pairs  # pairs decoded before each code
    offsets = offsets.long()
    expected = torch.arange(n_blocks) * (block_rows * ((cols + 1) // 2))  # [blocks]
    in_range = bool(((offsets >= 0) & (offsets < max(codes.numel(), 1))).all())
    if not in_range or (codes.numel() and not torch.equal(pairs_before[offsets.clamp(max=codes.numel() - 1)], expected)):
        raise CheckpointError("sub1 block offsets do not match the code stream; re-run moeconv quantize")
