"""Decode attention on the host CPU, over a KV cache kept in host memory (small-VRAM mode).

A decode step reads every row's whole cache once per layer, so on the host the cost is the bytes read
from DRAM (shared with the weight stream's DMA) and how fast the kernel turns them into math. Both kernels
here read K and V in their storage dtype and do the math in float32: the model's compute dtype (exact: the
cache holds what the GPU computed) or int8 with a float32 scale per (row, head, token) (lossy, ~¼). The mask
is an additive bias. The native kernel (host_attention.cpp, built by cpp_extension at start-up) streams each
(row, head)'s K, then its V, once, without barriers, which beat decode_attention compiled by inductor and
torch's CPU sdpa (benchmarks/host_attention.py). decode_attention is the reference, the fallback where the
native kernel cannot be built (compiled by inductor; eagerly where that fails too: correct, slow), and what
tests hold the native one to. V is not stored transposed: writing one token's column into a transposed cache
touches a cache line per element, more than a faster read saves.
"""

import functools
import hashlib
import logging
import types
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)



def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k_scale: torch.Tensor | None,
                     v_scale: torch.Tensor | None, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, kv_heads, group, d] float32; keys and values [n, kv_heads, L, d] in the storage dtype; k/v_scale
    [n, kv_heads, L] float32 for int8 storage, else None; bias [n, L] float32, 0 where a row attends and -inf
    past its length. -> [n, kv_heads, group, d] float32.

    Broadcast products and sums rather than matmuls, so inductor fuses the dtype conversion into the
    reductions and no float32 copy of the cache is made (eagerly they are materialised).
    """
    s = (q[:, :, :, None, :] * keys[:, :, None].float()).sum(-1)  # [n, kv_heads, group, L]
    s = s * (k_scale[:, :, None] * scale) if k_scale is not None else s * scale
    p = torch.softmax(s + bias[:, None, None], dim=-1)
    if v_scale is not None:
        p = p * v_scale[:, :, None]
    return (p[..., None] * values[:, :, None].float()).sum(-2)


def length_bias(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[n, max_len] float32: 0 for positions < lengths[r], -inf after."""
    bias = torch.zeros(lengths.shape[0], max_len, dtype=torch.float32)
    return bias.masked_fill_(torch.arange(max_len)[None, :] >= lengths[:, None], float("-inf"))


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> int8 and a float32 scale per vector (symmetric absmax, as int8 KV caches do)."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale.squeeze(-1)


NATIVE_HEAD_DIMS = (16, 32, 64, 128, 256)  # the head_dims host_attention.cpp is instantiated for


def native_kernel():
    """torch.ops.batchgen_host.decode_attention (see native_ops), or None."""
    ops = native_ops()
    return ops.decode_attention if ops is not None else None


def native_store():
    """torch.ops.batchgen_host.store_decode (a decode step's new K/V into the host cache), or None."""
    ops = native_ops()
    return ops.store_decode if ops is not None else None


@functools.cache
def native_ops():
    """host_attention.cpp built for this host's vector ISA (as inductor picks it) and loaded, once per process:
    the torch.ops.batchgen_host namespace, or None where it cannot be built (no compiler, no headers)."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        from torch.utils.cpp_extension import load

        isa = pick_vec_isa()
        flags = ["-O3", "-fopenmp", *(f"-D{m}" for m in isa.build_macro() if m), *isa.build_arch_flags().split()]
        source = Path(__file__).with_suffix(".cpp")
        # one build directory per source and ISA: two versions of batchgen on a host must not rebuild each other's
        digest = hashlib.sha1(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:10]
        name = f"batchgen_host_attention_{'_'.join(str(isa).split()) or 'scalar'}_{digest}"
        load(name=name, sources=[str(source)],
             extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        return torch.ops.batchgen_host
    except Exception as exc:  # no compiler, missing headers, a build error: the inductor kernel serves
        log.warning("native host attention not built (%s)", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


@dataclass
class Kernel:
    """decode_attention, compiled for one cache dtype and attention shape on this host when it can be.

    Warmed up with two row counts and lengths, so dynamo's automatic dynamic shapes make rows and length
    symbolic while heads and head_dim stay static (full-width vector loads): one graph serves every step.
    The second shape is also the size hint inductor plans that graph's loops with: a larger one made the kernel
    about twice as slow (benchmarks/host_attention.py, variant hint16), so the tiny hint stays. With it inductor
    would run the softmax's passes on one thread (`omp single`: under its minimum chunk size);
    cpp.min_chunk_size = 1 keeps the same loops and spreads them over every thread (variant parallel).
    """

    fn: object = decode_attention
    compiled: bool = False
    native: bool = False  # host_attention.cpp's kernel rather than inductor's

    WARM_UP = ((2, 5), (3, 7))  # (rows, length): the first compiles a static graph, the second the dynamic one

    @classmethod
    def build(cls, kv_dtype: torch.dtype, *, num_kv_heads: int, group: int, head_dim: int,
              warm_up: tuple[tuple[int, int], ...] = WARM_UP, fn=decode_attention,
              min_chunk_size: int | None = 1, native: bool = True) -> "Kernel":
        """The native kernel where it builds and the head_dim is one it has (native=False: never), else fn
        compiled by inductor (min_chunk_size: its cpp.min_chunk_size, None its default), else fn eagerly."""
        if native and fn is decode_attention and head_dim in NATIVE_HEAD_DIMS and native_kernel() is not None:
            kernel = native_kernel()
            for rows, length in warm_up:  # a broken build fails here, not in a step
                kernel(*sample_inputs(kv_dtype, rows, num_kv_heads, group, length, head_dim))
            return cls(kernel, True, True)
        try:
            # dynamo caches graphs per code object, with a recompile limit: a copy per kernel keeps kernels of
            # other dtypes in one process (tests, benchmarks) from using up this one's
            compiled = torch.compile(types.FunctionType(fn.__code__.replace(), fn.__globals__), fullgraph=True)
            chunk = {} if min_chunk_size is None else {"cpp.min_chunk_size": min_chunk_size}
            with torch._inductor.config.patch(chunk):  # inductor compiles in these calls
                for rows, length in warm_up:
                    compiled(*sample_inputs(kv_dtype, rows, num_kv_heads, group, length, head_dim))
            return cls(compiled, True)
        except Exception as exc:  # no C++ compiler, an inductor bug: the eager path computes the same thing
            log.warning("host attention runs eagerly (torch.compile failed: %s)", str(exc).splitlines()[0])
            return cls(fn=fn)

    def __call__(self, *args) -> torch.Tensor:
        return self.fn(*args)


def sample_inputs(kv_dtype: torch.dtype, rows: int, heads: int, group: int, length: int, head_dim: int) -> tuple:
    """Random decode_attention arguments laid out as the host cache keeps them (slices of a longer buffer)."""
    f32 = torch.float32  # explicit: it may run while from_pretrained has changed the process default dtype
    q = torch.randn(rows, heads, group, head_dim, dtype=f32)
    k, v = (torch.randn(rows, heads, length + 1, head_dim, dtype=f32) for _ in range(2))
    ks = vs = None
    if kv_dtype == torch.int8:
        (k, ks), (v, vs) = quantize(k), quantize(v)
        ks, vs = ks[:, :, :length], vs[:, :, :length]
    else:
        k, v = k.to(kv_dtype), v.to(kv_dtype)
    bias = length_bias(torch.full((rows,), length), length)
    return q, k[:, :, :length], v[:, :, :length], ks, vs, bias, head_dim**-0.5


def cache_bytes(kv_dtype: torch.dtype, num_kv_heads: int, head_dim: int) -> int:
    """Host bytes of one token's K and V in one layer (int8: plus its two float32 scales per head)."""
    per_head = head_dim * torch.empty(0, dtype=kv_dtype).element_size() + (4 if kv_dtype == torch.int8 else 0)
    return 2 * num_kv_heads * per_head
