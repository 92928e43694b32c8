"""moeconv's model classes registered with transformers' Auto classes: every module that reads a config or builds a
model imports this first, so moeconv checkpoints load through the installed classes and no remote code ever runs."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from moeconv.modeling.hf.configuration_moeconv import MoeconvConfig
from moeconv.modeling.hf.modeling_moeconv import MoeconvForCausalLM

AutoConfig.register("moeconv", MoeconvConfig, exist_ok=True)
AutoModelForCausalLM.register(MoeconvConfig, MoeconvForCausalLM, exist_ok=True)
