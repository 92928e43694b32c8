"""Every setting a user gives, as pydantic models with no torch import: the CLI, the recipes and the docs read them here."""

from moeconv.config.base import Strict, dump_recipe, first_error, load_yaml_recipe, parse_size, read_yaml_mapping
from moeconv.config.convert import CalibrationSpec, ConvertRecipe, PartitionSpec, load_recipe
from moeconv.config.dag import DagConfig, DagEndToEndConfig, DagTrainConfig
from moeconv.config.heal import HealConfig, heal_config
from moeconv.config.quant import FORMATS, INT_BITS, TERNARY_FORMATS, ClipSearch, QuantRecipe, QuantSpec, load_quant_recipe
from moeconv.config.refit import RefitConfig
from moeconv.config.router import RouterConfig

__all__ = [
    "FORMATS", "INT_BITS", "TERNARY_FORMATS", "CalibrationSpec", "ClipSearch", "ConvertRecipe", "DagConfig",
    "DagEndToEndConfig", "DagTrainConfig", "HealConfig", "PartitionSpec", "QuantRecipe", "QuantSpec", "RefitConfig",
    "RouterConfig", "Strict", "dump_recipe", "first_error", "heal_config", "load_quant_recipe", "load_recipe",
    "load_yaml_recipe", "parse_size", "read_yaml_mapping",
]
