"""DAG-MoE: a learned aggregator of each token's k expert outputs, distilled layer by layer to the dense FFN."""

from moeconv.dag.distill import DagConfig, DagTrainConfig, attach_dag, distill_dag
from moeconv.modeling.hf.dag import DagAggregator

__all__ = ["DagAggregator", "DagConfig", "DagTrainConfig", "attach_dag", "distill_dag"]
