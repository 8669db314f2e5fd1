"""A decode step's RoPE and K/V store as one launch (kernels/rope.rope_store, llama.CacheAttention.take_rope): the
values rope_qk and store_kv write, under Triton's interpreter, and the engine's answers with it."""

import pytest
import torch
from batchgen.worker.engine import llama
from batchgen.worker.engine.kernels import rope
from batchgen.worker.engine.kernels.kv_store import cache_slots, store_kv
from batchgen.worker.engine.kernels.rope import rope_qk_reference, rope_store


@pytest.mark.parametrize("q_heads,k_heads,head_dim,dtype", [(4, 2, 64, torch.float16), (6, 3, 80, torch.float16),
                                                            (4, 4, 32, torch.float32)])
def test_rope_store_writes_what_rope_then_the_store_write(q_heads, k_heads, head_dim, dtype):
    """Five rows' q, k, v as views of one fused projection output, a paged cache of 6 blocks of 4 slots (block 0
    scratch) with the rows at scattered positions: the roped q, and the cache after, equal rope_qk_reference's q
    and its k and v through store_kv, bit for bit; every other slot stays as it was. 80 wide: masked lanes."""
    g = torch.Generator().manual_seed(5)
    n, blocks, width = 5, 6, 4
    qkv = (torch.randn(n, (q_heads + 2 * k_heads) * head_dim, generator=g) * 3).to(dtype)
    q, k, v = qkv.split([q_heads * head_dim, k_heads * head_dim, k_heads * head_dim], dim=-1)
    q, k, v = (t.view(n, -1, head_dim) for t in (q, k, v))
    angles = torch.randn(n, head_dim // 2, generator=g) * 4
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype)
    block_table = torch.tensor([[1, 2], [3, 0], [4, 5], [2, 1], [5, 4]], dtype=torch.int32)
    positions = torch.tensor([0, 3, 6, 5, 2])
    slots = cache_slots(torch.empty(blocks, width, k_heads, head_dim), torch.arange(n), positions, block_table)
    before = torch.randn(blocks, width, k_heads, head_dim, generator=g).to(dtype)
    k_cache, v_cache = before.clone(), before.clone() * 2
    got_q = rope_store(q, k, v, cos, sin, k_cache, v_cache, slots)
    want_q, want_k = rope_qk_reference(q[:, None], k[:, None], cos[:, None, None], sin[:, None, None])
    want_k_cache, want_v_cache = before.clone(), before.clone() * 2
    store_kv(want_k_cache, slots, want_k[:, 0])
    store_kv(want_v_cache, slots, v)
    assert got_q.is_contiguous() and torch.equal(got_q, want_q[:, 0])
    assert torch.equal(k_cache, want_k_cache) and torch.equal(v_cache, want_v_cache)
    assert not torch.equal(k_cache, before) and not torch.equal(got_q, q)  # it stored, and rotated


@pytest.mark.parametrize("heads_major", [True, False])
def test_rope_store_quantises_an_int8_cache_as_rope_then_the_store(heads_major):
    """An int8 cache with its per-token scales (the engine's default cache: paged, each block's heads outermost; and
    row slots): rope_store writes the int8 K and V bytes and the scales rope_qk_reference's k and v give through
    store_kv, bit for bit, with q as before. 80 wide: masked lanes, which must not count in a head's absmax."""
    from batchgen.worker.engine.model_runner import kv_pool

    g = torch.Generator().manual_seed(7)
    n, blocks, width, q_heads, k_heads, head_dim = 5, 6, 4, 4, 2, 80
    qkv = torch.randn(n, (q_heads + 2 * k_heads) * head_dim, generator=g).half() * 3
    q, k, v = (t.view(n, -1, head_dim) for t in qkv.split([q_heads * head_dim, k_heads * head_dim,
                                                           k_heads * head_dim], dim=-1))
    angles = torch.randn(n, head_dim // 2, generator=g) * 4
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).half() for f in (torch.cos, torch.sin))
    block_table = torch.tensor([[1, 2], [3, 0], [4, 5], [2, 1], [5, 4]], dtype=torch.int32)
    positions = torch.tensor([0, 3, 6, 5, 1])  # every row its own slot
    shape = (1, blocks, width, k_heads, head_dim)
    got, want = ([kv_pool(shape, torch.int8, torch.device("cpu"), heads_major)[0] for _ in range(2)]
                 + [torch.zeros(blocks, k_heads, width) for _ in range(2)] for _ in range(2))
    slots = cache_slots(got[0], torch.arange(n), positions, block_table)
    got_q = rope_store(q, k, v, cos, sin, *got[:2], slots, *got[2:])
    want_q, want_k = rope_qk_reference(q[:, None], k[:, None], cos[:, None, None], sin[:, None, None])
    store_kv(want[0], slots, want_k[:, 0], want[2])
    store_kv(want[1], slots, v, want[3])
    assert torch.equal(got_q, want_q[:, 0])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert got[0].abs().amax() == 127 and got[2].count_nonzero() == n * k_heads  # it quantised, every head once


def test_rope_store_refuses_a_cache_it_cannot_write():
    q = k = v = torch.zeros(1, 2, 8)
    slots, table = torch.zeros(1, dtype=torch.long), torch.zeros(1, 8)
    int8 = torch.zeros(2, 4, 2, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8 cache with its scales"):  # int8 without scales
        rope.rope_store(q, k, v, table, table, int8, int8, slots)
    with pytest.raises(ValueError, match="unquantised cache of q's dtype"):  # fp8 (per-head scales), or mixed
        rope.rope_store(q, k, v, table, table, int8.view(torch.float8_e4m3fn), int8.view(torch.float8_e4m3fn), slots)


def test_the_engine_ropes_and_stores_in_one_launch_and_answers_like_hf_generate(demo_model_dir, monkeypatch):
    """With ROPE_STORE forced (as on CUDA), each decode step's layers rope and store through rope_store (one call a
    layer, none in prefills), and the engine answers as HF generate on the same model does; off, it never runs."""
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.factory import build_llm_engine

    from tests.test_models import oracle, requests, run_engine

    engine = build_llm_engine(EngineConfig(model=str(demo_model_dir), max_batch_size=3))
    calls = []
    real = llama.rope_store
    monkeypatch.setattr(llama, "rope_store", lambda q, *a, **kw: calls.append(q.shape[0]) or real(q, *a, **kw))
    monkeypatch.setattr(llama, "ROPE_STORE", True)
    got = run_engine(engine, requests())
    layers = engine.model.config.num_hidden_layers
    assert calls and len(calls) % layers == 0 and max(calls) <= 3  # decode rows only (a prefill packs more)
    assert got == oracle(demo_model_dir, engine)
    calls.clear()
    monkeypatch.setattr(llama, "ROPE_STORE", False)
    first = requests()[:1]
    assert run_engine(engine, first) == {first[0].key: got[first[0].key]} and calls == []


def test_an_int8_cache_ropes_and_stores_in_one_launch_as_apart(demo_model_dir, monkeypatch):
    """The engine's int8 K/V cache (paged, per-token scales): with ROPE_STORE forced, each decode step's layers rope
    and store through rope_store, and every request's text equals the engine's with RoPE and the two stores apart
    (the same cache bytes, so the same greedy tokens)."""
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.factory import build_llm_engine

    from tests.test_models import requests, run_engine

    engine = build_llm_engine(EngineConfig(model=str(demo_model_dir), max_batch_size=3, kv_cache_dtype="int8"))
    calls = []
    real = llama.rope_store
    monkeypatch.setattr(llama, "rope_store", lambda q, *a, **kw: calls.append(q.shape[0]) or real(q, *a, **kw))
    reqs = requests()
    monkeypatch.setattr(llama, "ROPE_STORE", False)
    apart = run_engine(engine, reqs)
    assert calls == []
    monkeypatch.setattr(llama, "ROPE_STORE", True)
    fused = run_engine(engine, requests())
    layers = engine.model.config.num_hidden_layers
    assert calls and len(calls) % layers == 0 and max(calls) <= 3
    assert fused == apart and all(apart.values())
