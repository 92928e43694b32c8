"""Every recipe shipped in configs/ loads and validates (a typo in a shipped recipe would fail every user)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeconv.config import load_quant_recipe, load_recipe

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
QUANT = {"gptq-int4.yaml", "gptq-int4-q4_1.yaml", "qmoe-ternary.yaml"}


def test_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= QUANT | {"dot-moe.yaml", "dot-moe-heal.yaml", "random-moe.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_recipe_loads(path: Path):
    if path.name in QUANT:
        recipe = load_quant_recipe(path)
        if path.name == "gptq-int4-q4_1.yaml":
            assert recipe.spec.float_zeros and recipe.group_size == 32
    else:
        recipe = load_recipe(path)
        assert 1 <= recipe.top_k <= recipe.experts
        if path.name == "dot-moe-heal.yaml":
            assert recipe.heal is not None and recipe.heal.tokens == 131072 and recipe.heal.source == "mix"
        if path.name in ("dot-moe.yaml", "dot-moe-heal.yaml"):  # the defaults: calibrated as measured best
            assert recipe.calibration.source == "mix" and recipe.calibration.inputs == "converted"
            assert recipe.refit.target == "layer"
        if path.name.startswith("dot-moe"):
            assert recipe.refits


def test_a_heal_block_without_a_source_heals_on_the_calibration_text():
    recipe = load_recipe(None, {"calibration.source": "mix", "heal.tokens": 4096})
    assert recipe.heal.source == "mix"
    explicit = load_recipe(None, {"calibration.source": "mix", "heal.tokens": 4096, "heal.source": "shakespeare"})
    assert explicit.heal.source == "shakespeare"
    assert load_recipe(None, {"heal.tokens": 4096}).heal.source == "mix"  # the calibration default


def test_the_flag_defaults_are_the_shipped_default_recipe():
    """`moeconv convert SRC OUT` without --recipe runs configs/dot-moe.yaml, the conversion that RESULTS.md measured."""
    shipped = load_recipe(Path(__file__).parent.parent / "configs" / "dot-moe.yaml")
    assert load_recipe(None).model_dump() == shipped.model_dump()
    assert shipped.partition.method == "dot" and (shipped.experts, shipped.top_k) == (8, 4)
