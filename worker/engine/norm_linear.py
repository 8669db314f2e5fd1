"""An RMSNorm whose output feeds one int8 linear, as one kernel: the residual add (where there is one), the norm and
the linear's input quantisation (int8_ops.norm_quantize), where the linear runs its tuned Triton GEMM.

Apart, the norm writes its output and the quantiser reads it back in a launch of its own: at a decode step's few
hundred rows that launch costs more than its bytes, twice a layer. Elsewhere (no tuned launch, the small-row GEMV,
a rotated input, calibration, a module with hooks) the two run as they do alone.
"""

import torch
from batchgen.worker.engine.fused import NORM_KIND_ATTR, NormKind, add_norm
from batchgen.worker.engine.int8_linear import InputPlan, Int8Linear
from batchgen.worker.engine.kernels import int8_ops

ENABLED = True  # False: the norm and the quantiser as separate kernels (benchmarks' A/B)


def hooked(module: torch.nn.Module) -> bool:
    """Whether calling around module's forward would skip hooks someone registered on it (a fault injector's)."""
    return bool(module._forward_pre_hooks or module._forward_hooks or hasattr(module, "_hf_hook"))


def _plan(norm: torch.nn.Module, linear: torch.nn.Module, h: torch.Tensor,
          delta: torch.Tensor | None) -> InputPlan | None:
    kind: NormKind | None = getattr(norm, NORM_KIND_ATTR, None)
    if (not ENABLED or kind is None or not isinstance(linear, Int8Linear) or norm.weight.dtype != h.dtype
            or hooked(norm) or hooked(linear) or not h.is_contiguous()
            or (delta is not None and not delta.is_contiguous())):
        return None
    return linear.input_plan(h.view(-1, h.shape[-1]))


def norm_linear(norm: torch.nn.Module, linear: torch.nn.Module, h: torch.Tensor,
                delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, linear(norm(h + delta))), or without delta (h, linear(norm(h))): one kernel for the add, the
    norm and the quantisation where the linear's plan allows, then its GEMM."""
    plan = _plan(norm, linear, h, delta)
    if plan is None:
        if delta is None:
            return h, linear(norm(h))
        h, x = add_norm(norm, h, delta)
        return h, linear(x)
    kind: NormKind = getattr(norm, NORM_KIND_ATTR)
    width = h.shape[-1]
    normed = int8_ops.norm_quantize(h.view(-1, width), norm.weight, kind.eps, kind.gemma,
                                    None if delta is None else delta.view(-1, width), plan.guard, keep=plan.dense,
                                    store_x=plan.dense)  # the dense path's epilogue reads the normed activations
    out = linear.forward_quantized(normed.xq, normed.absmax, plan, h.dtype, normed.x)
    return normed.h.view(h.shape), out.view(*h.shape[:-1], linear.out_features)
