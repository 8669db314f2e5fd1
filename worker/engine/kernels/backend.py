"""Whether a tensor's kernels run in Triton: on CUDA when Triton imports, or anywhere under its interpreter
(TRITON_INTERPRET=1, how the CPU tests run them)."""

import os

import torch

try:
    import triton  # noqa: F401  (comes with CUDA builds of torch; absent on CPU-only installs)

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or interpreting())
