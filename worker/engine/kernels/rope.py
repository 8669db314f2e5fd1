"""RoPE on q and k in one launch: one program per token rotates every query and key head of it, reading each
half-head and the token's cos/sin row once, computing in float32 and rounding once (as the compiled
`fused.rope_qk` does), and writing q and k token-major and contiguous, the layout the prefill's attention and KV
store read. The compiled function's element-wise index math (four dimensions, broadcast cos/sin, the rotated
half's cat) ran at about a fifth of the copy rate in a 4,096-token prefill; here each program's offsets are a
token stride, a head stride and the lane. rope_store does a decode step's q the same way and writes its roped k
and its v straight into their cache slots, quantised there for an int8 cache (the rotation and the two stores as
one launch a layer).
"""

import torch
from batchgen.worker.engine.kernels.backend import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl
    from batchgen.worker.engine.kernels.int8_cvt import int8_heads, store_head_scales

    @triton.jit
    def _rotated(X, t, stride_t, stride_h, c1, c2, s1, s2, d, HEADS: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr):
        """Token t's heads of X rotated, in float32: the two halves [BLOCK_H, BLOCK_D] and where they hold a value."""
        h = tl.arange(0, BLOCK_H)[:, None]
        mask = (h < HEADS) & (d < HALF)
        src = X + t * stride_t + h * stride_h + d
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2, mask  # rotate_half: (-x2, x1)

    @triton.jit
    def _rotate(X, Out, t, out_t, stride_t, stride_h, c1, c2, s1, s2, d, HEADS: tl.constexpr, HALF: tl.constexpr,
                BLOCK_H: tl.constexpr):
        """Token t's heads of X rotated into entry out_t of Out, seen as [entries, HEADS, 2 * HALF]."""
        y1, y2, mask = _rotated(X, t, stride_t, stride_h, c1, c2, s1, s2, d, HEADS, HALF, BLOCK_H)
        h = tl.arange(0, BLOCK_H)[:, None]
        dst = Out + out_t * (HEADS * 2 * HALF) + h * (2 * HALF) + d
        tl.store(dst, y1.to(Out.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, y2.to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _cos_sin(Cos, Sin, t, stride_ct, d, HALF: tl.constexpr):
        """Token t's cos and sin halves (float32), for _rotate."""
        table = t * stride_ct + d
        c1 = tl.load(Cos + table, mask=d < HALF).to(tl.float32)
        c2 = tl.load(Cos + table + HALF, mask=d < HALF).to(tl.float32)
        s1 = tl.load(Sin + table, mask=d < HALF).to(tl.float32)
        s2 = tl.load(Sin + table + HALF, mask=d < HALF).to(tl.float32)
        return c1, c2, s1, s2

    @triton.jit
    def _rope_kernel(Q, K, Cos, Sin, QOut, KOut, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                     Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_QH: tl.constexpr,
                     BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)[None, :]
        c1, c2, s1, s2 = _cos_sin(Cos, Sin, t, stride_ct, d, HALF)
        _rotate(Q, QOut, t, t, stride_qt, stride_qh, c1, c2, s1, s2, d, Q_HEADS, HALF, BLOCK_QH)
        _rotate(K, KOut, t, t, stride_kt, stride_kh, c1, c2, s1, s2, d, K_HEADS, HALF, BLOCK_KH)

    @triton.jit
    def _rope_store_kernel(Q, K, V, Cos, Sin, QOut, KCache, VCache, Slots, KScale, VScale, stride_qt, stride_qh,
                           stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, width, stride_kb, stride_ks,
                           stride_kc, stride_vb, stride_vs, stride_vc, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr,
                           HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
                           BLOCK_D: tl.constexpr, INT8: tl.constexpr, INTERPRETED: tl.constexpr):
        """_rope_kernel's q, with k rotated straight into its cache slot and v into its own (kv_store's
        _store_kernel: an int8 cache's heads quantised on their absmax, the scales beside): one launch where a
        decode step's layer took three. A cache slot is (slot // width, slot % width) through its block and slot
        strides."""
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(Slots + t).to(tl.int64)
        d = tl.arange(0, BLOCK_D)[None, :]
        c1, c2, s1, s2 = _cos_sin(Cos, Sin, t, stride_ct, d, HALF)
        _rotate(Q, QOut, t, t, stride_qt, stride_qh, c1, c2, s1, s2, d, Q_HEADS, HALF, BLOCK_QH)
        k1, k2, mask = _rotated(K, t, stride_kt, stride_kh, c1, c2, s1, s2, d, K_HEADS, HALF, BLOCK_KH)
        k1, k2 = k1.to(K.dtype.element_ty), k2.to(K.dtype.element_ty)  # k as rope_qk hands it to the store
        h = tl.arange(0, BLOCK_KH)[:, None]
        block, at = slot // width, slot % width
        dst = KCache + block * stride_kb + at * stride_ks + h * stride_kc + d
        if INT8:  # lanes past the head count nowhere (as _store_kernel's masked ones)
            k1, k2 = tl.where(mask, k1.to(tl.float32), 0.0), tl.where(mask, k2.to(tl.float32), 0.0)
            absmax = tl.maximum(tl.max(tl.abs(k1), 1), tl.max(tl.abs(k2), 1))[:, None]
            tl.store(dst, int8_heads(k1, absmax, INTERPRETED), mask=mask)
            tl.store(dst + HALF, int8_heads(k2, absmax, INTERPRETED), mask=mask)
            store_head_scales(KScale, slot, width, h, K_HEADS, absmax)
        else:
            tl.store(dst, k1.to(KCache.dtype.element_ty), mask=mask)
            tl.store(dst + HALF, k2.to(KCache.dtype.element_ty), mask=mask)
        e = tl.arange(0, 2 * BLOCK_D)[None, :]
        mask = (h < K_HEADS) & (e < 2 * HALF)
        v = tl.load(V + t * stride_vt + h * stride_vh + e, mask=mask, other=0.0)
        dst = VCache + block * stride_vb + at * stride_vs + h * stride_vc + e
        if INT8:
            vf = v.to(tl.float32)
            absmax = tl.max(tl.abs(vf), 1)[:, None]
            tl.store(dst, int8_heads(vf, absmax, INTERPRETED), mask=mask)
            store_head_scales(VScale, slot, width, h, K_HEADS, absmax)
        else:
            tl.store(dst, v.to(VCache.dtype.element_ty), mask=mask)


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


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k_scale: torch.Tensor | None = None,
               v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A decode step's RoPE and K/V store in one launch: q [n, heads, d], k and v [n, kv_heads, d] (unit stride over
    d: views of the fused projection are fine), cos/sin [n, d] -> roped q [n, heads, d], contiguous; roped k and v
    written into k_cache/v_cache (one layer, [.., .., kv_heads, d] with unit stride over d: a heads-major pool too)
    at slots [n] (kv_store.cache_slots). The caches are q's dtype, or int8 with their per-token scales (k_scale,
    v_scale: the layer's, as kv_store.store_kv takes them). The values rope_qk and store_kv would write (a V^T pool:
    pass attention.v_written's view, then kv_store.seal_blocks)."""
    n, q_heads, head_dim = q.shape
    k_heads = k.shape[1]
    int8 = k_cache.dtype == torch.int8
    caches = (k_cache, v_cache)
    if int8:
        if any(c.dtype != torch.int8 for c in caches) or k_scale is None or v_scale is None:
            raise ValueError("rope_store writes an int8 cache with its scales, or an unquantised one of q's dtype")
    elif any(c.dtype != q.dtype for c in caches):
        raise ValueError("rope_store writes an unquantised cache of q's dtype, or an int8 one with its scales")
    if any(c.stride(-1) != 1 for c in caches):
        raise ValueError("rope_store writes a cache whose head_dim is contiguous")
    q_out = torch.empty(n, q_heads, head_dim, dtype=q.dtype, device=q.device)
    if n:
        half = head_dim // 2
        _rope_store_kernel[(n,)](
            q, k, v, cos, sin, q_out, k_cache, v_cache, slots, k_scale if int8 else k_cache,
            v_scale if int8 else v_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), cos.stride(0), k_cache.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), Q_HEADS=q_heads, K_HEADS=k_heads, HALF=half,
            BLOCK_QH=triton.next_power_of_2(q_heads), BLOCK_KH=triton.next_power_of_2(k_heads),
            BLOCK_D=triton.next_power_of_2(half), INT8=int8, INTERPRETED=interpreting())
    return q_out


def rope_qk_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic in torch: x * cos + rotate_half(x) * sin in float32, rounded once."""
    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf, c, s = x.float(), cos.float(), sin.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype).contiguous()
    return rotate(q), rotate(k)
