"""The elementwise pieces of a fast-path decoder layer, each one kernel on CUDA: RMSNorm, the residual add with
the RMSNorm after it, RoPE on q and k together (a Triton kernel of its own where it runs), and the gated MLP's
activation times up.

Eager PyTorch launches five to ten small kernels for each of them (casts, pow, mean, rsqrt, muls; rotate_half's
neg and cat), which at a few rows cost more than the int8 GEMV that reads the layer's weights: a decode step of a
7B model replays over a thousand kernels. torch.compile fuses each function into one kernel; the step's CUDA graph
holds them like any other. On CPU the same functions run eagerly, with the HF modules' arithmetic.

A norm module takes the fused kernel only where a probe shows the eager function computes exactly what the
module does (Llama-style `w * x.to(dtype)` or Gemma-style `(x * (1 + w)).to(dtype)`); anything else keeps its
own forward.
"""

import logging
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from batchgen.worker.engine.kernels import rope as rope_kernel
from batchgen.worker.engine.kernels.compiled import Compilable, compile_function

log = logging.getLogger("batchgen.engine")

NORM_KIND_ATTR = "batchgen_norm"  # set on an HF RMSNorm module that the fused kernel stands in for


@dataclass(frozen=True)
class NormKind:
    eps: float
    gemma: bool  # (1 + w) multiplied in float32, then cast (Gemma); else the cast first, then w (Llama)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """LlamaRMSNorm / GemmaRMSNorm's forward as one function."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream h + delta and its RMSNorm, in one pass."""
    h = h + delta
    return h, rms_norm(h, weight, eps, gemma)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:  # partial rotary (Phi-3's partial_rotary_factor): the rest of each head passes
        return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    return x * cos + _rotate_half(x) * sin


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


ACTIVATIONS = {"SiLU": F.silu, "SiLUActivation": F.silu, "GELUTanh": partial(F.gelu, approximate="tanh"),
               "PytorchGELUTanh": partial(F.gelu, approximate="tanh"), "GELUActivation": F.gelu}


def gated(gate_up: torch.Tensor, gate_size: int, act: str) -> torch.Tensor:
    """act(gate) * up over a fused gate_up projection's output [..., 2 * size]."""
    gate, up = gate_up.split([gate_size, gate_up.shape[-1] - gate_size], dim=-1)
    return ACTIVATIONS[act](gate) * up


def fused_functions() -> Compilable:
    """The functions the forward calls: eager, or compiled (CUDA) so each is one kernel."""
    return Compilable(rms_norm=rms_norm, add_rms_norm=add_rms_norm, rope_qk=rope_qk, gated=gated)


FUSED = fused_functions()


def norm_kind(module: torch.nn.Module) -> NormKind | None:
    """The fused norm that computes exactly what `module` does, found by running both on a probe input."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.is_meta:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(eps, float):
        return None
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(3, weight.shape[0], generator=gen) * 4).to(weight.device, weight.dtype)
    with torch.no_grad():
        try:
            want = module(probe)
        except Exception:  # noqa: BLE001
            # a module this probe cannot run keeps its own forward
            return None
        for kind in (NormKind(eps, gemma=False), NormKind(eps, gemma=True)):
            got = rms_norm(probe, weight, kind.eps, kind.gemma)
            if got.dtype == want.dtype and torch.equal(got, want):
                return kind
    return None


def _norm_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    kind: NormKind = getattr(module, NORM_KIND_ATTR)
    return FUSED.rms_norm(x, module.weight, kind.eps, kind.gemma)


def fuse_norms(modules: list[torch.nn.Module]) -> int:
    """Gives each RMSNorm among `modules` whose arithmetic the probe matches the fused forward (kept as the
    module's forward, so hooks still run); returns how many took it."""
    count = 0
    for module in modules:
        if getattr(module, NORM_KIND_ATTR, None) is not None:
            count += 1
            continue
        kind = norm_kind(module)
        if kind is None:
            continue
        setattr(module, NORM_KIND_ATTR, kind)
        module.forward = partial(_norm_forward, module)
        count += 1
    if count < len(modules):
        log.info("fused RMSNorm: %d of %d norms (the rest keep their own forward)", count, len(modules))
    return count


def activation_name(act_fn: torch.nn.Module) -> str | None:
    """The ACTIVATIONS entry that computes exactly what act_fn does (probed), or None."""
    name = type(act_fn).__name__
    if name not in ACTIVATIONS:
        return None
    probe = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad():
        return name if torch.equal(ACTIVATIONS[name](probe), act_fn(probe)) else None


GATED_ACT_ATTR = "batchgen_gated_act"  # set on an MLP that fuse_gated_mlps gave the fused activation: its name


def gated_down(mlp: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """The rest of a fused gated MLP from its gate_up_proj output: down_proj(act(gate) * up)."""
    act = getattr(mlp, GATED_ACT_ATTR)
    return mlp.down_proj(FUSED.gated(gate_up, mlp.gate_up_proj.split_sizes[0], act))


def _gated_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return gated_down(mlp, mlp.gate_up_proj(x))


def fuse_gated_mlps(modules: list[torch.nn.Module]) -> int:
    """Gives each MLP whose gate and up run as one int8 matmul (int8_linear's gate_up_proj) the fused activation."""
    count = 0
    for mlp in modules:
        split = getattr(getattr(mlp, "gate_up_proj", None), "split_sizes", None)
        act = getattr(mlp, "act_fn", None)
        if split is None or len(split) != 2 or act is None or not hasattr(mlp, "down_proj"):
            continue
        name = activation_name(act)
        if name is not None:
            setattr(mlp, GATED_ACT_ATTR, name)
            mlp.forward = partial(_gated_mlp_forward, mlp)
            count += 1
    return count


def fuse_layers(model: torch.nn.Module, *, compile_kernels: bool) -> None:
    """The fast path's model: its RMSNorms and gated MLPs take the fused functions, compiled where asked (CUDA)."""
    modules = list(model.modules())
    norms = fuse_norms([m for m in modules if type(m).__name__.endswith("RMSNorm")])
    mlps = fuse_gated_mlps([m for m in modules if hasattr(m, "gate_up_proj")])
    if compile_kernels:
        FUSED.compile()
    log.info("fused elementwise kernels: %d norms, %d gated MLPs, RoPE%s", norms, mlps,
             "" if compile_kernels else " (eager: nothing to compile on this device)")


# Stateless activation modules of generic-path models whose eager forward is a chain of elementwise ops (BLOOM's
# and GPT-2's tanh GELUs: about eight kernels each over the MLP's widest activation); PyTorch's own GELU and SiLU are
# one kernel already.
CHAINED_ACTIVATIONS = frozenset({"BloomGelu", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation"})


def fuse_activations(model: torch.nn.Module) -> int:
    """The generic path's model: each chained activation module runs its own forward compiled into one kernel
    (one compiled function per class, bound to its first instance: the modules hold no state). Returns how many."""
    compiled: dict[type, object] = {}
    count = 0
    for module in model.modules():
        if type(module).__name__ not in CHAINED_ACTIVATIONS or module._parameters or module._buffers:
            continue
        fn = compiled.get(type(module))
        if fn is None:
            fn = compiled[type(module)] = compile_function(type(module).forward.__get__(module))
        module.forward = fn
        count += 1
    if count:
        log.info("fused elementwise kernels: %d activation modules (%s) compiled", count,
                 ", ".join(sorted(t.__name__ for t in compiled)))
    return count


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k: where the fused functions are compiled (CUDA), the Triton kernel of kernels/rope.py where it
    takes the shapes (the compiled function ran at about a fifth of the copy rate), else FUSED.rope_qk."""
    if FUSED.compiled is not None and rope_kernel.fits(q, k, cos):
        return rope_kernel.rope_qk(q, k, cos, sin)
    return FUSED.rope_qk(q, k, cos, sin)


def add_norm(module: torch.nn.Module, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, module(h + delta)): one kernel where the norm is fused."""
    kind: NormKind | None = getattr(module, NORM_KIND_ATTR, None)
    if kind is None:
        h = h + delta
        return h, module(h)
    return FUSED.add_rms_norm(h, delta, module.weight, kind.eps, kind.gemma)
