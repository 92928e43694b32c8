"""Recipes: pydantic models of what a conversion does (extra="forbid": a typo is an error, not a silent default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moeconv.errors import RecipeError
from moeconv.heal import HealConfig
from moeconv.refit import RefitConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PartitionSpec(Strict):
    method: str = "random"  # a registered partitioner: random | kmeans | coact | dot
    options: dict[str, Any] = Field(default_factory=dict)


class CalibrationSpec(Strict):
    source: str = "shakespeare"  # built-in corpus, file or folder; see moeconv.calib.sources
    tokens: int = Field(16384, ge=1)
    seqlen: int = Field(512, ge=8)
    text_field: str = "text"


class ConvertRecipe(Strict):
    experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    shared_neurons: int = Field(0, ge=0)  # always-active neurons taken out of the routed pool
    scoring: Literal["none", "softmax", "sigmoid"] = "none"
    renormalize: bool = False
    partition: PartitionSpec = Field(default_factory=PartitionSpec)
    router: dict[str, Any] = Field(default_factory=dict)  # moeconv.router.train.RouterConfig fields
    train_router: bool = True  # False: keep a random router (only sensible with top_k == experts)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    # Least-squares refit of each layer's down projection under its routing (moeconv.refit); null turns it off.
    refit: RefitConfig | None = Field(default_factory=RefitConfig)
    dag: dict[str, Any] | None = None
    heal: HealConfig | None = None  # end-to-end distillation of the whole MoE model after the layer stages
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_shard_size: str = "1GB"
    seed: int = 0

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v

    @field_validator("refit", mode="before")
    @classmethod
    def _refit_switch(cls, v: Any) -> Any:
        """`refit: false` turns the stage off, `refit: true` keeps its defaults."""
        return (RefitConfig() if v else None) if isinstance(v, bool) else v

    @field_validator("dag")
    @classmethod
    def _dag(cls, v: dict | None) -> dict | None:
        if v is not None:
            from moeconv.dag import DagConfig

            if DagConfig(**v).end_to_end is not None:  # unknown or invalid aggregator settings fail at load time
                raise ValueError("dag.end_to_end trains the aggregators of the whole converted model, which convert "
                                 "writes layer by layer; drop it here and run `moeconv dag OUT OUT2 --objective kl` after convert")
        return v

    @property
    def refits(self) -> bool:
        """Whether the refit stage runs: with every expert active nothing is dropped, so there is nothing to refit."""
        return self.refit is not None and self.top_k < self.experts

    @property
    def trains_router(self) -> bool:
        """Whether the router stage runs: with every expert selected at weight 1 (top_k == experts, scoring none)
        the router's values never change the output, so there is nothing to learn and no text is needed."""
        return self.train_router and not (self.top_k == self.experts and self.scoring == "none")

    def needs_calibration(self, partitioner_needs: bool) -> bool:
        return partitioner_needs or self.trains_router or self.refits or self.shared_neurons > 0 or self.dag is not None


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64KB', '1234' -> bytes."""
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    s = str(text).strip().upper()
    for unit, factor in units.items():
        if s.endswith(unit) and s[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(s[: -len(unit)]) * factor)
    if s.isdigit():
        return int(s)
    raise ValueError(f"'{text}' is not a size like 1GB, 500MB or 1234")


def first_error(err: ValidationError, where: str) -> RecipeError:
    e = err.errors()[0]
    field = ".".join(str(p) for p in e["loc"]) or "(root)"
    if e["type"] == "extra_forbidden":
        return RecipeError(f"{where}: unknown field '{field}'; remove it or check its spelling")
    return RecipeError(f"{where}: field '{field}': {e['msg']}")


def load_yaml_recipe(model: type[BaseModel], path: str | Path | None, overrides: dict[str, Any] | None, example: str):
    """A `model` recipe from YAML (or defaults), with CLI overrides (dotted keys allowed: 'partition.method')."""
    data: dict[str, Any] = {}
    where = "recipe"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise RecipeError(f"recipe {p} does not exist; pass a YAML file such as {example}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"{p} is not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{p} must hold a mapping of recipe fields at the top level")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise first_error(err, where) from None


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> ConvertRecipe:
    return load_yaml_recipe(ConvertRecipe, path, overrides, "configs/dot-moe.yaml")


def dump_recipe(recipe: BaseModel) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
