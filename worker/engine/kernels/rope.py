"""RoPE on q and k in one launch: one program per token rotates every query and key head of it, reading each
half-head and the token's cos/sin row once, computing in float32 and rounding once (as the compiled
`fused.rope_qk` does), and writing q and k token-major and contiguous, the layout the prefill's attention and KV
store read. The compiled function's element-wise index math (four dimensions, broadcast cos/sin, the rotated
half's cat) ran at about a fifth of the copy rate in a 4,096-token prefill; here each program's offsets are a
token stride, a head stride and the lane.
"""

import torch
from batchgen.worker.engine.kernels.backend import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate(X, Out, t, stride_t, stride_h, c1, c2, s1, s2, d, HEADS: tl.constexpr, HALF: tl.constexpr,
                BLOCK_H: tl.constexpr):
        h = tl.arange(0, BLOCK_H)[:, None]
        mask = (h < HEADS) & (d < HALF)
        src = X + t * stride_t + h * stride_h + d
        x1 = tl.load(src, mask=mask).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask).to(tl.float32)
        dst = Out + t * (HEADS * 2 * HALF) + h * (2 * HALF) + d
        tl.store(dst, (x1 * c1 - x2 * s1).to(Out.dtype.element_ty), mask=mask)  # rotate_half: (-x2, x1)
        tl.store(dst + HALF, (x2 * c2 + x1 * s2).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(Q, K, Cos, Sin, QOut, KOut, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                     Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_QH: tl.constexpr,
                     BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)[None, :]
        table = t * stride_ct + d
        c1 = tl.load(Cos + table, mask=d < HALF).to(tl.float32)
        c2 = tl.load(Cos + table + HALF, mask=d < HALF).to(tl.float32)
        s1 = tl.load(Sin + table, mask=d < HALF).to(tl.float32)
        s2 = tl.load(Sin + table + HALF, mask=d < HALF).to(tl.float32)
        _rotate(Q, QOut, t, stride_qt, stride_qh, c1, c2, s1, s2, d, Q_HEADS, HALF, BLOCK_QH)
        _rotate(K, KOut, t, stride_kt, stride_kh, c1, c2, s1, s2, d, K_HEADS, HALF, BLOCK_KH)


def _tokens(x: torch.Tensor) -> torch.Tensor | None:
    """x [B, T, heads, head_dim] as [B*T, heads, head_dim] without a copy, or None where its strides do not allow."""
    if x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.shape[-2], x.shape[-1])
    except RuntimeError:
        return None


def fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether rope_qk takes these: a CUDA tensor, whole-head rotary (not Phi-3's partial one), an even head size
    and token-major views it can walk with two strides."""
    head_dim = q.shape[-1]
    return (HAS_TRITON and q.is_cuda and cos.shape[-1] == head_dim == k.shape[-1] and head_dim % 2 == 0
            and _tokens(q) is not None and _tokens(k) is not None)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, heads, d], k [B, T, kv_heads, d] (views of a fused projection are fine), cos/sin broadcasting as
    [B, T, 1, d] -> roped q, k, contiguous in the same shapes. Check `fits` first."""
    batch, num_tokens, q_heads, head_dim = q.shape
    k_heads = k.shape[2]
    qt, kt = _tokens(q), _tokens(k)
    cos = cos.expand(batch, num_tokens, 1, head_dim).reshape(-1, head_dim)
    sin = sin.expand(batch, num_tokens, 1, head_dim).reshape(-1, head_dim)
    q_out = torch.empty(batch, num_tokens, q_heads, head_dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(batch, num_tokens, k_heads, head_dim, dtype=k.dtype, device=k.device)
    if qt.shape[0]:
        half = head_dim // 2
        _rope_kernel[(qt.shape[0],)](qt, kt, cos, sin, q_out, k_out, qt.stride(0), qt.stride(1), kt.stride(0),
                                     kt.stride(1), cos.stride(0), Q_HEADS=q_heads, K_HEADS=k_heads, HALF=half,
                                     BLOCK_QH=triton.next_power_of_2(q_heads),
                                     BLOCK_KH=triton.next_power_of_2(k_heads), BLOCK_D=triton.next_power_of_2(half))
    return q_out, k_out


def rope_qk_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic in torch: x * cos + rotate_half(x) * sin in float32, rounded once."""
    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf, c, s = x.float(), cos.float(), sin.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype).contiguous()
    return rotate(q), rotate(k)
