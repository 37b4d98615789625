"""epmoe.eplb: expert-parallel load balancing.

Planning (`plan`, `Placement`, `balancedness`, the DeepSeek-compatible `rebalance_experts`), replica choice at
routing (`map_to_physical` with the "hash", "weighted" and "balanced" policies), load recording (`LoadRecorder`),
weight movement (`rearrange`) and a cluster simulator (`simulate`).
"""

from .deepseek import rebalance_experts
from .placement import POLICIES, MoveStats, Placement, balancedness, num_redundant_auto, rank_load
from .planner import STRATEGIES, plan
from .rearrange import LayerTransferStats, RearrangeError, RearrangeReport, rearrange, tensor_digest, transfer_plan
from .recorder import LoadRecorder
from .replica import group_counts, hash32, map_to_physical
from .shares import optimal_rank_load, replica_shares
from .simulator import PRESETS as SIMULATE_PRESETS
from .simulator import ModelPreset, simulate

__all__ = [
    "LayerTransferStats",
    "LoadRecorder",
    "ModelPreset",
    "POLICIES",
    "MoveStats",
    "Placement",
    "RearrangeError",
    "RearrangeReport",
    "SIMULATE_PRESETS",
    "STRATEGIES",
    "balancedness",
    "group_counts",
    "hash32",
    "map_to_physical",
    "num_redundant_auto",
    "optimal_rank_load",
    "plan",
    "rank_load",
    "rearrange",
    "replica_shares",
    "simulate",
    "rebalance_experts",
    "tensor_digest",
    "transfer_plan",
]
