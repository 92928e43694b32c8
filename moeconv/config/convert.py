"""The convert recipe: pydantic models of what a conversion does (extra="forbid": a typo is an error, not a silent default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_serializer, field_validator, model_validator

from moeconv.config.base import Strict, load_yaml_recipe, parse_size
from moeconv.config.dag import DagConfig
from moeconv.config.heal import HealConfig
from moeconv.config.refit import RefitConfig
from moeconv.config.router import RouterConfig


class PartitionSpec(Strict):
    method: str = "dot"  # a registered partitioner: dot | coact | kmeans | random | cmoe | expertweaver
    options: dict[str, Any] = Field(default_factory=dict)


class CalibrationSpec(Strict):
    # Built-in corpus, file or folder (moeconv.calib.sources). The three-domain mix: Shakespeare alone gives 11% lower
    # perplexity on held-out Shakespeare and 2.1x higher on other text (RESULTS.md, session 7).
    source: str = "mix"
    tokens: int = Field(16384, ge=1)
    seqlen: int = Field(512, ge=8)
    text_field: str = "text"
    # dense: every layer is calibrated on the dense model's hidden states. converted: on the states that the layers
    # converted before it produce, i.e. on the inputs it will see in the converted model (as GPTQ quantizes layer by
    # layer); the dense stream is carried beside it for refit.target: layer. Costs two more layer passes per layer.
    inputs: Literal["dense", "converted"] = "converted"


class ConvertRecipe(Strict):
    """Its defaults are the shipped default, configs/dot-moe.yaml (a test keeps the two equal): a conversion given only
    flags is the one that was measured."""

    experts: int = Field(8, ge=1)
    top_k: int = Field(4, ge=1)
    shared_neurons: int = Field(0, ge=0)  # always-active neurons taken out of the routed pool
    scoring: Literal["none", "softmax", "sigmoid"] = "none"
    renormalize: bool = False
    partition: PartitionSpec = Field(default_factory=PartitionSpec)
    router: RouterConfig = Field(default_factory=RouterConfig)
    train_router: bool = True  # False: keep a random router (only sensible with top_k == experts)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    # Least-squares refit of each layer's down projection under its routing (moeconv.refit); null turns it off.
    refit: RefitConfig | None = Field(default_factory=RefitConfig)
    dag: DagConfig | None = None  # a DAG-MoE aggregator per layer, distilled to the dense FFN
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

    @model_validator(mode="after")
    def _refit_target(self) -> ConvertRecipe:
        """The layer target (the default) needs the converted stream; with dense inputs an unset target means ffn."""
        if self.refit is not None and "target" not in self.refit.model_fields_set and self.calibration.inputs == "dense":
            self.refit.target = "ffn"
        if self.refit is not None and self.refit.target == "layer" and self.calibration.inputs != "converted":
            raise ValueError("refit.target: layer corrects the error that earlier converted layers leave, which only "
                             "calibration.inputs: converted measures; set both, or use refit.target: ffn")
        return self

    @model_validator(mode="after")
    def _heal_text(self) -> ConvertRecipe:
        """A heal block without a source of its own heals on the calibration text (what `--heal-source` promises), not
        on the standalone `moeconv heal` default."""
        if self.heal is not None and "source" not in self.heal.model_fields_set:
            self.heal.source = self.calibration.source
        return self

    @field_validator("dag")
    @classmethod
    def _dag(cls, v: DagConfig | None) -> DagConfig | None:
        if v is not None and v.end_to_end is not None:
            raise ValueError("dag.end_to_end trains the aggregators of the whole converted model, which convert "
                             "writes layer by layer; drop it here and run `moeconv dag OUT OUT2 --objective kl` after convert")
        return v

    @field_serializer("router", "dag")
    def _as_written(self, v: BaseModel | None) -> dict | None:
        """Nested blocks are written as the user gave them (defaults stay implicit), so recipe.yaml reads as the recipe did."""
        return None if v is None else v.model_dump(mode="json", exclude_unset=True)

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


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> ConvertRecipe:
    return load_yaml_recipe(ConvertRecipe, path, overrides, "configs/dot-moe.yaml")
