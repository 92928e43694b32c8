"""DAG-MoE: a learned aggregator of each token's k expert outputs, distilled layer by layer to the dense FFN."""

from moeconv.config import DagConfig, DagTrainConfig
from moeconv.dag.distill import attach_dag, distill_dag
from moeconv.modeling.hf.dag import DagAggregator

__all__ = ["DagAggregator", "DagConfig", "DagTrainConfig", "attach_dag", "distill_dag"]
