"""Routers: training on captured FFN inputs and an un-fused reference MoE forward."""

from moeconv.config import RouterConfig
from moeconv.router.reference import expert_importance, moe_forward
from moeconv.router.train import train_router

__all__ = ["RouterConfig", "expert_importance", "moe_forward", "train_router"]
