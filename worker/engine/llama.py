"""The functional Llama-family forward over a KV cache: slots [layers, rows, max_model_len, kv_heads, head_dim], or
blocks [layers, num_blocks, block_size, kv_heads, head_dim] that a block table [rows, max_blocks] maps each
row's positions to (token t of row r: block block_table[r, t // block_size], slot t % block_size).

It reuses the loaded HF model's submodules (embeddings, norms, the int8 projections, the MLP, lm_head, rotary)
and replaces only the attention bookkeeping: `decode_step` is a pure function over the cache tensors (so a CUDA
graph can hold it); `prefill_step` packs prompts into one sequence (FlashAttention varlen on the GPU, a
block-diagonal causal mask elsewhere) and hands each layer's K/V to a store. The families that join this path
(Qwen3, Gemma, Gemma2, Phi-3, windowed Mistral) differ from Llama only by a FamilySpec, which this one forward
reads: q/k norms, post norms, soft-capping, sliding-window layers.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from batchgen.worker.engine.families import FamilySpec
from batchgen.worker.engine.fused import GATED_ACT_ATTR, add_norm, rope
from batchgen.worker.engine.gated_linear import gated_linear
from batchgen.worker.engine.host_copy import to_device
from batchgen.worker.engine.kernels.attention import decode_attention, num_kv_splits, v_transposed, v_written
from batchgen.worker.engine.kernels.backend import HAS_TRITON, interpreting
from batchgen.worker.engine.kernels.kv_store import cache_slots, seal_blocks, store_kv
from batchgen.worker.engine.kernels.rope import rope_store
from batchgen.worker.engine.norm_linear import hooked, norm_linear

PREFILL_FLASH = ("flash", "triton")  # attentions whose prefill is FlashAttention varlen ("triton" decodes in Triton)
# A decode step's RoPE and K/V store as one launch (rope.rope_store): None on CUDA, True also under Triton's
# interpreter (the CPU tests), False never
ROPE_STORE: bool | None = None


@dataclass
class LlamaParts:
    """The HF submodules the forward needs, plus the attention shape."""

    embed: torch.nn.Module
    layers: list[torch.nn.Module]
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    rotary: torch.nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    # Small-VRAM mode (layer_stream.LayerStreamer): iter_layers() yields each decoder layer with its weights on the device.
    layer_executor: object | None = None
    spec: FamilySpec = field(default_factory=FamilySpec)

    @classmethod
    def from_hf(cls, model: torch.nn.Module) -> "LlamaParts":
        cfg = model.config
        head_dim = head_dim_of(cfg)
        inner = model.model
        return cls(inner.embed_tokens, list(inner.layers), inner.norm, model.lm_head, inner.rotary_emb,
                   cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, inner.layers[0].self_attn.scaling,
                   spec=FamilySpec.of(cfg))

    @property
    def qkv_sizes(self) -> list[int]:
        """Where q, k and v sit in a fused qkv_proj's output (int8_linear's, or Phi-3's own checkpoint weight)."""
        return [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def head_dim_of(config) -> int:
    """A Llama-family HF config's head size (explicit head_dim where the model sets one)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
KVStore = Callable[[int, slice, torch.Tensor, torch.Tensor], None]  # (layer, tokens, k/v [t, kv_heads, d])


def forward_layers(parts: LlamaParts, h: torch.Tensor, positions: torch.Tensor,
                   groups: list[tuple[slice, Attend]]) -> torch.Tensor:
    """h [B, T, hidden], positions [B, T] -> normed hidden states. groups: (tokens, attend) pairs that run one
    after the other inside each layer, attend(layer, q, k, v) owning the KV cache: a long prefill in pieces
    that each fit the activation budget while each layer's weights are loaded once. A single group covers
    every token."""
    cos, sin = rope_tables(parts, h, positions)
    layers = parts.layers if parts.layer_executor is None else parts.layer_executor.iter_layers()
    spec = parts.spec
    # an attend that ropes q and k itself (CacheAttention.take_rope: with its K/V store) gets them unroped
    rope = not (len(groups) == 1 and getattr(groups[0][1], "take_rope", lambda c, s: False)(cos, sin))
    for i, layer in enumerate(layers):
        if len(groups) == 1:
            h = layer_output(layer, h, groups[0][1](i, *attention_inputs(parts, layer, h, cos, sin, rope)), spec)
            continue
        for tokens, attend in groups:
            part = h[:, tokens]
            c, s = cos[:, tokens], sin[:, tokens]
            h[:, tokens] = layer_output(layer, part, attend(i, *attention_inputs(parts, layer, part, c, s)), spec)
    return parts.norm(h)


def logits_of(parts: LlamaParts, h: torch.Tensor) -> torch.Tensor:
    """lm_head over normed hidden states, soft-capped where the family caps its logits (Gemma2)."""
    logits = parts.lm_head(h)
    cap = parts.spec.final_softcap
    return logits if cap is None else torch.tanh(logits / cap) * cap


def rope_tables(parts: LlamaParts, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, 1, head_dim] for h [B, T, hidden] at positions [B, T]."""
    cos, sin = parts.rotary(h, positions)
    return cos.unsqueeze(2), sin.unsqueeze(2)


def attention_inputs(parts: LlamaParts, layer: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, rope_qk: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoder layer up to its attention: h [B, T, hidden] -> q [B, heads, T, d], k/v [B, kv_heads, T, d], roped
    (rope_qk=False: not roped, for an attend that ropes them itself)."""
    batch, num_tokens, _ = h.shape
    attn = layer.self_attn
    qkv_proj = getattr(attn, "qkv_proj", None)  # int8_linear's fused q/k/v, or the checkpoint's own (Phi-3)
    if qkv_proj is not None:  # the norm and the projection's input quantisation one kernel where they can be
        q, k, v = norm_linear(layer.input_layernorm, qkv_proj, h)[1].split(parts.qkv_sizes, dim=-1)
    else:
        x = layer.input_layernorm(h)
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q, k, v = (t.view(batch, num_tokens, -1, parts.head_dim) for t in (q, k, v))
    if parts.spec.qk_norm:  # per head, before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    # roped token-major: the rotated q and k come out [B, T, heads, d], as the prefill's attention and KV store
    # read them, so neither is copied again to that layout
    if rope_qk:
        q, k = rope(q, k, cos, sin)
    return tuple(t.transpose(1, 2) for t in (q, k, v))


def layer_output(layer: torch.nn.Module, h: torch.Tensor, o: torch.Tensor,
                 spec: FamilySpec | None = None) -> torch.Tensor:
    """The rest of a decoder layer, from its attention output o [B, heads, T, d]: the new residual stream."""
    batch, num_tokens, _ = h.shape
    attended = layer.self_attn.o_proj(o.transpose(1, 2).reshape(batch, num_tokens, -1))
    if spec is not None and spec.post_norms:  # Gemma2: post_attention_layernorm acts on the attention output
        h = h + layer.post_attention_layernorm(attended)
        return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
    mlp = layer.mlp
    if getattr(mlp, GATED_ACT_ATTR, None) is not None and not hooked(mlp):  # add, norm and quantisation in one
        h, gate_up = norm_linear(layer.post_attention_layernorm, mlp.gate_up_proj, h, attended)
        return gated_linear(mlp, gate_up, h)
    h, x = add_norm(layer.post_attention_layernorm, h, attended)
    return h + mlp(x)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, scale: float,
                     softcap: float | None = None) -> torch.Tensor:
    """Attention with a boolean mask over heads that line up (q's heads grouped per KV head, or equal counts).
    Soft-capping is not in SDPA: then HF's eager math (scores capped before the mask, softmax in float32)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy where its last dimension is strided (FlashAttention reads any row and head stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, max_q: int, max_k: int, *, causal: bool, scale: float,
                 seqused_k: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """FlashAttention-2 over packed sequences (q [Tq, H, D], k/v [Tk, Hkv, D], int32 offsets); with seqused_k
    only the first seqused_k[i] keys of sequence i are read: decode reads each row's own length, no padding.
    window: each query attends to the last `window` keys up to its own position (itself included)."""
    left, right = (None, None) if window is None else (window - 1, 0)
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, 0.0, causal,
                                                   False, scale=scale, seqused_k=seqused_k, window_size_left=left,
                                                   window_size_right=right)[0]


def decode_step(
    parts: LlamaParts,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_len: int,
    attention: str = "sdpa",
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token for rows [0, n): input_ids/positions [n] -> logits [n, vocab].

    Row r writes its K/V at positions[r] and attends to keys [0, positions[r]] of its own cache row
    (cache [layers, rows, max_model_len, kv_heads, head_dim]); a sliding layer only to its last window keys.
    "flash": FlashAttention varlen reading positions[r] + 1 keys per row; "triton": the split-KV Triton kernel
    (kernels/attention.py) reading the same keys (flash where the model has a window: the kernel has none);
    "sdpa": masked attention over keys [0, kv_len) (GQA without copying K/V: the query heads sharing a KV head
    become that head's query "sequence"). Soft-capped attention (Gemma2) always takes the masked path:
    FlashAttention here has no soft-cap.
    A float8_e4m3fn cache holds K/V divided by k_scale/v_scale [layers, kv_heads] (kv_scales); an int8 cache
    holds them quantised per token and KV head, k_scale/v_scale [layers, rows or blocks, kv_heads, tokens] their
    scales: "triton" reads either as it is, "sdpa" dequantises the slice it reads; "flash" reads neither (a
    windowed model decodes them with "sdpa").
    block_table [rows, max_blocks] int32: a paged cache (see the module docstring); "triton" reads it in the
    kernel, "sdpa" gathers each row's blocks; "flash" wants each row contiguous (decode_path says which runs).
    """
    return decode_logits(parts, input_ids, positions,
                         CacheAttention(parts, k_cache, v_cache, positions, kv_len, attention, k_scale, v_scale,
                                        block_table))


def decode_path(spec: FamilySpec, attention: str, quantised: bool) -> str:
    """The attention a decode step really runs: soft-capping only in the masked path; the Triton kernel has no
    sliding window (a windowed model decodes with flash, or sdpa where the cache is fp8 or int8)."""
    if spec.attn_softcap is not None:
        return "sdpa"
    if attention == "triton" and spec.window is not None:
        return "sdpa" if quantised else "flash"
    return attention


def gather_rows(cache: torch.Tensor, block_table: torch.Tensor | None, n: int, num_tokens: int) -> torch.Tensor:
    """One layer's cache as rows [n, num_tokens, kv_heads, head_dim]: a slice of a slot cache, or each row's
    first blocks side by side (a copy) from a paged one."""
    if block_table is None:
        return cache[:n, :num_tokens]
    num_blocks = -(-num_tokens // cache.shape[1])
    return cache[block_table[:n, :num_blocks].long()].flatten(1, 2)[:, :num_tokens]


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.float8_e4m3fn


def is_quantised(cache: torch.Tensor) -> bool:
    """An fp8 or int8 cache: FlashAttention reads neither."""
    return cache.dtype in (torch.float8_e4m3fn, torch.int8)


def from_cache(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A slice [..., kv_heads, head_dim] read from the cache in the compute dtype, dequantised where it is fp8
    (scale [kv_heads]) or int8 (scale [..., kv_heads]: the slice's own tokens' scales, gather_scales)."""
    if x.dtype == torch.int8:
        return (x.float() * scale[..., None]).to(dtype)
    if not is_fp8(x):
        return x
    return (x.float() * scale.to(x.device, torch.float32)[:, None]).to(dtype)


def gather_scales(scale: torch.Tensor, block_table: torch.Tensor | None, n: int, num_tokens: int) -> torch.Tensor:
    """An int8 cache layer's per-token scales [rows or blocks, kv_heads, tokens] as gather_rows reads its
    values: [n, num_tokens, kv_heads]."""
    return gather_rows(scale.transpose(1, 2), block_table, n, num_tokens)


class CacheAttention:
    """decode_step's Attend over a device cache (slots [layers, rows, max_len, kv_heads, head_dim], or blocks with
    a block table): row r writes its new K/V at positions[r] and attends to keys [0, positions[r]] of its own row
    (a sliding layer: the last window of them). The per-step index tensors are made once here, not per layer;
    only device ops, so a CUDA graph can hold it (a block table is read where it is, updated in place)."""

    def __init__(self, parts: LlamaParts, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                 kv_len: int, attention: str, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None, block_table: torch.Tensor | None = None):
        n, device = positions.shape[0], positions.device
        self.parts, self.k_cache, self.v_cache, self.positions = parts, k_cache, v_cache, positions
        # an fp8 cache's [layers, kv_heads]; an int8 cache's per token, [layers, rows or blocks, kv_heads, tokens]
        self.k_scale, self.v_scale = k_scale, v_scale
        self.kv_len, self.block_table = kv_len, block_table
        self.cos = self.sin = None  # take_rope's tables: q and k come unroped, rope_store ropes and stores them
        quantised = is_quantised(k_cache) or is_quantised(v_cache)  # fp8v: V only
        if quantised and attention == "flash":
            raise ValueError("FlashAttention reads no fp8 or int8 KV cache: decode it with triton or sdpa")
        self.attention = decode_path(parts.spec, attention, quantised)
        if block_table is not None and self.attention == "flash":
            raise ValueError("FlashAttention decodes rows that are contiguous: no paged KV cache")
        # V^T in each block: its store seals the blocks it fills (kv_store.seal_blocks)
        self.v_apart = v_cache.dim() == 5 and v_transposed(v_cache)
        if self.v_apart and self.attention != "triton":  # partial blocks as written: _vt_kernel's alone
            raise ValueError("a V cache transposed in each block decodes through the Triton kernel only")
        # where row r's new K/V go: its slot, or its block's
        self.write_at = cache_slots(k_cache[0], torch.arange(n, device=device), positions, block_table)
        max_len = k_cache.shape[2] * (1 if block_table is None else block_table.shape[1])
        if self.attention in PREFILL_FLASH:  # both read each row's own length
            self.used = (positions + 1).to(torch.int32)
        if self.attention == "flash":
            self.cu_q = torch.arange(n + 1, device=device, dtype=torch.int32)
            self.cu_k = self.cu_q * k_cache.shape[2]
        elif self.attention == "triton":
            self.splits = num_kv_splits(max_len, n, parts.num_kv_heads)  # from shapes: fixed per graph
        else:
            keys = torch.arange(kv_len, device=device)[None, :]
            self.mask = (keys <= positions[:, None])[:, None, None, :]
            if parts.spec.window is not None:
                self.window_mask = self.mask & (keys > positions[:, None] - parts.spec.window)[:, None, None, :]

    def take_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Whether this step ropes q and k itself, in one launch with the K/V store (kernels/rope.rope_store): on
        CUDA (or with ROPE_STORE forced), an unquantised cache of q's dtype or an int8 one with its per-token
        scales, whole-head rotary. cos/sin [n, 1, 1, head_dim] as rope_tables gives them for a decode step."""
        head_dim = self.parts.head_dim
        dtypes = {self.k_cache.dtype, self.v_cache.dtype}
        int8 = dtypes == {torch.int8} and self.k_scale is not None and self.k_scale.dim() == 4
        if (ROPE_STORE is False or not HAS_TRITON or not (cos.is_cuda or (ROPE_STORE and interpreting()))
                or not (int8 or dtypes == {cos.dtype})
                or cos.shape[-1] != head_dim or head_dim % 2 or cos.numel() != self.positions.shape[0] * head_dim):
            return False
        self.cos, self.sin = cos.reshape(-1, head_dim), sin.reshape(-1, head_dim)
        return True

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p, n = self.parts, q.shape[0]
        window = p.spec.window_of(layer)
        k_scale = None if self.k_scale is None else self.k_scale[layer]
        v_scale = None if self.v_scale is None else self.v_scale[layer]
        if self.cos is not None:  # q and k came unroped (take_rope)
            # a V^T pool takes V in runs (v_written), then the blocks it filled sealed into V^T (kv_store.store_kv's
            # two steps, the first in this launch)
            v_cache = v_written(self.v_cache[layer]) if self.v_apart else self.v_cache[layer]
            q = rope_store(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.cos, self.sin, self.k_cache[layer], v_cache,
                           self.write_at, k_scale, v_scale)[:, :, None]
            if self.v_apart:
                seal_blocks(self.v_cache[layer], self.write_at, True)
        else:
            store_kv(self.k_cache[layer], self.write_at, k[:, :, 0], k_scale)
            store_kv(self.v_cache[layer], self.write_at, v[:, :, 0], v_scale)
        if self.attention == "flash":
            keys = self.k_cache[layer].view(-1, p.num_kv_heads, p.head_dim)
            values = self.v_cache[layer].view(-1, p.num_kv_heads, p.head_dim)
            o = flash_varlen(q[:, :, 0], keys, values, self.cu_q, self.cu_k, 1, self.kv_len, causal=False,
                             scale=p.scaling, seqused_k=self.used, window=window)
            return o[:, :, None]
        if self.attention == "triton":
            o = decode_attention(q[:, :, 0], self.k_cache[layer], self.v_cache[layer], self.used, p.scaling,
                                 k_scale=k_scale, v_scale=v_scale, block_table=self.block_table,
                                 num_splits=self.splits)
            return o[:, :, None]
        keys = gather_rows(self.k_cache[layer], self.block_table, n, self.kv_len)
        values = gather_rows(self.v_cache[layer], self.block_table, n, self.kv_len)
        if keys.dtype == torch.int8:
            k_scale = gather_scales(k_scale, self.block_table, n, self.kv_len)
            v_scale = gather_scales(v_scale, self.block_table, n, self.kv_len)
        keys = from_cache(keys, k_scale, q.dtype).transpose(1, 2)
        values = from_cache(values, v_scale, q.dtype).transpose(1, 2)
        q = q.reshape(n, p.num_kv_heads, p.num_heads // p.num_kv_heads, p.head_dim)
        o = masked_attention(q, keys, values, self.mask if window is None else self.window_mask, scale=p.scaling,
                             softcap=p.spec.attn_softcap)
        return o.reshape(n, p.num_heads, 1, p.head_dim)


def decode_logits(parts: LlamaParts, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
    """One new token per row through every layer and lm_head; attend(layer, q, k, v) owns the KV cache."""
    h = forward_layers(parts, parts.embed(input_ids[:, None]), positions[:, None], [(slice(None), attend)])
    return logits_of(parts, h[:, 0])


def cache_store(k_cache: torch.Tensor, v_cache: torch.Tensor, token_rows: torch.Tensor,
                positions: torch.Tensor, k_scale: torch.Tensor | None = None,
                v_scale: torch.Tensor | None = None, block_table: torch.Tensor | None = None) -> KVStore:
    """Prefill's K/V writes into a [layers, rows, max_len, kv_heads, head_dim] cache: token t of the packed
    prompts goes to row token_rows[t], position positions[t]; an fp8 cache's by its scales [layers, kv_heads], an
    int8 cache's quantised per token with its scales written into k_scale/v_scale.
    With a block table the cache is [layers, num_blocks, block_size, kv_heads, head_dim] and the row's block
    for that position takes it."""
    slots = cache_slots(k_cache[0], token_rows, positions, block_table)

    def store(layer: int, tokens: slice, k: torch.Tensor, v: torch.Tensor) -> None:
        k_layer = None if k_scale is None else k_scale[layer]
        v_layer = None if v_scale is None else v_scale[layer]
        store_kv(k_cache[layer], slots[tokens], k, k_layer)
        store_kv(v_cache[layer], slots[tokens], v, v_layer)
    return store


def prompt_groups(seq_starts: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive prompts in groups of at most max_tokens tokens (a longer prompt alone): (first, end) indices."""
    groups, first = [], 0
    for end in range(1, len(seq_starts)):
        if end - 1 > first and seq_starts[end] - seq_starts[first] > max_tokens:
            groups.append((first, end - 1))
            first = end - 1
    return groups + [(first, len(seq_starts) - 1)]


def prefill_step(
    parts: LlamaParts,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    seq_starts: list[int],
    store: KVStore,
    attention: str = "sdpa",
    group_tokens: int | None = None,
) -> torch.Tensor:
    """Packed prompts: input_ids/positions [T] (positions restart at 0 per prompt), seq_starts the offset of
    each prompt (plus T at the end) -> logits [num_prompts, vocab] of each prompt's last token. store writes
    each layer's K/V; group_tokens: run each layer over groups of whole prompts of at most that many tokens."""
    groups = _prompt_groups(parts, positions, seq_starts, store, attention, group_tokens or input_ids.shape[0])
    # each prompt's last token, staged before the layers run (small VRAM: the host has work to do meanwhile)
    last = to_device(seq_starts[1:], input_ids.device) - 1
    h = forward_layers(parts, parts.embed(input_ids[None]), positions[None], groups)
    return logits_of(parts, h[0, last])


def _prompt_groups(parts: LlamaParts, positions: torch.Tensor, seq_starts: list[int], store: KVStore, attention: str,
                   group_tokens: int, offset: int = 0) -> list[tuple[slice, Attend]]:
    """forward_layers' groups for packed prompts (their tokens from offset on in the forward's sequence)."""
    groups = []
    for first, end in prompt_groups(seq_starts, group_tokens):
        tokens = slice(seq_starts[first], seq_starts[end])
        starts = [s - seq_starts[first] for s in seq_starts[first:end + 1]]
        attend = _prefill_attention(parts, positions[tokens], starts, tokens, store, attention)
        groups.append((slice(offset + tokens.start, offset + tokens.stop), attend))
    return groups


def _prefill_attention(parts: LlamaParts, positions: torch.Tensor, seq_starts: list[int], tokens: slice,
                       store: KVStore, attention: str) -> Attend:
    """Causal attention within each of a group's packed prompts (positions/seq_starts: the group's own); a
    sliding layer's queries see only the last window positions of their prompt."""
    num_tokens, device = positions.shape[0], positions.device
    spec = parts.spec
    lengths = [end - start for start, end in zip(seq_starts, seq_starts[1:], strict=False)]
    if spec.attn_softcap is not None:
        attention = "sdpa"
    flash = attention in PREFILL_FLASH and positions.is_cuda  # off CUDA (Triton's interpreter decoding) sdpa prefills
    if flash:
        cu = to_device(seq_starts, device, torch.int32)
        max_len = max(lengths)
    else:
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                          to_device(lengths, device), output_size=num_tokens)
        causal = positions[None, :] <= positions[:, None]
        mask = (causal & (segment[None, :] == segment[:, None]))[None, None]
        if spec.window is not None:
            window_mask = mask & (positions[None, :] > positions[:, None] - spec.window)[None, None]

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_tokens, v_tokens = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [T, kv_heads, head_dim]
        store(layer, tokens, k_tokens, v_tokens)
        window = spec.window_of(layer)
        if flash:
            # FlashAttention wants unit stride over head_dim only: v stays a view of the fused q/k/v output
            o = flash_varlen(*(unit_last(t) for t in (q[0].transpose(0, 1), k_tokens, v_tokens)), cu, cu,
                             max_len, max_len, causal=True, scale=parts.scaling, window=window)
            return o.transpose(0, 1)[None]
        layer_mask = mask if window is None else window_mask
        if spec.attn_softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=layer_mask, scale=parts.scaling, enable_gqa=True)
        group = parts.num_heads // parts.num_kv_heads
        return masked_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), layer_mask,
                                scale=parts.scaling, softcap=spec.attn_softcap)

    return attend


def mixed_step(
    parts: LlamaParts,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    num_decode: int,
    decode: Attend,
    seq_starts: list[int],
    store: KVStore,
    attention: str = "sdpa",
    group_tokens: int | None = None,
) -> torch.Tensor:
    """Decode rows and packed prompts in one forward: input_ids/positions [n + T], the first n one new token for
    each of rows [0, n) (decode(layer, q, k, v) owns their cache, as in decode_step), the rest packed prompts
    (seq_starts relative to them, store writing their K/V, as in prefill_step). Without group_tokens each layer's
    projections run once over all n + T tokens, so the rows ride on the prefill's weight reads, and only attention
    is split; with it (small VRAM), the rows are one more group, within the same streamed layer.
    -> logits [n + num_prompts, vocab]: each row's, then each prompt's last token's."""
    n = num_decode
    rows = _rows_attention(decode)  # first in each layer: a hole's write at its position 0 is overwritten by a
    # prompt admitted into that row
    if group_tokens is None:
        prompts = _prefill_attention(parts, positions[n:], seq_starts, slice(0, input_ids.shape[0] - n), store,
                                     attention)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.cat([rows(layer, q[:, :, :n], k[:, :, :n], v[:, :, :n]),
                              prompts(layer, q[:, :, n:], k[:, :, n:], v[:, :, n:])], dim=2)

        groups = [(slice(None), attend)]
    else:
        groups = [(slice(0, n), rows)] + _prompt_groups(parts, positions[n:], seq_starts, store, attention,
                                                        group_tokens, offset=n)
    last = torch.tensor([n + s - 1 for s in seq_starts[1:]], device=input_ids.device)
    h = forward_layers(parts, parts.embed(input_ids[None]), positions[None], groups)
    return logits_of(parts, torch.cat([h[0, :n], h[0, last]]))


def _rows_attention(decode: Attend) -> Attend:
    """decode's Attend (q [rows, heads, 1, d]) over tokens packed as one sequence (q [1, heads, rows, d])."""
    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o = decode(layer, *(t[0].transpose(0, 1).unsqueeze(2) for t in (q, k, v)))  # [rows, heads, 1, d]
        return o[:, :, 0].transpose(0, 1).unsqueeze(0)
    return attend


def flash_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether FlashAttention varlen with seqused_k runs here and agrees with plain attention."""
    try:
        q = torch.randn(3, 4, 64, device=device, dtype=dtype)
        kv = torch.randn(2 * 8, 2, 64, device=device, dtype=dtype)
        cu_q = torch.tensor([0, 1, 3], device=device, dtype=torch.int32)
        cu_k = torch.tensor([0, 8, 16], device=device, dtype=torch.int32)
        used = torch.tensor([5, 8], device=device, dtype=torch.int32)
        out = flash_varlen(q, kv, kv, cu_q, cu_k, 2, 8, causal=True, scale=0.125, seqused_k=used)
        ref = F.scaled_dot_product_attention(q[:1].transpose(0, 1)[None], kv[None, :5].transpose(1, 2).repeat_interleave(2, 1),
                                             kv[None, :5].transpose(1, 2).repeat_interleave(2, 1), scale=0.125)
        return bool(torch.allclose(out[:1], ref[0].transpose(0, 1), atol=2e-2))
    except (RuntimeError, NotImplementedError):
        return False
