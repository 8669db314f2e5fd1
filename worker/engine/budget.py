"""How many KV-cache rows fit: pure arithmetic on numbers the model runner measures (CUDA) or estimates (CPU).

A row holds one sequence of up to max_model_len tokens. Memory = weights (already loaded) + one
prefill peak (fixed: prefill runs one packed batch of at most max_prefill_tokens) + per row
(KV for max_model_len tokens + decode activations) + a reserve for the allocator and other processes.

A paged cache (plan_paged) splits the same memory between row slots (decode activations) and KV blocks that
rows hold by the tokens they can really reach, so rows are sized generously and blocks take the rest.
"""

import os
from dataclasses import dataclass

MAX_ROWS_CEILING = 1024  # beyond this a decode step is launch/bandwidth bound anyway; more rows only add latency
# A paged cache's row slots: as many as fit if each row held max_model_len // this many tokens (requests are
# mostly far shorter than the context); the blocks, not the slots, then limit admission.
PAGED_ROW_TOKENS_DIVISOR = 4


@dataclass(frozen=True)
class Budget:
    budget_bytes: int  # what the KV cache and activations may use
    kv_bytes_per_token: int
    kv_bytes_per_row: int
    activation_bytes_per_row: int
    prefill_bytes: int
    max_rows: int
    num_kv_blocks: int = 0  # a paged cache's blocks (0: slots of max_model_len tokens per row)
    kv_block_size: int = 0

    def as_stats(self) -> dict[str, int]:
        return {
            "budget_bytes": self.budget_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "activation_bytes_per_row": self.activation_bytes_per_row,
            "prefill_bytes": self.prefill_bytes,
            "max_rows": self.max_rows,
            "num_kv_blocks": self.num_kv_blocks,
            "kv_block_size": self.kv_block_size,
        }


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: float) -> int:
    """K and V for one token across all layers (dtype_bytes: their mean element size, 1.5 for fp16 K + fp8 V)."""
    return round(2 * num_layers * num_kv_heads * head_dim * dtype_bytes)


def budget_bytes(
    *,
    free_bytes: int | None,
    reserve_bytes: int,
    max_bytes: int | None = None,
    weights_bytes: int = 0,
) -> int:
    """Bytes left for KV + activations: free memory − reserve, further capped by max_bytes − weights − reserve.

    free_bytes None (unknown, e.g. CPU without a reading) means only the cap applies; with neither, 0.
    """
    limits = []
    if free_bytes is not None:
        limits.append(free_bytes - reserve_bytes)
    if max_bytes is not None:
        limits.append(max_bytes - weights_bytes - reserve_bytes)
    return max(0, min(limits)) if limits else 0


def estimate_decode_activation_bytes(
    *, hidden_size: int, intermediate_size: int, vocab_size: int, num_heads: int, max_model_len: int, dtype_bytes: int,
    head_dim: int | None = None,
) -> int:
    """Peak extra memory of one decode row (used on CPU, where there is no allocator peak to read):
    fp32 logits + softmax copies, the MLP intermediates, a few hidden-size temporaries, and attention's share
    (estimate_decode_attention_bytes; head_dim: the model's where it sets one, else hidden_size // num_heads)."""
    logits = 3 * vocab_size * 4
    mlp = 3 * intermediate_size * dtype_bytes
    hidden = 8 * hidden_size * dtype_bytes
    attention = estimate_decode_attention_bytes(num_heads=num_heads, head_dim=head_dim or hidden_size // num_heads,
                                                max_model_len=max_model_len, dtype_bytes=dtype_bytes)
    return logits + mlp + hidden + attention


def estimate_decode_attention_bytes(*, num_heads: int, head_dim: int, max_model_len: int, dtype_bytes: int) -> int:
    """The part of a decode row's activations that attention on the device takes: scores over max_model_len
    keys and a contiguous K/V copy (what sdpa's non-flash kernels make of a strided cache view). None of it
    exists where the host CPU attends (small-VRAM's "cpu" placement)."""
    scores = 2 * num_heads * max_model_len * 4
    kv_copy = 2 * num_heads * max_model_len * head_dim * dtype_bytes
    return scores + kv_copy


def estimate_prefill_bytes(
    *, hidden_size: int, intermediate_size: int, num_heads: int, num_tokens: int, dtype_bytes: int,
    scores: bool = True, keys_per_token: int | None = None,
) -> int:
    """Peak of one packed prefill of num_tokens tokens: per-token activations (with the int8 matmuls' 32-bit
    accumulators of the fused gate/up projection) plus, where attention is masked (scores=True: sdpa), the T×T
    mask and fp32 scores. FlashAttention (scores=False) works tile by tile and keeps only a float per token and
    head. keys_per_token: the keys each token's scores span where prompts are padded per row instead of packed
    (the generic path: at most its longest prompt); default num_tokens."""
    per_token = (8 * hidden_size + 3 * intermediate_size) * dtype_bytes + 2 * intermediate_size * 4
    keys = num_tokens if keys_per_token is None else keys_per_token
    quadratic = num_tokens * keys * (1 + 2 * num_heads * 4) if scores else num_tokens * num_heads * 4
    return num_tokens * per_token + quadratic


def estimate_activations(config, *, head_dim: int, max_model_len: int, prefill_tokens: int, dtype_bytes: int,
                         scores: bool) -> tuple[int, int]:
    """(decode activation bytes per row, one prefill's peak) of a Llama-family HF config, where no allocator peak is
    read: on CPU, and in small-VRAM mode, which plans before anything runs."""
    c = config
    per_row = estimate_decode_activation_bytes(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
        num_heads=c.num_attention_heads, max_model_len=max_model_len, dtype_bytes=dtype_bytes, head_dim=head_dim)
    prefill = estimate_prefill_bytes(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                     num_heads=c.num_attention_heads, num_tokens=prefill_tokens,
                                     dtype_bytes=dtype_bytes, scores=scores)
    return per_row, prefill


def plan(
    *,
    budget_bytes: int,
    kv_bytes_per_token: int,
    max_model_len: int,
    activation_bytes_per_row: int,
    prefill_bytes: int,
    max_batch_size: int | None = None,
) -> Budget:
    """max rows = min(cap, rows whose full-length KV + decode activations fit after one prefill peak)."""
    kv_row = kv_bytes_per_token * max_model_len
    per_row = kv_row + activation_bytes_per_row
    fits = max(0, budget_bytes - prefill_bytes) // per_row if per_row > 0 else MAX_ROWS_CEILING
    cap = MAX_ROWS_CEILING if max_batch_size is None else max_batch_size
    return Budget(budget_bytes, kv_bytes_per_token, kv_row, activation_bytes_per_row, prefill_bytes,
                  int(min(cap, fits)))


def plan_paged(
    *,
    budget_bytes: int,
    kv_bytes_per_token: int,
    max_model_len: int,
    activation_bytes_per_row: int,
    prefill_bytes: int,
    block_size: int,
    max_batch_size: int | None = None,
) -> Budget:
    """A paged cache: row slots as plan() would give rows of max_model_len // PAGED_ROW_TOKENS_DIVISOR tokens
    (within the cap), then KV blocks of block_size tokens from what the slots' activations leave (no more than
    every slot at max_model_len holds), plus the scratch block. Fewer slots where the blocks would not hold one
    row of max_model_len tokens; none where even one slot leaves too little."""
    slots = plan(budget_bytes=budget_bytes, kv_bytes_per_token=kv_bytes_per_token,
                 max_model_len=max(1, max_model_len // PAGED_ROW_TOKENS_DIVISOR),
                 activation_bytes_per_row=activation_bytes_per_row, prefill_bytes=prefill_bytes,
                 max_batch_size=max_batch_size)
    block_bytes = kv_bytes_per_token * block_size
    row_blocks = -(-max_model_len // block_size)
    rows = slots.max_rows
    if activation_bytes_per_row > 0:  # never so many slots that the blocks cannot hold one whole row
        rows = min(rows, max(0, budget_bytes - prefill_bytes - (1 + row_blocks) * block_bytes)
                   // activation_bytes_per_row)
    left = budget_bytes - prefill_bytes - rows * activation_bytes_per_row
    num_blocks = max(0, left // block_bytes - 1) if block_bytes > 0 else 0
    num_blocks = min(num_blocks, rows * row_blocks)  # more than every row at max_model_len would never be used
    rows = min(rows, num_blocks)  # a row holds at least one block
    if num_blocks < row_blocks:
        rows = 0
    return Budget(budget_bytes, kv_bytes_per_token, kv_bytes_per_token * max_model_len, activation_bytes_per_row,
                  prefill_bytes, int(rows), int(num_blocks), block_size)


def available_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
