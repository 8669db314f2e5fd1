"""A gated MLP's down projection from its gate_up output, as one kernel before the GEMM: the activation times up,
the rotation of the down projection's input (--int8-rotate down) and its int8 quantisation
(int8_ops.gated_quantize); the residual add rides in the GEMM's epilogue.

Apart, act(gate)·up is written and read back by the rotation's batched matmul, whose output the quantiser reads
again, and the residual add is a launch of its own: four launches and three round trips of the widest activation
of the layer. Elsewhere (no tuned launch, the small-row GEMV, calibration, an activation or rotation the kernel
does not build, a module with hooks) the pieces run as they do alone.
"""

import torch
from batchgen.worker.engine.fused import GATED_ACT_ATTR, gated_down
from batchgen.worker.engine.int8_linear import InputPlan, Int8Linear
from batchgen.worker.engine.kernels import int8_ops, tuned
from batchgen.worker.engine.norm_linear import hooked

ENABLED = True  # False: the activation, rotation, quantiser and residual add as separate kernels (benchmarks' A/B)


def _plan(mlp: torch.nn.Module, gate_up2: torch.Tensor) -> InputPlan | None:
    down = mlp.down_proj
    if (not ENABLED or not isinstance(down, Int8Linear) or hooked(down) or hooked(mlp)
            or getattr(mlp, GATED_ACT_ATTR) not in int8_ops.GATED_ACTS
            or down.rotate_block not in (0, int8_ops.ROTATE_BLOCK) or gate_up2.stride(-1) != 1):
        return None
    return down.input_plan(gate_up2[:, :down.in_features], rotates=True)


def gated_launch(rows: int, inner: int, device: torch.device | str) -> dict:
    """gated_quantize's launch for rows of an MLP inner wide: the tuned table's "gated" section
    (benchmarks/gated.py --table), else its defaults."""
    table = tuned.launches(tuned.device_name(torch.device(device)), "gated")
    return tuned.pick(table, rows, inner, inner) or {} if table else {}


def gated_linear(mlp: torch.nn.Module, gate_up: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + mlp.down_proj(act(gate) · up) from mlp's fused gate_up projection's output [..., 2 * inner]."""
    gate_up2 = gate_up.view(-1, gate_up.shape[-1])
    plan = _plan(mlp, gate_up2)
    if plan is None:
        return residual + gated_down(mlp, gate_up)
    down: Int8Linear = mlp.down_proj
    gated = int8_ops.gated_quantize(gate_up2, down.in_features, getattr(mlp, GATED_ACT_ATTR), down.rotate_block,
                                    plan.guard, keep=plan.dense,
                                    store_x=plan.dense,  # the dense path's epilogue reads the activations
                                    **gated_launch(gate_up2.shape[0], down.in_features, gate_up.device))
    out = down.forward_quantized(gated.xq, gated.absmax, plan, residual.dtype, gated.x,
                                 residual=residual.reshape(-1, residual.shape[-1]))
    return out.view(residual.shape)
