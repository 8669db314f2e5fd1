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


def _let_interpreter_loop_over_scalars() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element arrays and int()s them where a kernel loops over
    range(start, end); numpy >= 2.4 refuses int() of a 1-element array. Same value, taken with an index."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "indexes_scalars", False):  # another Triton, or done already
        return

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.indexes_scalars = True
    interpreter._patch_lang_tensor = patched


if HAS_TRITON and interpreting():
    _let_interpreter_loop_over_scalars()
