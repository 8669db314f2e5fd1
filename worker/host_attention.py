"""Decode attention on the host CPU, over a KV cache kept in host memory (small-VRAM mode).

A decode step reads every row's whole cache once per layer, so on the host the cost is the bytes read
from DRAM (shared with the weight stream's DMA) and how fast the kernel turns them into math. torch's CPU
sdpa is fastest over float32 (4 bytes per element; its 16-bit paths convert first). This kernel is one
fused, compiled pass (inductor's C++ backend, OpenMP over rows × heads) that reads K and V in their storage
dtype and does the math in float32: the model's compute dtype (exact: the cache holds what the GPU
computed, half the bytes of float32) or int8 with a float32 scale per (row, head, token) (lossy, ~¼).
The mask is an additive bias, which keeps index arithmetic out of the inner loops. V is not stored
transposed although the kernel reads a transposed V ~15 % faster: writing one token's column into a
transposed cache touches a cache line per element (2.4 ms a layer for 64 rows), more than it saves.
Where torch.compile cannot build it (no C++ compiler) the same function runs eagerly: correct, slow.
"""

import logging
import types
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

HOST_KV_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")  # auto: the model's compute dtype


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


@dataclass
class Kernel:
    """decode_attention, compiled for one cache dtype and attention shape on this host when it can be.

    Warmed up with two row counts and lengths, so dynamo's automatic dynamic shapes make rows and length
    symbolic while heads and head_dim stay static (full-width vector loads): one graph serves every step.
    The second shape is also the size hint inductor plans that graph's loops with. With this tiny one (3 rows ×
    7 tokens) it runs the softmax on one thread (`omp single`); a larger one (16 × 64) spreads it over all,
    yet the kernel measured 7.5 instead of 3.95 ms a 13B layer on the H100 host (benchmarks/host_attention.py,
    variant hint16), so the tiny hint stays.
    """

    fn: object = decode_attention
    compiled: bool = False

    WARM_UP = ((2, 5), (3, 7))  # (rows, length): the first compiles a static graph, the second the dynamic one

    @classmethod
    def build(cls, kv_dtype: torch.dtype, *, num_kv_heads: int, group: int, head_dim: int,
              warm_up: tuple[tuple[int, int], ...] = WARM_UP) -> "Kernel":
        try:
            # dynamo caches graphs per code object, with a recompile limit: a copy per kernel keeps kernels of
            # other dtypes in one process (tests, benchmarks) from using up this one's
            fn = torch.compile(types.FunctionType(decode_attention.__code__.replace(), globals()), fullgraph=True)
            for rows, length in warm_up:
                fn(*sample_inputs(kv_dtype, rows, num_kv_heads, group, length, head_dim))
            return cls(fn, True)
        except Exception as exc:  # no C++ compiler, an inductor bug: the eager path computes the same thing
            log.warning("host attention runs eagerly (torch.compile failed: %s)", str(exc).splitlines()[0])
            return cls()

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
