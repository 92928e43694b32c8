"""What the heal test files share: one thread for tiny matmuls, and a tiny dense llama with its (4, 2) MoE student."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import build_dense, sample_text, save_char_tokenizer
from moeconv.config import load_recipe
from moeconv.convert import convert
from moeconv.io.load import load_tokenizer

SEQ = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a loaded 2-core machine are orders of magnitude slower with 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def heal_models(root: Path) -> dict:
    """Dense teacher, calibration text, its MoE student and 16 held-out windows of SEQ tokens, under `root`."""
    # A larger init than the default 0.02 makes the logits far from uniform, so KL is not trivially ~0.
    dense = build_dense("llama", root / "dense", initializer_range=0.2)
    save_char_tokenizer(dense)
    train = root / "train.txt"
    train.write_text(sample_text(40000, seed=0))
    moe = root / "moe"
    # Without the refit: the heal tests need a student far from its teacher (the refit alone closes much of the gap).
    convert(str(dense), moe, load_recipe(None, {"experts": 4, "top_k": 2, "router.steps": 30, "calibration.source": str(train),
                                                "calibration.tokens": 512, "calibration.seqlen": 64, "refit": False,
                                                "partition.method": "random", "calibration.inputs": "dense"}))
    tok = load_tokenizer(moe)
    held = torch.tensor(tok(sample_text(6000, seed=7))["input_ids"][: 16 * SEQ]).view(16, SEQ)
    return {"root": root, "dense": dense, "moe": moe, "train": train, "tok": tok, "held": held}
