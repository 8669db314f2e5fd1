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


def test_rope_store_refuses_a_quantised_cache():
    q = k = v = torch.zeros(1, 2, 8)
    cache = torch.zeros(2, 4, 2, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="unquantised"):
        rope.rope_store(q, k, v, torch.zeros(1, 8), torch.zeros(1, 8), cache, cache, torch.zeros(1, dtype=torch.long))


def test_the_engine_ropes_and_stores_in_one_launch_and_answers_like_hf_generate(demo_model_dir, monkeypatch):
    """With ROPE_STORE forced (as on CUDA), each decode step's layers rope and store through rope_store (one call a
    layer, none in prefills), and the engine answers as HF generate on the same model does; off, it never runs."""
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.factory import build_llm_engine

    from tests.test_models import oracle, requests, run_engine

    engine = build_llm_engine(EngineConfig(model=str(demo_model_dir), max_batch_size=3))
    calls = []
    real = llama.rope_store
    monkeypatch.setattr(llama, "rope_store", lambda q, *a: calls.append(q.shape[0]) or real(q, *a))
    monkeypatch.setattr(llama, "ROPE_STORE", True)
    got = run_engine(engine, requests())
    layers = engine.model.config.num_hidden_layers
    assert calls and len(calls) % layers == 0 and max(calls) <= 3  # decode rows only (a prefill packs more)
    assert got == oracle(demo_model_dir, engine)
    calls.clear()
    monkeypatch.setattr(llama, "ROPE_STORE", False)
    first = requests()[:1]
    assert run_engine(engine, first) == {first[0].key: got[first[0].key]} and calls == []


def test_a_quantised_cache_keeps_the_rope_and_its_own_store(demo_model_dir, monkeypatch):
    """An int8 K/V cache quantises in its store (kv_store), so take_rope declines it even when forced: no
    rope_store call, and the engine still answers every request."""
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.factory import build_llm_engine

    from tests.test_models import requests, run_engine

    engine = build_llm_engine(EngineConfig(model=str(demo_model_dir), max_batch_size=3, kv_cache_dtype="int8"))
    calls = []
    real = llama.rope_store
    monkeypatch.setattr(llama, "rope_store", lambda q, *a: calls.append(q.shape[0]) or real(q, *a))
    monkeypatch.setattr(llama, "ROPE_STORE", True)
    reqs = requests()[:2]
    got = run_engine(engine, reqs)
    assert calls == [] and set(got) == {r.key for r in reqs} and all(got.values())
