"""What every config shares: strict pydantic models, sizes, one-line validation errors, YAML in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from moeconv.errors import RecipeError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


def read_yaml_mapping(path: Path, example: str) -> dict[str, Any]:
    """The mapping at the top of a YAML file, or a one-line RecipeError naming what is wrong with the file."""
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist; pass a YAML file such as {example}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping of fields at the top level")
    return data


def load_yaml_recipe(model: type[BaseModel], path: str | Path | None, overrides: dict[str, Any] | None, example: str):
    """A `model` recipe from YAML (or defaults), with CLI overrides (dotted keys allowed: 'partition.method')."""
    data: dict[str, Any] = read_yaml_mapping(Path(path), example) if path is not None else {}
    where = str(path) if path is not None else "recipe"
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"{where}: field '{part}' must be a mapping to set {key}; fix the recipe")
        node[leaf] = value
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise first_error(err, where) from None


def dump_recipe(recipe: BaseModel) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
