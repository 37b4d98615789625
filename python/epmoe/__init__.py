"""epmoe: Expert Parallelism for Mixture-of-Experts models.

Fused grouped top-K routing, token permutation and grouped SwiGLU expert kernels (CPU and CUDA), a C++ runtime
for expert-parallel dispatch/combine over NCCL or gloo, an EPLB planner, and an expert-parallel MoE layer.
See README.md.
"""

from epmoe import eplb
from epmoe._loader import has_cuda_kernels
from epmoe.ep import DispatchHandle, DispatchResult, EPGroup
from epmoe.experts import experts_forward, grouped_swiglu_experts
from epmoe.layer import MoE, MoEConfig
from epmoe.ops import route

__version__ = "0.1.0"

__all__ = [
    "DispatchHandle",
    "DispatchResult",
    "EPGroup",
    "MoE",
    "MoEConfig",
    "__version__",
    "eplb",
    "experts_forward",
    "grouped_swiglu_experts",
    "has_cuda_kernels",
    "route",
]
