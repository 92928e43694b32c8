"""The files that make a folder a moeconv checkpoint, written in one place for every job: config, modeling code,
recipe, tokenizer and generation defaults, and the provenance record."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import safetensors
import torch
import transformers
from pydantic import BaseModel
from transformers import GenerationConfig

import moeconv
from moeconv.config import dump_recipe
from moeconv.errors import CheckpointError
from moeconv.io.load import load_tokenizer
from moeconv.io.readers import CheckpointReader
from moeconv.io.writer import PartialOutput
from moeconv.jobs.runner import job_fingerprint

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    return {"moeconv": moeconv.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


def save_tokenizer_files(reader: CheckpointReader, partial: PartialOutput) -> bool:
    """Carry the source's tokenizer and generation defaults (eos ids, sampling) into OUT.partial.  -> tokenizer saved"""
    source = Path(reader.path)
    generation = source / "generation_config.json" if source.is_dir() else None
    if generation is not None and generation.is_file():
        partial.copy_in(generation)
    elif getattr(reader.config, "eos_token_id", None) is not None:  # a .gguf: its ids are in the config it implies
        partial.write_saved(GenerationConfig.from_model_config(reader.config).save_pretrained)
    try:
        tokenizer = load_tokenizer(reader.path)
    except CheckpointError as err:
        log.warning("the output has no tokenizer: %s", err)
        return False
    partial.write_saved(tokenizer.save_pretrained)
    return True


def write_checkpoint_files(partial: PartialOutput, config: dict, recipe: BaseModel, reader: CheckpointReader) -> bool:
    """config.json, the modeling code, recipe.yaml, the tokenizer and generation_config.json.  -> whether a tokenizer was saved"""
    partial.write_text("config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    partial.write_modeling_code()
    partial.write_text("recipe.yaml", dump_recipe(recipe))
    return save_tokenizer_files(reader, partial)


def fingerprint(reader: CheckpointReader, recipe: BaseModel, calibration: str) -> str:
    """Identifies (source, recipe, calibration data): a partial output may only be resumed under the same one."""
    return job_fingerprint(source=reader.fingerprint(), recipe=recipe.model_dump(mode="json"), calib=calibration)


def provenance(source: str, reader: CheckpointReader, calibration: str, tokenizer: bool, **sections) -> dict:
    """What provenance.json records of every job: the exact input, the data, the versions; plus the job's own sections."""
    return {"source": source, "source_sha256": reader.fingerprint(), "calibration": calibration, "versions": versions(),
            "tokenizer": tokenizer, **sections}
