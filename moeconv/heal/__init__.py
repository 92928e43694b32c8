"""Heal: end-to-end distillation of a student causal LM (MoE or pruned dense) to its dense teacher, resumable, on accelerate."""

from moeconv.heal.groups import parameter_groups, straight_through_routing
from moeconv.heal.job import heal_checkpoint, heal_settings
from moeconv.heal.objective import distill_metrics
from moeconv.heal.student import write_like_student
from moeconv.heal.train import HealEvent, heal

__all__ = ["HealEvent", "distill_metrics", "heal", "heal_checkpoint", "heal_settings", "parameter_groups", "straight_through_routing", "write_like_student"]
