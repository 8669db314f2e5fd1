"""The only module that touches torch devices: a slot KV cache and the Llama-family forward over it.

The forward reuses the loaded HF model's submodules (embeddings, norms, the bnb Linear8bitLt
projections, the MLP, lm_head, HF's rotary embedding) and replaces only the attention bookkeeping:
K/V live in a preallocated cache [layers, rows, kv_heads, max_model_len, head_dim], one row per
running sequence. `decode_step` is a small pure function over those tensors so it can later be
CUDA-graphed or compiled; `prefill` packs newly admitted prompts into one sequence with a
block-diagonal causal mask and writes their K/V into their rows.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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

    @classmethod
    def from_hf(cls, model: torch.nn.Module) -> "LlamaParts":
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inner = model.model
        return cls(inner.embed_tokens, list(inner.layers), inner.norm, model.lm_head, inner.rotary_emb,
                   cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, inner.layers[0].self_attn.scaling)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def forward_layers(parts: LlamaParts, h: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
    """h [B, T, hidden], positions [B, T] -> normed hidden states; attend(layer, q, k, v) owns the KV cache."""
    cos, sin = parts.rotary(h, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    batch, num_tokens, _ = h.shape
    for i, layer in enumerate(parts.layers):
        x = layer.input_layernorm(h)
        attn = layer.self_attn
        q = attn.q_proj(x).view(batch, num_tokens, -1, parts.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, num_tokens, -1, parts.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, num_tokens, -1, parts.head_dim).transpose(1, 2)
        o = attend(i, _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(batch, num_tokens, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return parts.norm(h)


def decode_step(
    parts: LlamaParts,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_len: int,
) -> torch.Tensor:
    """One token for rows [0, n): input_ids/positions [n] -> logits [n, vocab].

    Row r writes its K/V at positions[r] and attends to keys [0, positions[r]] of its own cache row.
    GQA without copying K/V: the query heads sharing a KV head become that head's query "sequence".
    """
    n = input_ids.shape[0]
    rows = torch.arange(n, device=input_ids.device)
    mask = (torch.arange(kv_len, device=input_ids.device)[None, :] <= positions[:, None])[:, None, None, :]
    group = parts.num_heads // parts.num_kv_heads

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache[layer][rows, :, positions] = k[:, :, 0]
        v_cache[layer][rows, :, positions] = v[:, :, 0]
        keys, values = k_cache[layer, :n, :, :kv_len], v_cache[layer, :n, :, :kv_len]
        q = q.reshape(n, parts.num_kv_heads, group, parts.head_dim)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=parts.scaling)
        return o.reshape(n, parts.num_heads, 1, parts.head_dim)

    h = forward_layers(parts, parts.embed(input_ids[:, None]), positions[:, None], attend)
    return parts.lm_head(h[:, 0])


def prefill_step(
    parts: LlamaParts,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    seq_starts: list[int],
    rows: list[int],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """Packed prompts: input_ids/positions [T] (positions restart at 0 per prompt), seq_starts the offset of
    each prompt (plus T at the end) -> logits [num_prompts, vocab] of each prompt's last token."""
    num_tokens = input_ids.shape[0]
    segment = torch.zeros(num_tokens, dtype=torch.long, device=input_ids.device)
    for start in seq_starts[1:-1]:
        segment[start:] += 1
    causal = positions[None, :] <= positions[:, None]
    mask = (causal & (segment[None, :] == segment[:, None]))[None, None]

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for row, start, end in zip(rows, seq_starts, seq_starts[1:], strict=False):
            k_cache[layer, row, :, : end - start] = k[0, :, start:end]
            v_cache[layer, row, :, : end - start] = v[0, :, start:end]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=parts.scaling, enable_gqa=True)

    h = forward_layers(parts, parts.embed(input_ids[None]), positions[None], attend)
    last = torch.tensor(seq_starts[1:], device=input_ids.device) - 1
    return parts.lm_head(h[0, last])


def out_of_memory_error(device: torch.device) -> type[Exception]:
    return torch.cuda.OutOfMemoryError if device.type == "cuda" else torch.OutOfMemoryError


class FaultInjector:
    """Test hook (env BATCHGEN_INJECT_OOM): raises an OOM inside chosen forward calls of the real model.

    Spec "steps=3,7" fails the 3rd and 7th forward call (1-based); "p=0.1,seed=1" fails each call with
    probability 0.1. Installed as a forward pre-hook on the last decoder layer's MLP, so the error comes
    from the middle of the real forward, after earlier layers already wrote K/V.
    """

    def __init__(self, spec: str, device: torch.device):
        self.steps, self.p, seed = parse_oom_spec(spec)
        self._rng = random.Random(seed)
        self._error = out_of_memory_error(device)
        self.num_calls = 0
        self.num_injected = 0

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        self.num_calls += 1
        if self.num_calls in self.steps or (self.p > 0 and self._rng.random() < self.p):
            self.num_injected += 1
            raise self._error(f"injected OOM at forward call {self.num_calls} (BATCHGEN_INJECT_OOM)")


def parse_oom_spec(spec: str) -> tuple[set[int], float, int]:
    """"steps=3,7" / "p=0.1,seed=1" -> (steps, p, seed); a bare number continues the previous key's list."""
    values: dict[str, list[str]] = {}
    key = None
    for part in (s.strip() for s in spec.split(",") if s.strip()):
        if "=" in part:
            key, _, part = part.partition("=")
            key = key.strip()
        if key not in ("steps", "p", "seed"):
            raise ValueError(f"bad BATCHGEN_INJECT_OOM spec {spec!r}: expected steps=…, p=…, seed=…")
        values.setdefault(key, []).append(part.strip())
    steps = {int(s) for s in values.get("steps", [])}
    p = float(values.get("p", ["0"])[0])
    seed = int(values.get("seed", ["0"])[0])
    return steps, p, seed


class ModelRunner:
    """Owns the slot KV cache; runs prefill and decode for the engine."""

    def __init__(self, model: torch.nn.Module, *, device: torch.device, dtype: torch.dtype, max_model_len: int,
                 inject_oom: str | None = None):
        self.parts = LlamaParts.from_hf(model)
        self.device, self.dtype, self.max_model_len = device, dtype, max_model_len
        self.k_cache = self.v_cache = torch.empty(0)
        self.max_rows = 0
        self.fault = None
        if inject_oom:
            self.fault = FaultInjector(inject_oom, device)
            self.parts.layers[-1].mlp.register_forward_pre_hook(self.fault)

    @property
    def kv_dtype_bytes(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def allocate_kv(self, max_rows: int) -> None:
        self.k_cache = self.v_cache = torch.empty(0)
        shape = (self.parts.num_layers, max_rows, self.parts.num_kv_heads, self.max_model_len, self.parts.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.max_rows = max_rows

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        starts = [0]
        for p in prompts:
            starts.append(starts[-1] + len(p))
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(len(p)) for p in prompts]).to(self.device)
        return prefill_step(self.parts, ids, positions, starts, rows, self.k_cache, self.v_cache)

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """tokens/positions for rows [0, len(tokens)); holes carry token 0 at position 0 and are ignored."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return decode_step(self.parts, ids, pos, self.k_cache, self.v_cache, max(positions) + 1)

    def free_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def memory_info(self) -> tuple[int, int]:
        """(used, free) bytes on the GPU; (0, 0) on CPU."""
        if self.device.type != "cuda":
            return 0, 0
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free, free

    def measure_cuda(self, *, num_probe_rows: int, prefill_tokens: int) -> tuple[int, int]:
        """Warm-up at the worst case: (prefill peak bytes, decode activation bytes per row) from the
        allocator's peak, with a small probe KV cache that is freed again."""
        probe_rows = max(1, num_probe_rows)
        self.allocate_kv(probe_rows)
        tokens = min(prefill_tokens, self.max_model_len)
        # Once unmeasured: the first calls also allocate library workspaces (cuBLAS) that stay for good.
        self.prefill([0], [[0] * 8])
        self.decode([0] * probe_rows, [8] * probe_rows)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.prefill([0], [[0] * tokens])
        torch.cuda.synchronize(self.device)
        prefill_bytes = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.reset_peak_memory_stats(self.device)
        self.decode([0] * probe_rows, [self.max_model_len - 1] * probe_rows)
        torch.cuda.synchronize(self.device)
        decode_bytes = torch.cuda.max_memory_allocated(self.device) - base
        self.allocate_kv(0)
        torch.cuda.empty_cache()
        return prefill_bytes, -(-decode_bytes // probe_rows)
