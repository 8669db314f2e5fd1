"""Fast int8 linears over bitsandbytes' own int8 weights: the weights stay int8 in memory, only the kernel changes.

Two-method interface (gpt-fast's): `Int8State.from_bnb(module)` takes bnb's quantised state (CB: int8
[out, in], SCB: per-output-row absmax) without copying it, and `convert_model(model, kernel)` swaps every
Linear8bitLt for an `Int8Linear` that runs one of:

- "int_mm": W8A8 on the int8 tensor cores: per-token absmax quantisation of the activations, then
  `torch._int_mm(x_q, CB.T)` and out = acc · absmax · SCB / 127². This is bnb's own arithmetic at
  llm_int8_threshold=0 (bnb rounds the same way), without its outlier decomposition: activation
  columns above the threshold are quantised with the rest instead of going through fp16.
- "weight_only": out = (x @ CB.T) · SCB/127 in the compute dtype; exact in the weights, 2× the traffic.

`fuse_projections` concatenates q/k/v and gate/up of each layer into one int8 matrix (one quantisation
and one matmul instead of three or two); the per-projection modules keep working as views of it.
"""

import logging
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

log = logging.getLogger("batchgen.int8")

INT8_KERNELS = ("bnb", "int_mm", "weight_only")
_INV_127_SQ = 6.200124e-05  # bnb's constant for 1/127² (which is 6.2000124e-05): kept, so we equal bnb exactly
_CUDA_INT_MM_MIN_ROWS = 17  # cuBLASLt int8 through torch._int_mm wants more than 16 rows


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


def weight_only_scale(out: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = out * (scb * (1.0 / 127.0)).to(out.dtype)
    return out if bias is None else out + bias.to(out.dtype)


class _Kernels:
    """The small elementwise functions around the matmul; compiled on CUDA so each is one fused kernel."""

    def __init__(self) -> None:
        self.quantize, self.dequantize, self.weight_only_scale = quantize_rows, dequantize, weight_only_scale
        self.compiled = False

    def compile(self) -> None:
        if self.compiled:
            return
        self.quantize = torch.compile(quantize_rows, dynamic=True)
        self.dequantize = torch.compile(dequantize, dynamic=True)
        self.weight_only_scale = torch.compile(weight_only_scale, dynamic=True)
        self.compiled = True


KERNELS = _Kernels()


def int_mm(xq: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """int8 [m, k] @ int8 [n, k].T -> int32 [m, n]; pads tiny batches for cuBLASLt."""
    m = xq.shape[0]
    if xq.is_cuda and m < _CUDA_INT_MM_MIN_ROWS:
        xq = F.pad(xq, (0, 0, 0, _CUDA_INT_MM_MIN_ROWS - m))
        return torch._int_mm(xq, cb.t())[:m]
    return torch._int_mm(xq, cb.t())


class Int8Linear(torch.nn.Module):
    """A Linear8bitLt replacement over the same int8 tensors."""

    def __init__(self, state: Int8State, kernel: str = "int_mm"):
        super().__init__()
        if kernel not in ("int_mm", "weight_only"):
            raise ValueError(f"unknown int8 kernel {kernel!r}")
        self.register_buffer("cb", state.cb, persistent=False)
        self.register_buffer("scb", state.scb, persistent=False)
        self.register_buffer("bias", state.bias, persistent=False)
        self.kernel = kernel
        self.out_features, self.in_features = self.cb.shape

    @property
    def state(self) -> Int8State:
        return Int8State(self.cb, self.scb, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernel == "int_mm":
            xq, absmax = KERNELS.quantize(x2)
            out = KERNELS.dequantize(int_mm(xq, self.cb), absmax, self.scb, self.bias, x.dtype)
        else:
            out = KERNELS.weight_only_scale(F.linear(x2, self.cb.to(x.dtype)), self.scb, self.bias)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class FusedInt8Linear(Int8Linear):
    """Several projections of the same input as one int8 matrix; split_sizes says where each one's rows are."""

    def __init__(self, state: Int8State, split_sizes: list[int], kernel: str = "int_mm"):
        super().__init__(state, kernel)
        self.split_sizes = split_sizes

    def views(self) -> list[Int8State]:
        out, start = [], 0
        for size in self.split_sizes:
            bias = None if self.bias is None else self.bias[start:start + size]
            out.append(Int8State(self.cb[start:start + size], self.scb[start:start + size], bias))
            start += size
        return out


def _is_bnb_int8(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Linear8bitLt"


def _state_of(module: torch.nn.Module) -> Int8State:
    return module.state if isinstance(module, Int8Linear) else Int8State.from_bnb(module)


def convert_model(model: torch.nn.Module, kernel: str, *, fuse_projections: bool = True,
                  compile_kernels: bool | None = None) -> int:
    """Swaps every bnb Linear8bitLt (or Int8Linear) in model for an Int8Linear running `kernel`; returns
    how many were swapped. With fuse_projections, Llama-style layers also get self_attn.qkv_proj and
    mlp.gate_up_proj (the separate projections become views of them, so memory stays the same)."""
    if kernel not in ("int_mm", "weight_only"):
        raise ValueError(f"convert_model runs int_mm or weight_only, not {kernel!r}")
    first = next((m for m in model.modules() if _is_bnb_int8(m) or isinstance(m, Int8Linear)), None)
    if first is None:
        return 0
    device = _state_of(first).cb.device
    if compile_kernels is None:
        compile_kernels = device.type == "cuda"
    if compile_kernels:
        KERNELS.compile()
    num_swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_bnb_int8(child) or (isinstance(child, Int8Linear) and not isinstance(child, FusedInt8Linear)):
                setattr(parent, name, Int8Linear(_state_of(child), kernel))
                num_swapped += 1
            elif isinstance(child, FusedInt8Linear):
                child.kernel = kernel
    if fuse_projections:
        _fuse(model, kernel)
    return num_swapped


def _fuse_group(owner: torch.nn.Module, fused_name: str, names: list[str], kernel: str) -> None:
    fused = getattr(owner, fused_name, None)
    if isinstance(fused, FusedInt8Linear):
        fused.kernel = kernel
        for name in names:
            getattr(owner, name).kernel = kernel
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

def resolve_int8_kernel(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    return "int_mm" if int_mm_works(device) else "bnb"
