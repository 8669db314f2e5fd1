"""Which keys a split-KV decode program reads: shared by the split kernel (attention.py) and int8_keys."""

from batchgen.worker.engine.kernels.backend import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def split_bounds(SeqLens, CacheRows, HAS_ROWS: tl.constexpr, NUM_SPLITS: tl.constexpr, WHOLE: tl.constexpr):
        """Program (row, kv head, split): its row, KV head, split, cache row (CacheRows' where HAS_ROWS) and its keys
        start .. end, the row's keys cut into NUM_SPLITS runs of whole WHOLE-key steps (no ragged step inside)."""
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(SeqLens + row)
        cache_row = row
        if HAS_ROWS:
            cache_row = tl.load(CacheRows + row)
        split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), WHOLE) * WHOLE
        start = split * split_len
        return row, kv_head, split, cache_row, start, tl.minimum(start + split_len, seq_len)

    @triton.jit
    def preload_ids(BlockTable, cache_row, stride_bt, start, end, PAGE: tl.constexpr, PRELOAD: tl.constexpr):
        """The split start .. end's block ids, once ahead of its loop (PRELOAD of them from start's block; past end
        0): each step's then come from shared memory (tl.gather), not a load."""
        ids = start // PAGE + tl.arange(0, PRELOAD)
        return tl.load(BlockTable + cache_row.to(tl.int64) * stride_bt + ids, mask=ids < tl.cdiv(end, PAGE), other=0)
