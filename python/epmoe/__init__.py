"""epmoe: Expert Parallelism for Mixture-of-Experts models.

Fused grouped top-K routing, token permutation and grouped SwiGLU expert kernels (CPU and CUDA), a C++ runtime
for expert-parallel dispatch/combine over NCCL or gloo, an EPLB planner, and an expert-parallel MoE layer with its
training helpers (`sync_grads`, `rebalance_model`, `aux_loss`; docs/training.md). See README.md.
"""

from epmoe import balance, eplb, training
from epmoe._loader import has_cuda_kernels
from epmoe.balance import aux_loss
from epmoe.ep import DispatchHandle, DispatchResult, EPGroup
from epmoe.experts import experts_forward, grouped_swiglu_experts
from epmoe.layer import MoE, MoEConfig
from epmoe.ops import route
from epmoe.training import rebalance_model, sync_grads

__version__ = "0.1.0"

__all__ = [
    "DispatchHandle",
    "DispatchResult",
    "EPGroup",
    "MoE",
    "MoEConfig",
    "__version__",
    "aux_loss",
    "balance",
    "eplb",
    "experts_forward",
    "grouped_swiglu_experts",
    "has_cuda_kernels",
    "rebalance_model",
    "route",
    "sync_grads",
    "training",
]
