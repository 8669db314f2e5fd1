"""A set of small functions that run eagerly until compile() swaps each for its torch.compile'd version (one fused
kernel on CUDA); callers read them as attributes, so a module-level set switches every call site at once.

Two ways to compile (EngineConfig.compile_shapes):
- "dynamic": every dimension symbolic (one graph serves all shapes); a kernel's index math then divides by
  symbolic sizes and cannot prove its rows aligned, so its loads may not vectorise.
- "static-features": only the leading (token/row) dimensions symbolic, each tensor's last one a constant, as vLLM
  marks only the token dimension; a function met at another feature size (q_norm's head size beside the
  hidden size) compiles once more for it instead of turning that dimension symbolic.
"""

from collections.abc import Callable

import torch
from batchgen.worker.engine.config import COMPILE_SHAPES

SHAPES = "static-features"  # EngineConfig.compile_shapes, set where the engine is built (process-wide, as USE_GEMV is)
_RECOMPILE_LIMIT = 64  # static-features: a graph per feature size and per 0/1-specialised leading dimension


class Compilable:
    def __init__(self, **functions: Callable) -> None:
        self._eager = functions
        self.__dict__.update(functions)
        self.compiled: str | None = None

    def compile(self, shapes: str | None = None) -> None:
        shapes = shapes or SHAPES
        if shapes not in COMPILE_SHAPES:
            raise ValueError(f"compile shapes must be one of {COMPILE_SHAPES}, got {shapes!r}")
        if self.compiled == shapes:
            return
        self.__dict__.update({name: compile_function(fn, shapes) for name, fn in self._eager.items()})
        self.compiled = shapes


def compile_static_features(fn: Callable) -> Callable:
    """fn compiled with its tensors' leading dimensions symbolic and their last one constant."""
    config = torch._dynamo.config
    # process-wide (a per-call config.patch costs more than these kernels): a feature size met later recompiles
    # static instead of turning that dimension symbolic
    config.automatic_dynamic_shapes = False
    config.recompile_limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
    return _leading_dims_dynamic(torch.compile(fn, dynamic=None))


def compile_function(fn: Callable, shapes: str | None = None) -> Callable:
    """fn compiled as shapes (default SHAPES) says."""
    return torch.compile(fn, dynamic=True) if (shapes or SHAPES) == "dynamic" else compile_static_features(fn)


def _leading_dims_dynamic(compiled: Callable) -> Callable:
    def call(*args, **kwargs):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                for dim in range(arg.dim() - 1):
                    torch._dynamo.maybe_mark_dynamic(arg, dim)
        return compiled(*args, **kwargs)
    return call
