"""epmoe.eplb: expert-parallel load balancing.

Planning (`plan`, `Placement`, `balancedness`, the DeepSeek-compatible `rebalance_experts`), replica choice at
routing (`map_to_physical`), load recording (`LoadRecorder`) and weight movement (`rearrange`).
"""

from .deepseek import rebalance_experts
from .placement import MoveStats, Placement, balancedness, num_redundant_auto, rank_load
from .planner import STRATEGIES, plan
from .rearrange import LayerTransferStats, RearrangeError, RearrangeReport, rearrange, tensor_digest, transfer_plan
from .recorder import LoadRecorder
from .replica import hash32, map_to_physical

__all__ = [
    "LayerTransferStats",
    "LoadRecorder",
    "MoveStats",
    "Placement",
    "RearrangeError",
    "RearrangeReport",
    "STRATEGIES",
    "balancedness",
    "hash32",
    "map_to_physical",
    "num_redundant_auto",
    "plan",
    "rank_load",
    "rearrange",
    "rebalance_experts",
    "tensor_digest",
    "transfer_plan",
]
