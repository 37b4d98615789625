"""epmoe: Expert Parallelism for Mixture-of-Experts models.

Fused grouped top-K routing, token permutation and grouped SwiGLU expert kernels (CPU and CUDA), a C++ runtime
for expert-parallel dispatch/combine over NCCL or gloo, and an EPLB planner. See README.md.
"""

from epmoe._loader import has_cuda_kernels
from epmoe.experts import experts_forward, grouped_swiglu_experts
from epmoe.ops import route

__version__ = "0.1.0"

__all__ = ["has_cuda_kernels", "route", "experts_forward", "grouped_swiglu_experts", "__version__"]
