"""Tokenize a text source once (streaming, in chunks, with progress) into a 1-D token stream, and cut it into windows."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from moeconv.calib.sources import TextSource
from moeconv.errors import DataError

log = logging.getLogger(__name__)

# progress(done, total): characters tokenized so far out of all characters.
Progress = Callable[[int, int], None]

CHUNK_CHARS = 1 << 20
# Right context tokenized beyond each chunk so that the tokens kept from it are final, and the
# number of already-kept tokens re-tokenized at the start of the next chunk to re-synchronise.
OVERLAP_CHARS = 4096
ANCHOR_TOKENS = 32


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, special: bool, offsets: bool) -> tuple[list[int], list]:
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=offsets, verbose=False)
    return enc["input_ids"], (enc["offset_mapping"] if offsets else [])


def _sync(kept_ids: list[int], kept_starts: list[int], new_ids: list[int], new_starts: list[int]) -> int | None:
    """Index in the new chunk just after its copy of the kept tail (anchor), or None if they never agree.

    The new chunk starts at the first anchor token, so its first few tokens may differ (e.g. a
    prefix space some tokenizers add at the start of any text); the earliest anchor suffix that
    the new chunk reproduces exactly, at the same character offsets, is where the two agree.
    """
    n = len(kept_ids)
    for skip in range(n - 3):  # at least 4 agreeing tokens
        suffix = list(zip(kept_ids[skip:], kept_starts[skip:], strict=False))
        for j in range(min(len(new_ids), 2 * ANCHOR_TOKENS)):
            if new_starts[j] > kept_starts[skip]:
                break
            if list(zip(new_ids[j : j + n - skip], new_starts[j : j + n - skip], strict=False)) == suffix:
                return j + n - skip
    return None


def tokenize_text(
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    chunk_chars: int = CHUNK_CHARS,
    progress: Progress | None = None,
) -> torch.Tensor:
    """All of `text` as one token stream, equal to tokenizing it in one call.  -> [N] int64

    Large texts go through the tokenizer in chunks (bounded memory, progress reports): each chunk is
    tokenized with OVERLAP_CHARS of right context, only tokens starting before the chunk's end are
    kept, and the next chunk starts at a kept token so the streams can be spliced where they agree.
    """
    total = len(text)
    fast = getattr(tokenizer, "is_fast", False)
    if total <= chunk_chars + OVERLAP_CHARS or not fast:
        ids, _ = _encode(tokenizer, text, special=True, offsets=False)
        if progress:
            progress(total, total)
        return torch.tensor(ids, dtype=torch.long)

    pieces: list[torch.Tensor] = []
    anchor_ids: list[int] = []
    anchor_starts: list[int] = []
    begin = 0  # character where the current chunk starts (a kept token's start, or 0)
    while True:
        end = begin + chunk_chars
        last = end + OVERLAP_CHARS >= total
        ids, offsets = _encode(tokenizer, text[begin : total if last else end + OVERLAP_CHARS], begin == 0, True)
        starts = [begin + s for s, _ in offsets]
        first = 0
        if anchor_ids:
            first = _sync(anchor_ids, anchor_starts, ids, starts)
            if first is None:  # the tokenizer is not local enough to splice: fall back to one call
                log.warning("streaming tokenization could not re-synchronise at char %d; tokenizing in one call", begin)
                return tokenize_text(text, tokenizer, chunk_chars=total, progress=progress)
        # Keep tokens that start before the cut; those near it still saw OVERLAP_CHARS of context.
        keep = len(ids) if last else next((i for i in range(first, len(ids)) if starts[i] >= end), len(ids))
        if not last and keep - first <= ANCHOR_TOKENS:
            raise DataError(f"a chunk of {chunk_chars} characters gave too few tokens to splice; use a larger chunk")
        pieces.append(torch.tensor(ids[first:keep], dtype=torch.long))
        if progress:
            progress(total if last else end, total)
        if last:
            break
        anchor_ids, anchor_starts = ids[keep - ANCHOR_TOKENS : keep], starts[keep - ANCHOR_TOKENS : keep]
        begin = anchor_starts[0]
    return torch.cat(pieces)


def tokenize_source(
    source: TextSource,
    tokenizer: PreTrainedTokenizerBase,
    chunk_chars: int = CHUNK_CHARS,
    progress: Progress | None = None,
) -> torch.Tensor:
    """The source's documents joined with "\\n\\n" (GPTQ/WikiText protocol), tokenized once.  -> [N] int64"""
    return tokenize_text(source.text, tokenizer, chunk_chars=chunk_chars, progress=progress)


def tokens_fingerprint(tokens: torch.Tensor) -> str:
    """Identifies the exact token stream (same text and same tokenization)."""
    return hashlib.sha256(tokens.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Windows:
    """Windows of `seqlen` tokens starting every `stride` tokens (a view, no copy).

    Window 0 predicts all its tokens but the first; every later window predicts only its last
    `stride` tokens (the others are context), so every token after the first is predicted once.
    With stride = seqlen (the GPTQ convention) every window predicts all its tokens but the first.
    """

    ids: torch.Tensor  # [W, seqlen]
    seqlen: int
    stride: int
    tokens_available: int

    @property
    def count(self) -> int:
        return self.ids.shape[0]

    @property
    def tokens(self) -> int:
        """Tokens the windows cover."""
        return self.seqlen + (self.count - 1) * self.stride

    @property
    def predicted_after_first(self) -> int:
        """Tokens each window but the first predicts."""
        return min(self.stride, self.seqlen - 1)

    @property
    def predicted(self) -> int:
        """Tokens whose log-likelihood is scored."""
        return self.seqlen - 1 + (self.count - 1) * self.predicted_after_first


def cut_windows(tokens: torch.Tensor, seqlen: int, stride: int | None = None, max_tokens: int | None = None) -> Windows:
    """Non-overlapping windows by default (stride = seqlen); the remainder that fills no window is dropped."""
    stride = seqlen if stride is None else stride
    if seqlen < 2:
        raise DataError(f"--seqlen {seqlen} is too small; a window needs at least 2 tokens")
    if not 1 <= stride <= seqlen:
        raise DataError(f"--stride {stride} must be between 1 and --seqlen ({seqlen})")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"--max-tokens {max_tokens} must be positive")
    available = tokens.numel()
    usable = available if max_tokens is None else min(available, max_tokens)
    if usable < seqlen:
        limit = f" (--max-tokens {max_tokens} kept {usable} of {available})" if usable < available else ""
        hint = f"pass --seqlen {usable} or smaller, or more text" if usable >= 2 else "pass a longer text"
        raise DataError(f"the text has {usable} tokens{limit}, fewer than one window of {seqlen}; {hint}")
    ids = tokens[:usable].unfold(0, seqlen, stride)  # [W, seqlen]
    return Windows(ids=ids, seqlen=seqlen, stride=stride, tokens_available=available)
