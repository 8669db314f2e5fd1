"""Fast int8 linears over bitsandbytes' own int8 weights: the weights stay int8 in memory, only the kernel changes.

Two-method interface (gpt-fast's): `Int8State.from_bnb(module)` takes bnb's quantised state (CB: int8
[out, in], SCB: per-output-row absmax) without copying it, and `convert_model(model, kernel)` swaps every
Linear8bitLt for an `Int8Linear` that runs one of:

- "int_mm": W8A8 on the int8 tensor cores: per-token absmax quantisation of the activations, then
  `torch._int_mm(x_q, CB.T)` and out = acc · absmax · SCB / 127². This is bnb's own arithmetic at
  llm_int8_threshold=0 (bnb rounds the same way), without its outlier decomposition: activation
  columns above the threshold are quantised with the rest instead of going through fp16.
- "int_mm_outliers" (the default where int_mm runs and the threshold is > 0): LLM.int8()'s decomposition with
  fixed outlier columns (int8_outliers): out = int_mm(q(x with the outlier columns zeroed)) dequantised
  + x[:, idx] @ W[idx] in the compute dtype, W[idx] being the dequantised int8 rows of those columns, as
  bnb does. Fixed shapes and no host sync, so decode steps stay in CUDA graphs; a guard catches new outliers.
- "weight_only": out = x @ (CB · SCB/127).T in the compute dtype; exact in the weights, 2× the traffic.

At a few rows (decode of a small batch, the tail of a bulk run) every kernel takes kernels.int8_gemv instead:
weight-only arithmetic (exact in the weights, float32 accumulation) reading the int8 weights once, where
cuBLASLt's int8 GEMM pads to 17 rows and does not stream the weights at the bus rate. The outlier guard
still records those rows' activations, so the columns it opens serve the larger batches.

`fuse_projections` concatenates q/k/v and gate/up of each layer into one int8 matrix (one quantisation
and one matmul instead of three or two); the per-projection modules keep working as views of it.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from batchgen.worker.engine import rotation
from batchgen.worker.engine.config import INT8_ROTATE
from batchgen.worker.engine.int8_outliers import (
    OUTLIER_SLACK,
    OutlierColumns,
    OutlierGuard,
    calibration_ids,
    slots_for,
)
from batchgen.worker.engine.kernels import int8_ops, tuned
from batchgen.worker.engine.kernels.backend import HAS_TRITON, triton_available
from batchgen.worker.engine.kernels.compiled import Compilable
from batchgen.worker.engine.kernels.int8_gemv import MAX_ROWS as GEMV_MAX_ROWS
from batchgen.worker.engine.kernels.int8_gemv import GuardBuffers, int8_gemv
from batchgen.worker.engine.kernels.int8_ops import int8_matmul_dequant

log = logging.getLogger("batchgen.int8")

OUTLIER_KERNEL = "int_mm_outliers"
_FAST_KERNELS = ("int_mm", OUTLIER_KERNEL, "weight_only")  # what Int8Linear runs
_INV_127 = 7.874015718698502e-3  # bnb's int8_vectorwise_dequant constant: the dense rows equal bnb's subB
_INV_127_SQ = 6.200124e-05  # bnb's constant for 1/127² (which is 6.2000124e-05): kept, so we equal bnb exactly
_CUDA_INT_MM_MIN_ROWS = 17  # cuBLASLt int8 through torch._int_mm wants more than 16 rows
# The small-row GEMV: None runs it on CUDA (fp16/bf16 inputs) wherever Triton imports; True wherever Triton
# runs, its interpreter included (how the CPU tests force it); False never.
USE_GEMV: bool | None = None
# Triton's quantising kernel and int8 GEMM with the epilogue fused, at a launch benchmarks.int8_tune found faster
# than the compiled quantise + torch._int_mm + epilogue for that shape on this GPU (kernels/tuned/<device>.json).
# None: on CUDA where the table has one; True: wherever Triton runs (the CPU tests); False: never.
USE_TUNED_GEMM: bool | None = None
_GEMV_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class InputPlan:
    """How an Int8Linear quantises its input for the tuned Triton GEMM: the launch, the outlier guard that records
    each row (None for int_mm), and whether the dense path runs (the outlier columns zeroed in the int8 input and
    their product added in the epilogue)."""

    launch: dict
    guard: GuardBuffers | None
    dense: bool


@dataclass
class Int8State:
    cb: torch.Tensor  # int8 [out, in]
    scb: torch.Tensor  # float32 [out]: absmax of each weight row
    bias: torch.Tensor | None

    @classmethod
    def from_bnb(cls, module: torch.nn.Module) -> "Int8State":
        """bnb's CB/SCB as they are (no copy); after a forward bnb keeps them in module.state."""
        weight = module.weight
        cb = getattr(weight, "CB", None)
        scb = getattr(weight, "SCB", None)
        if cb is None and module.state.CB is not None:
            cb, scb = module.state.CB, module.state.SCB
        if cb is None:
            cb = weight.data
            scb = module.state.SCB if scb is None else scb
        if cb is None or cb.dtype != torch.int8 or scb is None:
            raise ValueError(f"{type(module).__name__} holds no int8 weights (has_fp16_weights?)")
        return cls(cb, scb.float(), module.bias)

    @classmethod
    def concat(cls, states: list["Int8State"]) -> "Int8State":
        biases = [s.bias for s in states]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(s.cb.shape[0], device=s.cb.device, dtype=torch.float32)
                              for s, b in zip(states, biases, strict=True)])
        return cls(torch.cat([s.cb for s in states]), torch.cat([s.scb for s in states]), bias)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] -> (int8 [m, k], absmax float32 [m, 1]); bnb's int8_vectorwise_quant, on fp16 inputs."""
    x16 = x.to(torch.float16)
    absmax = x16.abs().amax(dim=-1, keepdim=True).float()
    return torch.round(x16 * (127.0 / absmax)).to(torch.int8), absmax


def dequantize(acc: torch.Tensor, absmax: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    out = acc * (absmax * scb) * _INV_127_SQ
    if bias is not None:
        out = out + bias
    return out.to(dtype)


def quantize_outliers(x: torch.Tensor, keep: torch.Tensor, idx: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [m, k] -> int8 of x with the outlier columns zeroed, its row absmax [m, 1] and where that is [m, 1]
    (the guard's input), and the outlier columns x[:, idx] in x's dtype."""
    x16 = x.to(torch.float16) * keep
    absmax, argmax = x16.abs().max(dim=-1, keepdim=True)
    absmax = absmax.float()
    return torch.round(x16 * (127.0 / absmax)).to(torch.int8), absmax, argmax, x.index_select(1, idx)


def quantize_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_rows plus where each row's absmax is (the guard's input): an outlier input with no column yet."""
    x16 = x.to(torch.float16)
    absmax, argmax = x16.abs().max(dim=-1, keepdim=True)
    absmax = absmax.float()
    return torch.round(x16 * (127.0 / absmax)).to(torch.int8), absmax, argmax


def dequantize_plus(acc: torch.Tensor, absmax: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                    dense: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = acc * (absmax * scb) * _INV_127_SQ
    if bias is not None:
        out = out + bias
    return (out + dense.float()).to(dtype)


def dequantize_weight(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [out, in] -> the weight in dtype (bnb's dequantisation); scaled before the matmul, since x @ CB.T
    in fp16 overflows once |x| reaches a few tens (CB is the weight times 127 / its row's absmax)."""
    return (cb.float() * (scb * _INV_127).view(-1, 1)).to(dtype)


# The small elementwise functions around the matmul; compiled on CUDA so each is one fused kernel.
KERNELS = Compilable(quantize=quantize_rows, dequantize=dequantize, dequantize_weight=dequantize_weight,
                     quantize_outliers=quantize_outliers, quantize_argmax=quantize_argmax,
                     dequantize_plus=dequantize_plus)


def int_mm(xq: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """int8 [m, k] @ int8 [n, k].T -> int32 [m, n]; pads tiny batches for cuBLASLt."""
    m = xq.shape[0]
    if xq.is_cuda and m < _CUDA_INT_MM_MIN_ROWS:
        xq = F.pad(xq, (0, 0, 0, _CUDA_INT_MM_MIN_ROWS - m))
        return torch._int_mm(xq, cb.t())[:m]
    return torch._int_mm(xq, cb.t())


def tuned_gemm(xq: torch.Tensor, cb: torch.Tensor) -> dict | None:
    """The tuned Triton GEMM launch for xq [m, k] @ cb [n, k].T here, or None (see USE_TUNED_GEMM)."""
    if USE_TUNED_GEMM is False or not (xq.is_cuda or USE_TUNED_GEMM) or not triton_available(xq):
        return None
    table = tuned.launches(tuned.device_name(xq.device), "gemm")
    return tuned.pick(table, xq.shape[0], cb.shape[0], cb.shape[1]) if table else None


def takes_gemv(x2: torch.Tensor) -> bool:
    """Whether the flattened input x2 [m, k] goes through the small-row GEMV (see USE_GEMV)."""
    if not 0 < x2.shape[0] <= GEMV_MAX_ROWS or x2.stride(-1) != 1:
        return False
    if USE_GEMV is None:
        return HAS_TRITON and x2.is_cuda and x2.dtype in _GEMV_DTYPES
    return USE_GEMV and triton_available(x2)


class Int8Linear(torch.nn.Module):
    """A Linear8bitLt replacement over the same int8 tensors."""

    def __init__(self, state: Int8State, kernel: str = "int_mm"):
        super().__init__()
        self.dtype: torch.dtype | None = None  # the model's compute dtype, for `weight` (convert_model sets it)
        if kernel not in _FAST_KERNELS:
            raise ValueError(f"unknown int8 kernel {kernel!r}")
        self.register_buffer("cb", state.cb, persistent=False)
        self.register_buffer("scb", state.scb, persistent=False)
        self.register_buffer("bias", state.bias, persistent=False)
        self.register_buffer("dense", None, persistent=False)  # [slots, out]: weight rows of the outlier columns
        self.outliers: OutlierColumns | None = None
        # (cb, scb) where fill_dense reads them when the buffers are only a streaming slot's view (small VRAM).
        self.host_weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self.kernel = kernel
        self.out_features, self.in_features = self.cb.shape
        self.rotate_block = 0  # > 0: the weights are rotated (rotation.py) and each input is rotated on the way in

    @property
    def state(self) -> Int8State:
        return Int8State(self.cb, self.scb, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The weight dequantized, made on each read: for forwards that multiply by a linear's weight themselves
        (Mamba's dt_proj) or read its dtype."""
        weight = KERNELS.dequantize_weight(self.cb, self.scb, self.dtype or torch.float16)
        return rotation.rotate(weight, self.rotate_block) if self.rotate_block else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotate_block:
            x = rotation.rotate(x, self.rotate_block)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        plan = self._plan(x2)
        if plan is not None:  # one quantising kernel (recording for the guard too), one GEMM with the epilogue fused
            xq, absmax = int8_ops.quantize_input(x2, plan.guard, keep=plan.dense)
            out = self.forward_quantized(xq, absmax, plan, x2.dtype, x2)
        elif self.kernel == OUTLIER_KERNEL:
            out = self._forward_outliers(x2)
        elif takes_gemv(x2):
            out = int8_gemv(x2, self.cb, self.scb, self.bias)
        elif self.kernel == "int_mm":
            xq, absmax = KERNELS.quantize(x2)
            out = KERNELS.dequantize(int_mm(xq, self.cb), absmax, self.scb, self.bias, x.dtype)
        else:
            out = self._forward_weight_only(x2)
        return out.reshape(*shape[:-1], self.out_features)

    def input_plan(self, x2: torch.Tensor, *, rotates: bool = False) -> InputPlan | None:
        """How this linear would quantise the input x2 [m, in_features] for the tuned Triton GEMM, where a kernel
        before it (int8_ops.norm_quantize, gated_quantize) may do that instead; None where it takes another path
        (the small-row GEMV, calibration, no tuned launch; a rotated input unless that kernel `rotates` it)."""
        return None if self.rotate_block and not rotates else self._plan(x2)

    def _plan(self, x2: torch.Tensor) -> InputPlan | None:
        if self.kernel not in ("int_mm", OUTLIER_KERNEL) or takes_gemv(x2):
            return None
        o = self.outliers
        if self.kernel == OUTLIER_KERNEL and (o is None or o.calibrating):
            return None
        launch = tuned_gemm(x2, self.cb)
        if launch is None:
            return None
        if self.kernel == "int_mm":
            return InputPlan(launch, None, dense=False)
        return InputPlan(launch, GuardBuffers(o.keep, o.seen, o.hits, o.threshold), dense=o.dense_path)

    def forward_quantized(self, xq: torch.Tensor, absmax: torch.Tensor, plan: InputPlan, dtype: torch.dtype,
                          x2: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The tuned GEMM over an input quantised as plan says, out in dtype; the epilogue dequantises and, on the
        dense path, adds the outlier columns' product from the input x2 (no [m, out] product written and read
        back); with residual [m, out], residual + the output."""
        dense = int8_ops.DenseColumns(x2, self.outliers.idx, self.dense) if plan.dense else None
        return int8_matmul_dequant(xq, absmax, self.cb, self.scb, self.bias, dtype, dense=dense, residual=residual,
                                   **plan.launch)

    def _forward_weight_only(self, x2: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x2.dtype)
        return F.linear(x2, KERNELS.dequantize_weight(self.cb, self.scb, x2.dtype), bias)

    def _forward_outliers(self, x2: torch.Tensor) -> torch.Tensor:
        o = self.outliers
        if o is None:
            raise RuntimeError(f"{OUTLIER_KERNEL} needs outlier columns: convert_model attaches them")
        if o.calibrating:  # exact activations while the calibration pass looks at them
            o.observe(x2)
            return self._forward_weight_only(x2)
        if takes_gemv(x2):  # every column exact here; the guard still sees the rows (it serves larger batches)
            return int8_gemv(x2, self.cb, self.scb, self.bias, GuardBuffers(o.keep, o.seen, o.hits, o.threshold))
        if not o.dense_path:  # int_mm plus the guard (the engine recaptures its graphs once a column is added)
            xq, absmax, argmax = KERNELS.quantize_argmax(x2)
            o.record(absmax, argmax)
            return KERNELS.dequantize(int_mm(xq, self.cb), absmax, self.scb, self.bias, x2.dtype)
        xq, absmax, argmax, x_dense = KERNELS.quantize_outliers(x2, o.keep, o.idx)
        o.record(absmax, argmax)
        dense = x_dense @ self.dense
        return KERNELS.dequantize_plus(int_mm(xq, self.cb), absmax, self.scb, self.bias, dense, x2.dtype)

    def attach(self, outliers: OutlierColumns, dtype: torch.dtype) -> None:
        """Gives this linear (the owner of its weights) dense rows for outliers' slots."""
        self.outliers = outliers
        self.dense = torch.zeros(outliers.capacity, self.out_features, dtype=dtype, device=self.cb.device)
        if self not in outliers.owners:
            outliers.owners.append(self)

    def fill_dense(self, slots: torch.Tensor, columns: torch.Tensor) -> None:
        cb, scb = self.host_weights or (self.cb, self.scb)
        columns = columns.to(cb.device)
        rows = (cb[:, columns].float() * scb.view(-1, 1) * _INV_127).to(self.dense.dtype).t()
        self.dense[slots] = rows.to(self.dense.device)

    def extra_repr(self) -> str:
        num = f", outlier_columns={len(self.outliers.columns)}" if self.outliers is not None else ""
        rotated = f", rotated={self.rotate_block}" if self.rotate_block else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}{num}{rotated}"

    def rotate_input(self, block: int = rotation.BLOCK) -> None:
        """Rotates the weight rows once (before calibration: the outlier columns are found on rotated inputs);
        every forward then rotates its input."""
        if self.rotate_block:
            return
        # bnb's rows dequantised, rotated, and quantised again per row as bnb quantises them
        w = rotation.rotate(dequantize_weight(self.cb, self.scb, torch.float32), block)
        absmax = w.abs().amax(dim=1).clamp_min(1e-8)
        self.cb = torch.round(w * (127.0 / absmax[:, None])).to(torch.int8)
        self.scb, self.rotate_block = absmax.to(self.scb.dtype), block


class FusedInt8Linear(Int8Linear):
    """Several projections of the same input as one int8 matrix; split_sizes says where each one's rows are."""

    def __init__(self, state: Int8State, split_sizes: list[int], kernel: str = "int_mm"):
        super().__init__(state, kernel)
        self.split_sizes = split_sizes
        self.view_modules: list[Int8Linear] = []  # the per-projection modules over its rows (plain list: not children)

    def views(self) -> list[Int8State]:
        out, start = [], 0
        for size in self.split_sizes:
            bias = None if self.bias is None else self.bias[start:start + size]
            out.append(Int8State(self.cb[start:start + size], self.scb[start:start + size], bias))
            start += size
        return out

    def attach(self, outliers: OutlierColumns, dtype: torch.dtype) -> None:
        super().attach(outliers, dtype)
        if not self.view_modules:  # small VRAM's streamed layers keep no per-projection modules
            return
        start = 0
        for view, size in zip(self.view_modules, self.split_sizes, strict=True):
            view.outliers, view.dense = outliers, self.dense[:, start:start + size]
            start += size


def _is_bnb_int8(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Linear8bitLt"


def _state_of(module: torch.nn.Module) -> Int8State:
    return module.state if isinstance(module, Int8Linear) else Int8State.from_bnb(module)


def convert_model(model: torch.nn.Module, kernel: str, *, fuse_projections: bool = True,
                  compile_kernels: bool | None = None, threshold: float = 6.0,
                  calibration_ids: torch.Tensor | None = None, calibrate: bool = True, rotate: str = "none") -> int:
    """Swaps every bnb Linear8bitLt (or Int8Linear) in model for an Int8Linear running `kernel`; returns
    how many were swapped. With fuse_projections, Llama-style layers also get self_attn.qkv_proj and
    mlp.gate_up_proj (the separate projections become views of them, so memory stays the same).
    int_mm_outliers: the columns of each input whose |x| reaches threshold while the model runs over
    calibration_ids [batch, tokens] go through dense weights (without calibration ids, only the guard finds them).
    calibrate=False leaves that to a later find_outliers call (small VRAM: once the layers stream on the device).
    rotate="down": each gated MLP's down projection rotates its input (rotation.py), where its width allows;
    "auto": down for the outlier kernel (the default's: measured closer to fp16 than LLM.int8() at its speed), else none."""
    if kernel not in _FAST_KERNELS:
        raise ValueError(f"convert_model runs {_FAST_KERNELS}, not {kernel!r}")
    if rotate not in INT8_ROTATE:
        raise ValueError(f"rotate must be one of {INT8_ROTATE}, not {rotate!r}")
    rotate = resolve_rotate(rotate, kernel)
    first = next((m for m in model.modules() if _is_bnb_int8(m) or isinstance(m, Int8Linear)), None)
    if first is None:
        return 0
    device = _state_of(first).cb.device
    compute_dtype = getattr(model, "dtype", None)  # a transformers model's: its first floating parameter's
    if compile_kernels is None:
        compile_kernels = device.type == "cuda"
    if compile_kernels:
        KERNELS.compile()
    num_swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_bnb_int8(child) or (isinstance(child, Int8Linear) and not isinstance(child, FusedInt8Linear)):
                swapped = Int8Linear(_state_of(child), kernel)
                swapped.rotate_block = getattr(child, "rotate_block", 0)
                setattr(parent, name, swapped)
                num_swapped += 1
            elif isinstance(child, FusedInt8Linear):
                child.kernel = kernel
    if rotate == "down":
        for module in model.modules():
            down = getattr(module, "down_proj", None)
            block = rotation.block_for(down.in_features) if isinstance(down, Int8Linear) else 0
            # a gated MLP: act(gate)·up feeds its down projection, whether gate and up are two linears or one
            # (Phi-3's checkpoint fuses them)
            if block and (hasattr(module, "up_proj") or hasattr(module, "gate_up_proj")):
                down.rotate_input(block)
    if fuse_projections:
        _fuse(model, kernel)
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.dtype = compute_dtype
    if kernel == OUTLIER_KERNEL and calibrate:
        find_outliers(model, threshold, calibration_ids, device)
    return num_swapped


def _owners(model: torch.nn.Module) -> list[Int8Linear]:
    """The Int8Linears that own their weights (fused ones, not their views)."""
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    views = {id(v) for m in linears if isinstance(m, FusedInt8Linear) for v in m.view_modules}
    return [m for m in linears if id(m) not in views]


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def find_outliers(model: torch.nn.Module, threshold: float, ids: torch.Tensor | None, device: torch.device) -> None:
    """Calibration: one OutlierColumns per input, its columns those that reached the threshold over ids."""
    run = None if ids is None else lambda: model(input_ids=ids.to(device), use_cache=False)
    calibrate_owners(_owners(model), threshold, device, _compute_dtype(model), run)


def calibrate_owners(owners: list[Int8Linear], threshold: float, device: torch.device, dtype: torch.dtype,
                     run: Callable[[], object] | None, *, capacity: int | None = None) -> list[OutlierColumns]:
    """One OutlierColumns per owner's input, its columns those that reached the threshold while run() ran the
    owners (None: none found, only the guard adds them). capacity: a fixed slot count (a budget counted it
    beforehand), keeping the largest columns that leave OUTLIER_SLACK free; else slots_for the columns found."""
    inputs = [OutlierColumns(m.in_features, threshold, device) for m in owners]
    for owner, o in zip(owners, inputs, strict=True):
        owner.attach(o, dtype)
    found = [[] for _ in inputs]
    if run is not None:
        for o in inputs:
            o.calibrating = True
        try:
            with torch.inference_mode():
                run()
        finally:
            for o in inputs:
                o.calibrating = False
        found = [o.calibrated_columns() for o in inputs]
        if device.type == "cuda":  # the pass's activations and dequantised weights: not the engine's to keep
            torch.cuda.empty_cache()
    for owner, o, cols in zip(owners, inputs, found, strict=True):
        if capacity is not None and len(cols) > capacity - OUTLIER_SLACK:
            log.warning("int8: %d outlier columns at an input of %d; the %d largest fit its fixed slots", len(cols),
                        o.in_features, capacity - OUTLIER_SLACK)
            cols = cols[:capacity - OUTLIER_SLACK]
        o.seen.zero_()
        o.hits.zero_()
        o.resize(capacity or slots_for(len(cols)))
        owner.attach(o, dtype)
        o.add(cols)
    return inputs


def outlier_guard(model: torch.nn.Module, threshold: float) -> OutlierGuard:
    """The guard over every outlier input of a model that convert_model gave int_mm_outliers."""
    inputs = list({id(m.outliers): m.outliers for m in _owners(model) if m.outliers is not None}.values())
    return OutlierGuard(inputs, threshold)


def _fuse_group(owner: torch.nn.Module, fused_name: str, names: list[str], kernel: str) -> None:
    fused = getattr(owner, fused_name, None)
    if isinstance(fused, FusedInt8Linear):
        fused.kernel = kernel
        for name in names:
            getattr(owner, name).kernel = kernel
        fused.view_modules = [getattr(owner, n) for n in names]  # convert_model may have made them anew
        return
    parts = [getattr(owner, n, None) for n in names]
    if not all(isinstance(p, Int8Linear) for p in parts):
        return
    states = [p.state for p in parts]
    fused = FusedInt8Linear(Int8State.concat(states), [s.cb.shape[0] for s in states], kernel)
    for p in parts:  # drop the originals before the views take their place: memory stays one copy
        p.cb = p.scb = p.bias = None
    setattr(owner, fused_name, fused)
    for name, view in zip(names, fused.views(), strict=True):
        setattr(owner, name, Int8Linear(view, kernel))
    fused.view_modules = [getattr(owner, n) for n in names]


def _gated_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaMLP.forward with gate and up as one matmul (kept as the module's forward, so hooks still run)."""
    gate, up = mlp.gate_up_proj(x).split(mlp.gate_up_proj.split_sizes, dim=-1)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def _fuse(model: torch.nn.Module, kernel: str) -> None:
    for module in model.modules():
        if all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj")):
            _fuse_group(module, "qkv_proj", ["q_proj", "k_proj", "v_proj"], kernel)
        if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            _fuse_group(module, "gate_up_proj", ["gate_proj", "up_proj"], kernel)
            if isinstance(getattr(module, "gate_up_proj", None), FusedInt8Linear):
                module.forward = partial(_gated_mlp_forward, module)


def int_mm_works(device: torch.device) -> bool:
    """Whether torch._int_mm runs here (CPU: torch >= 2.4; CUDA: int8 tensor cores, sm75+)."""
    try:
        a = torch.ones(32, 32, dtype=torch.int8, device=device)  # cuBLASLt: m > 16, n and k multiples of 8
        return bool((torch._int_mm(a, a.t()) == 32).all())
    except (RuntimeError, NotImplementedError) as exc:
        log.info("torch._int_mm unavailable on %s: %s", device, exc)
        return False


def resolve_int8_kernel(name: str, device: torch.device, threshold: float = 0.0) -> str:
    """auto: int_mm_outliers where torch._int_mm runs and threshold > 0, int_mm at threshold 0, else bnb.
    int_mm_outliers at threshold 0 is int_mm (no column is held back)."""
    if name == OUTLIER_KERNEL and threshold <= 0:
        return "int_mm"
    if name != "auto":
        return name
    if not int_mm_works(device):
        return "bnb"
    return OUTLIER_KERNEL if threshold > 0 else "int_mm"


def resolve_rotate(rotate: str, kernel: str) -> str:
    """auto: down for the outlier kernel (docs/benchmarks.md, "int8 quality"), none for the others (int_mm stays
    the threshold-0 baseline the speed bounds are measured against)."""
    if rotate != "auto":
        return rotate
    return "down" if kernel == OUTLIER_KERNEL else "none"


@dataclass
class Int8Runtime:
    """What the engine keeps of its int8 path: the kernel's name and, for int_mm_outliers, the guard that
    adds new outlier columns after a step (`poll`) and the numbers its start-up log and stats show."""

    kernel: str
    guard: OutlierGuard | None = None
    num_rotated: int = 0  # linears whose input is rotated (--int8-rotate)

    @classmethod
    def load(cls, model: torch.nn.Module, name: str, *, threshold: float, device: torch.device,
             tokenizer, rotate: str = "none") -> "Int8Runtime":
        runtime = cls.convert(model, name, threshold=threshold, device=device, rotate=rotate)
        runtime.calibrate(model, threshold=threshold, device=device, tokenizer=tokenizer)
        return runtime

    @classmethod
    def convert(cls, model: torch.nn.Module, name: str, *, threshold: float, device: torch.device,
                fuse_projections: bool = True, rotate: str = "none") -> "Int8Runtime":
        """Swaps the model's bnb linears for the kernel `name` resolves to; an outlier kernel runs only after
        calibrate. Small VRAM converts on the host, streams the layers, then calibrates on the device."""
        kernel = resolve_int8_kernel(name, device, threshold)
        if kernel != "bnb":
            convert_model(model, kernel, threshold=threshold, fuse_projections=fuse_projections,
                          compile_kernels=device.type == "cuda", calibrate=False, rotate=rotate)
        elif rotate == "down":
            raise ValueError("--int8-rotate down needs the fast int8 kernels (torch._int_mm), not bnb's")
        return cls(kernel, num_rotated=sum(isinstance(m, Int8Linear) and m.rotate_block > 0 for m in model.modules()))

    def calibrate(self, model: torch.nn.Module, *, threshold: float, device: torch.device, tokenizer) -> None:
        """The outlier kernel's columns from a pass over calibration text on `device`, and its guard; logs the kernel."""
        if self.kernel == OUTLIER_KERNEL:
            find_outliers(model, threshold, calibration_ids(tokenizer, device), device)
            self.guard = outlier_guard(model, threshold)
        self.announce(threshold)

    def announce(self, threshold: float) -> None:
        """The start-up log line that names the kernel (stats() carries the same numbers)."""
        log.info("int8 kernel: %s", self.describe(threshold))

    def poll(self, num_tokens: int) -> bool:
        """Runs the guard after a step was launched (OutlierGuard.poll: no sync on CUDA); True when an input got its
        first outlier column: its linears take the dense path from now on, so captured decode graphs (which
        skipped it) are stale."""
        return self._opens(lambda guard: guard.poll(num_tokens))

    def collect(self) -> bool:
        """The guard's pending snapshot read if the device has reached it, none queued; True as poll's."""
        return self._opens(OutlierGuard.read)

    def flush(self) -> bool:
        """The guard's pending snapshot read, waiting for the device; True as poll's."""
        return self._opens(OutlierGuard.flush)

    def restart(self) -> None:
        """The guard starts afresh (OutlierGuard.restart): what the engine's start-up ran is not judged."""
        if self.guard is not None:
            self.guard.restart()

    def _opens(self, step: Callable[[OutlierGuard], int]) -> bool:
        if self.guard is None:
            return False
        opened = self.guard.num_opened
        step(self.guard)
        return self.guard.num_opened > opened

    def describe(self, threshold: float) -> str:
        rotated = f", {self.num_rotated} down projections' inputs rotated" if self.num_rotated else ""
        if self.guard is None:
            return self.kernel + rotated
        return (f"{self.kernel} (threshold {threshold:g}: {self.guard.num_columns} outlier columns kept in the "
                f"compute dtype over {len(self.guard.inputs)} linear inputs{rotated})")

    def stats(self) -> dict[str, int | str]:
        return {"int8_kernel": self.kernel, "int8_outlier_columns": self.guard.num_columns if self.guard else 0,
                "int8_rotated_inputs": self.num_rotated}
