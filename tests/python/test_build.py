"""The build reports what it compiled, and the loaded extension matches the imported torch."""

import os
import shutil

import epmoe
import torch
from epmoe import _loader


def test_build_info_matches_torch():
    info = _loader.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["cuda"] == epmoe.has_cuda_kernels()


def test_cuda_build_follows_torch():
    # CUDA kernels are compiled exactly when torch is a CUDA build (and nvcc exists on the build machine):
    # a CUDA torch without registered CUDA impls would silently fall back to nothing.
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = shutil.which("nvcc") or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if torch.version.cuda is None:
        assert not epmoe.has_cuda_kernels()
    elif nvcc:
        assert epmoe.has_cuda_kernels()
        assert "CUDA" in str(torch._C._dispatch_dump("epmoe::route"))
