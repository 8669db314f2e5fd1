"""The paged KV cache: rows hold KV blocks by the tokens they can reach (prompt + max_tokens), not a slot of
max_model_len each, so a fixed amount of KV memory runs more rows at once.

The Triton decode kernel reads keys through the block table (checked on the CPU by Triton's interpreter against
the plain-torch reference); the engine over a paged cache gives HF generate's greedy tokens per prompt; blocks go
back to the pool when a row finishes, is aborted or is requeued after an OOM.
"""

import dataclasses

import pytest
import torch
from batchgen.jobs.schema import SamplingParams
from batchgen.worker.engine import budget as budget_math
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.kernels.attention import (
    decode_attention,
    decode_attention_reference,
    fp8_kv_scale,
    quantize_kv,
)
from batchgen.worker.engine.kv_blocks import SCRATCH_BLOCK, BlockPool
from batchgen.worker.engine.llama import LlamaParts, decode_step, gather_rows
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.model_runner import KV_BLOCK_SIZE, ModelRunner
from batchgen.worker.engine.scheduler import Scheduler
from batchgen.worker.engine.sequence import Sequence

from tests.test_llm_engine import MAX_TOKENS, PROMPTS, completion, hf_greedy

BS = KV_BLOCK_SIZE


def seq(key: str, num_prompt_tokens: int, max_tokens: int) -> Sequence:
    return Sequence(key, list(range(num_prompt_tokens)), SamplingParams(max_tokens=max_tokens), seed=0)


# -- the pool and the scheduler (pure Python)


def test_a_row_reserves_the_blocks_of_its_prompt_plus_max_tokens_within_the_context():
    pool = BlockPool(num_blocks=10, block_size=BS, max_blocks_per_row=4)
    assert [pool.blocks_for(n) for n in (1, BS, BS + 1, 10 * BS)] == [1, 1, 2, 4]  # capped at max_model_len's
    assert pool.reserve(3, BS + 1) == [1, 2] and pool.num_free == 8 and pool.num_used == 2
    assert pool.reserve(5, 4 * BS) == [3, 4, 5, 6]  # never the scratch block, 0
    assert pool.can_reserve(4 * BS) and pool.reserve(6, 3 * BS) == [7, 8, 9]
    assert pool.num_free == 1 and not pool.can_reserve(BS + 1)
    with pytest.raises(ValueError, match="2 blocks wanted, 1 free"):
        pool.reserve(7, BS + 1)
    assert pool.take_changes() == {3: [1, 2], 5: [3, 4, 5, 6], 6: [7, 8, 9]} and pool.take_changes() == {}
    pool.release(3)
    assert pool.num_free == 3 and pool.take_changes() == {3: []}  # the runner points row 3 at the scratch block
    with pytest.raises(ValueError, match="cannot hold one row"):
        BlockPool(num_blocks=3, block_size=BS, max_blocks_per_row=4)


def test_blocks_not_max_model_len_limit_how_many_rows_run():
    """8 blocks hold one row of max_model_len (8 blocks) as slots would; short requests take one block each."""
    pool = BlockPool(num_blocks=8, block_size=BS, max_blocks_per_row=8)
    sched = Scheduler(16, max_prefill_tokens=1000, blocks=pool)
    seqs = [seq(f"s{i}", 20, 30) for i in range(9)] + [seq("long", 100, 200)]  # 50 tokens: 1 block; 300: 5
    for s in seqs:
        sched.add(s)
    assert len(sched.admit()) == 8 > pool.num_blocks // pool.max_blocks_per_row
    assert pool.num_free == 0 and sched.admit() == []  # rows are free, blocks are not
    sched.finish(seqs[0], "stop")
    assert pool.num_free == 1 and [s.key for s in sched.admit()] == ["s8"]
    for s in seqs[1:5]:
        sched.finish(s, "length")
    assert sched.admit() == []  # 4 free blocks: "long" waits for its 5
    sched.finish(seqs[5], "length")
    assert [s.key for s in sched.admit()] == ["long"] and len(pool.rows[seqs[-1].row]) == 5


def test_abort_requeue_and_oom_shrink_give_the_blocks_back():
    pool = BlockPool(num_blocks=16, block_size=BS, max_blocks_per_row=8)
    sched = Scheduler(8, max_prefill_tokens=1000, blocks=pool)
    seqs = [seq(f"s{i}", 10, 100) for i in range(6)]  # 2 blocks each
    for s in seqs:
        sched.add(s)
    sched.admit()
    assert pool.num_used == 12
    sched.abort(["s1"])
    assert pool.num_used == 10 and 1 not in pool.rows
    sched.requeue([seqs[2]])
    assert pool.num_used == 8 and seqs[2].row is None
    sched.shrink()  # rows >= 4 go back to pending
    assert set(pool.rows) == set(sched.running) == {0, 3} and pool.num_used == 4


def test_without_a_pool_the_scheduler_is_unchanged():
    sched = Scheduler(2, max_prefill_tokens=1000)
    for i in range(3):
        sched.add(seq(f"s{i}", 10, 10_000))  # no pool: max_tokens plays no part in admission
    assert len(sched.admit()) == 2 and sched.num_admittable == 0


# -- the kernel and the decode step (Triton's interpreter on the CPU)


def _paged(k: torch.Tensor, v: torch.Tensor, num_blocks: int, seed: int = 0):
    """Slot caches k/v [rows, max_len, kv_heads, d] as blocks in a shuffled pool, and their block table."""
    rows, max_len = k.shape[:2]
    per_row = max_len // BS
    order = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed))[:rows * per_row] + 1
    table = order.view(rows, per_row).to(torch.int32)
    blocks_k = torch.zeros(num_blocks, BS, *k.shape[2:], dtype=k.dtype)
    blocks_v = torch.zeros_like(blocks_k)
    blocks_k[table.long()] = k.view(rows, per_row, BS, *k.shape[2:])
    blocks_v[table.long()] = v.view(rows, per_row, BS, *v.shape[2:])
    return blocks_k, blocks_v, table


@pytest.mark.parametrize("fp8", [False, True])
def test_the_triton_kernel_reads_keys_through_a_shuffled_block_table(fp8):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(1)
    k = torch.randn(4, 3 * BS, 2, 64, generator=g).half()
    v = torch.randn(4, 3 * BS, 2, 64, generator=g).half()
    q = torch.randn(4, 8, 64, generator=g).half()
    lengths = torch.tensor([1, BS, BS + 7, 3 * BS], dtype=torch.int32)  # one key, one whole block, across, all
    k_scale = v_scale = None
    if fp8:
        k_scale, v_scale = fp8_kv_scale(k), fp8_kv_scale(v)
        k, v = quantize_kv(k, k_scale), quantize_kv(v, v_scale)
    blocks_k, blocks_v, table = _paged(k, v, num_blocks=20)
    slots = decode_attention_reference(q, k, v, lengths, 0.125, k_scale=k_scale, v_scale=v_scale)
    paged_ref = decode_attention_reference(q, blocks_k, blocks_v, lengths, 0.125, k_scale=k_scale,
                                           v_scale=v_scale, block_table=table)
    assert torch.equal(paged_ref, slots)  # the same logical K/V
    for splits in (1, 2, 3):
        for preload in (False, True):  # each step's block ids read in the loop, or the split's all ahead of it
            out = decode_attention(q, blocks_k, blocks_v, lengths, 0.125, k_scale=k_scale, v_scale=v_scale,
                                   block_table=table, num_splits=splits, preload=preload)
            torch.testing.assert_close(out.float(), slots.float(), atol=2e-3, rtol=2e-3)
    blocks_k[SCRATCH_BLOCK], blocks_v[SCRATCH_BLOCK] = 100, -100  # a block no row holds is never read
    again = decode_attention(q, blocks_k, blocks_v, lengths, 0.125, k_scale=k_scale, v_scale=v_scale,
                             block_table=table, num_splits=2)
    torch.testing.assert_close(again.float(), slots.float(), atol=2e-3, rtol=2e-3)


def _tiny_parts(dtype: torch.dtype = torch.float16) -> LlamaParts:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * BS)
    return LlamaParts.from_hf(LlamaForCausalLM(config).eval().to(dtype))


@pytest.mark.parametrize("attention", ["triton", "sdpa"])
def test_a_paged_decode_step_equals_the_slot_one(attention):
    """Same logits, and the new K/V land in each row's block for its position."""
    if attention == "triton":
        pytest.importorskip("triton")
    parts = _tiny_parts()
    g = torch.Generator().manual_seed(2)
    rows, max_len = 4, 2 * BS
    slot_k = torch.randn(2, rows, max_len, 2, 16, generator=g).half()
    slot_v = torch.randn(2, rows, max_len, 2, 16, generator=g).half()
    layers = [_paged(slot_k[i], slot_v[i], num_blocks=12, seed=5) for i in range(2)]  # one shuffle for both
    paged_k, paged_v = torch.stack([k for k, _, _ in layers]), torch.stack([v for _, v, _ in layers])
    table = layers[0][2]
    ids = torch.randint(0, 128, (rows,), generator=g)
    positions = torch.tensor([0, 5, BS, 2 * BS - 1])
    with torch.inference_mode():
        want = decode_step(parts, ids, positions, slot_k, slot_v, max_len, "sdpa")
        got = decode_step(parts, ids, positions, paged_k, paged_v, max_len, attention, block_table=table)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    for layer in range(2):
        torch.testing.assert_close(gather_rows(paged_k[layer], table, rows, max_len).float(),
                                   slot_k[layer].float(), atol=2e-2, rtol=0)


def test_flash_decoding_and_windowed_triton_keep_slots():
    parts = _tiny_parts(torch.float32)
    kwargs = dict(device=torch.device("cpu"), dtype=torch.float32, max_model_len=2 * BS, paged=True)
    assert ModelRunner(parts, attention="sdpa", **kwargs).block_size == BS
    assert ModelRunner(parts, attention="triton", **kwargs).block_size == BS
    assert ModelRunner(parts, attention="flash", **kwargs).block_size is None  # FlashAttention wants rows whole
    windowed = dataclasses.replace(parts, spec=dataclasses.replace(parts.spec, window=8))
    assert ModelRunner(windowed, attention="triton", **kwargs).block_size is None  # decodes with flash
    assert ModelRunner(parts, attention="sdpa", device=torch.device("cpu"), dtype=torch.float32,
                       max_model_len=2 * BS).block_size is None  # small-VRAM's device runner: slots


def test_the_paged_budget_gives_blocks_what_the_row_slots_leave():
    kw = dict(budget_bytes=10_000_000, kv_bytes_per_token=100, max_model_len=1024, activation_bytes_per_row=1_000,
              prefill_bytes=1_000_000)
    slots = budget_math.plan(**kw)
    paged = budget_math.plan_paged(block_size=BS, **kw)
    assert paged.max_rows > 3 * slots.max_rows and paged.kv_block_size == BS
    used = 1_000_000 + paged.max_rows * 1_000 + (paged.num_kv_blocks + 1) * BS * 100
    assert used <= 10_000_000
    # the extra slots' activations cost a little KV: nearly the slots' tokens, now shared by need
    assert 0.9 * slots.max_rows * 1024 < paged.num_kv_blocks * BS < slots.max_rows * 1024
    capped = budget_math.plan_paged(block_size=BS, max_batch_size=4, **kw)
    assert capped.max_rows == 4 and capped.num_kv_blocks == 4 * 1024 // BS  # never more than 4 full rows use
    assert budget_math.plan_paged(block_size=BS, **(kw | {"budget_bytes": 1_100_000})).max_rows == 0
    assert {"num_kv_blocks", "kv_block_size"} <= set(paged.as_stats())


# -- the engine (tiny fp32 Llama, masked sdpa on the CPU)


@pytest.fixture(scope="module")
def base(demo_model_dir) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), load_in_8bit=False, attention="sdpa",
                                              max_batch_size=8))


def paged_engine(base: LLMEngine, num_blocks: int, max_rows: int = 8, inject_oom: str | None = None) -> LLMEngine:
    """An engine over base's model and runner with a fixed number of KV blocks."""
    cfg = dataclasses.replace(base.cfg, max_batch_size=max_rows, inject_oom=inject_oom)
    runner = base.runner
    if inject_oom:
        runner = ModelRunner(base.runner.parts, device=base.device, dtype=base.runner.dtype,
                             max_model_len=base.max_model_len, attention="sdpa", inject_oom=inject_oom, paged=True)
    budget = dataclasses.replace(base.budget, max_rows=max_rows, num_kv_blocks=num_blocks)
    return LLMEngine(cfg, base.model, base.tokenizer, runner, budget,
                     max_prefill_tokens=base.scheduler.max_prefill_tokens)


def check_blocks(engine: LLMEngine) -> None:
    """Every running row, and only they, hold the blocks of their prompt + max_tokens."""
    sched, pool = engine.scheduler, engine.blocks
    assert set(pool.rows) == set(sched.running)
    assert pool.num_used == sum(pool.blocks_for(sched.num_kv_tokens(s)) for s in sched.running.values())


def run_checked(engine: LLMEngine, requests, max_steps: int = 2000) -> dict:
    results = {r.key: r for r in engine.add(requests)}
    for _ in range(max_steps):
        if not engine.num_unfinished:
            engine.step()  # applies the last finishes to the block table
            return results
        results.update({r.key: r for r in engine.step()})
        check_blocks(engine)
    raise AssertionError("engine did not finish")


@pytest.mark.slow
def test_the_engine_pages_by_default_on_the_fast_path(base):
    assert base.runner.block_size == BS and base.blocks is not None
    stats = base.stats().extra
    assert stats["kv_block_size"] == BS and stats["num_kv_blocks"] == base.blocks.num_blocks > 0
    assert base.runner.k_cache.shape[1:3] == (1 + base.blocks.num_blocks, BS)


@pytest.mark.slow
def test_kv_layout_slots_turns_paging_off_and_the_startup_block_names_the_blocks(base, demo_model_dir):
    from batchgen.worker.config import WorkerConfig
    from batchgen.worker.startup import startup_block

    slots = LLMEngine.from_config(dataclasses.replace(base.cfg, kv_layout="slots"))
    assert slots.runner.block_size is None and slots.blocks is None and slots.scheduler.blocks is None
    assert slots.stats().extra["num_kv_blocks"] == 0
    with pytest.raises(ValueError, match="kv_layout"):
        dataclasses.replace(base.cfg, kv_layout="blocks")
    cfg = WorkerConfig(engine_config=base.cfg)
    assert f"KV blocks      {base.blocks.num_blocks:,} of {BS} tokens (paged)" in startup_block(base.stats(), cfg)
    assert "KV blocks" not in startup_block(slots.stats(), cfg)


@pytest.mark.slow
def test_more_rows_run_at_once_than_slots_allow_and_greedy_output_equals_hf(base):
    engine = paged_engine(base, num_blocks=engine_blocks(base))
    per_row = engine.blocks.max_blocks_per_row
    requests = [completion(f"g{i}", p, max_tokens=m) for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True))]
    requests.append(completion("long", PROMPTS[3], max_tokens=BS + 10))  # two blocks
    results = run_checked(engine, requests)
    stats = engine.stats().extra
    assert stats["max_decode_batch"] == 8 > engine.blocks.num_blocks // per_row  # slots would run one row
    assert stats["max_kv_blocks_used"] == 8 and stats["mean_kv_tokens"] > 0
    for i, (prompt, max_tokens) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True)):
        got = results[f"g{i}"]
        want = hf_greedy(engine, engine.tokenizer(prompt)["input_ids"], max_tokens)
        assert (got.text, got.finish_reason, got.completion_tokens) == want, prompt
    want = hf_greedy(engine, engine.tokenizer(PROMPTS[3])["input_ids"], BS + 10)
    assert (results["long"].text, results["long"].completion_tokens) == (want[0], want[2])
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.blocks.rows
    assert (engine.runner.block_table == SCRATCH_BLOCK).all()  # finished rows write nowhere that is read


def engine_blocks(base: LLMEngine) -> int:
    return base.runner.max_blocks_per_row  # the KV of exactly one max_model_len row


@pytest.mark.slow
def test_abort_returns_the_blocks(base):
    engine = paged_engine(base, num_blocks=engine_blocks(base))
    engine.add([completion(f"a{i}", PROMPTS[i], max_tokens=20, ignore_eos=True) for i in range(6)])
    engine.step()
    engine.step()
    used = engine.blocks.num_used
    engine.abort(["a1", "a5"])  # a1 is running, a5 maybe too
    assert engine.blocks.num_used < used
    check_blocks(engine)
    results = run_checked(engine, [])
    assert sorted(results) == ["a0", "a2", "a3", "a4"]
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.slow
@pytest.mark.parametrize("v_transposed", [False, True])
def test_an_oom_requeue_returns_the_blocks_and_loses_nothing(base, v_transposed):
    """v_transposed: as over a V^T pool, whose decode stores are not idempotent: every row of a decode step that ran
    out of memory starts again (more prompt tokens prefilled), none runs that step's stores twice."""
    requests = [completion(f"o{i}", PROMPTS[i], max_tokens=MAX_TOKENS[i]) for i in range(8)]
    baseline = run_checked(paged_engine(base, num_blocks=engine_blocks(base)), requests)
    prefilled = {}
    for transposed in (False, v_transposed):
        engine = paged_engine(base, num_blocks=engine_blocks(base), inject_oom="steps=3,9")
        engine.runner.v_transposed = transposed
        results = run_checked(engine, [completion(r.key, r.request.prompt, max_tokens=r.request.params.max_tokens)
                                       for r in requests])
        assert engine.runner.fault.num_injected == 2 and engine.stats().extra["num_ooms"] == 2
        assert {k: r.text for k, r in results.items()} == {k: r.text for k, r in baseline.items()}
        assert engine.blocks.num_free == engine.blocks.num_blocks
        prefilled[transposed] = engine.step_stats.num_prefill_tokens
    if v_transposed:
        assert prefilled[True] > prefilled[False], prefilled


@pytest.mark.slow
@pytest.mark.parametrize("v_transposed", [False, True])
def test_a_queued_decode_that_runs_out_of_memory_after_its_stores_runs_again_only_where_they_are_idempotent(
        base, monkeypatch, v_transposed):
    """A decode step queued before the unread one is read (overlapped decode) fails after the model ran (its stores
    done). Over a plain pool the synchronous step after it runs it again; over a V^T pool, where a block it filled
    would be sealed twice, its rows start again instead (more prompt tokens prefilled), the batch halved."""
    requests = [completion(f"q{i}", PROMPTS[i], max_tokens=MAX_TOKENS[i]) for i in range(8)]
    plain = paged_engine(base, num_blocks=engine_blocks(base))
    baseline = run_checked(plain, requests)
    engine = paged_engine(base, num_blocks=engine_blocks(base))
    assert engine.runner.takes_device_tokens
    monkeypatch.setattr(engine.runner, "v_transposed", v_transposed)
    decode, queue = engine.runner.decode, engine._queue_decode
    state = {"queued": False, "calls": 0, "failed": False}

    def queued(picks):
        state["queued"] = True
        try:
            queue(picks)
        finally:
            state["queued"] = False

    def failing_decode(tokens, positions):
        logits = decode(tokens, positions)
        state["calls"] += state["queued"]
        if state["queued"] and state["calls"] == 4:
            state["failed"] = True
            raise torch.OutOfMemoryError("out of memory after the stores (test)")
        return logits

    monkeypatch.setattr(engine, "_queue_decode", queued)
    monkeypatch.setattr(engine.runner, "decode", failing_decode)
    again = []  # whether the synchronous forward right after the failure decodes (runs the failed step again)
    real_forward = engine._forward

    def forward(admitted, decoding):
        if state["failed"] and not again:
            again.append(not admitted and not decoding)
        return real_forward(admitted, decoding)

    monkeypatch.setattr(engine, "_forward", forward)
    results = run_checked(engine, [completion(r.key, r.request.prompt, max_tokens=r.request.params.max_tokens)
                                   for r in requests])
    assert state["failed"] and engine.stats().extra["num_ooms"] == int(v_transposed)
    assert {k: r.text for k, r in results.items()} == {k: r.text for k, r in baseline.items()}
    assert engine.blocks.num_free == engine.blocks.num_blocks
    restarted = engine.step_stats.num_prefill_tokens > plain.step_stats.num_prefill_tokens
    assert restarted == v_transposed and again == [not v_transposed], (restarted, again)
    assert engine.scheduler.max_batch_size == (4 if v_transposed else 8)


@pytest.mark.parametrize("rope_store", [None, True])
def test_an_int8_pool_with_v_transposed_decodes_as_the_keys_kernel_over_its_values(rope_store, monkeypatch):
    """--int8-kv-scales v-q16-keys-vt's pool (kv_pool(transposed=True)) through the engine's own writes and
    decode_step: a prefill's stores, then decode steps in which rows fill a block (store_kv turns it into V^T) and
    start the next one (as written, read so by _vt_kernel). Each step's logits are those of the heads-major int8 pool
    the keys kernel reads, and both pools hold the same values. rope_store True: the decode steps rope and store K
    and V in one launch, as on CUDA (the V^T pool's V in runs, its filled blocks sealed after)."""
    pytest.importorskip("triton")
    from batchgen.worker.engine import llama

    monkeypatch.setattr(llama, "ROPE_STORE", rope_store)
    from batchgen.worker.engine.kernels.attention import v_transposed, v_values
    from batchgen.worker.engine.llama import cache_store
    from batchgen.worker.engine.model_runner import kv_pool

    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2 * BS)
    parts = LlamaParts.from_hf(LlamaForCausalLM(config).eval().half())  # head_dim 32: one int8 MMA deep
    lens = torch.tensor([BS - 2, BS - 1, 10])  # rows that fill their first block in one step or two, and one that
    rows, shape = len(lens), (2, 8, BS, 2, 32)  # does not
    table = torch.tensor([[3, 5], [1, 6], [7, 2]], dtype=torch.int32)
    pools = []
    for transposed in (False, True):
        k, v = (kv_pool(shape, torch.int8, torch.device("cpu"), True, t) for t in (False, transposed))
        pools.append((k, v, torch.zeros(2, 8, 2, BS), torch.zeros(2, 8, 2, BS)))
    assert v_transposed(pools[1][1]) and not v_transposed(pools[0][1])
    token_rows = torch.arange(rows).repeat_interleave(lens)
    positions = torch.cat([torch.arange(n) for n in lens.tolist()])
    g = torch.Generator().manual_seed(1)
    prompt_kv = [torch.randn(2, len(token_rows), 2, 32, generator=g).half() for _ in range(2)]
    for k, v, ks, vs in pools:
        store = cache_store(k, v, token_rows, positions, ks, vs, table)
        for layer in range(2):
            store(layer, slice(None), prompt_kv[0][layer], prompt_kv[1][layer])
    with torch.inference_mode():
        for step in range(3):
            ids = torch.randint(0, 128, (rows,), generator=g)
            plain, vt = (decode_step(parts, ids, lens + step, k, v, 2 * BS, "triton", ks, vs, table)
                         for k, v, ks, vs in pools)
            torch.testing.assert_close(vt.float(), plain.float(), atol=2e-2, rtol=2e-2)
    held = (lens + 3).to(torch.int32)
    # layer 0's new K/V come from the same embeddings; layer 1's from the two kernels' outputs, an fp16 ulp apart
    got = [v_values(pools[1][1][layer], held, table) for layer in range(2)]
    assert torch.equal(got[0], pools[0][1][0])
    assert (got[1].int() - pools[0][1][1].int()).abs().max() <= 1
    assert not torch.equal(pools[1][1][0], pools[0][1][0])  # the partial blocks are not in V^T's places
    with pytest.raises(ValueError, match="Triton kernel only"):  # the masked path would read them through V^T
        decode_step(parts, ids, lens + 3, *pools[1][:2], 2 * BS, "sdpa", *pools[1][2:], table)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16])
def test_a_decode_steps_store_into_v_transposed_holds_the_plain_pools_values(dtype):
    """store_kv into a V^T pool (its runs, then the grouped seal; interpreted) after a prefill's: a decode step's
    tokens, one a row, some filling their block's last place, give the values and int8 scales of a plain heads-major
    pool (v_values); the blocks the step filled are V^T, a partial one stays as written."""
    pytest.importorskip("triton")
    from batchgen.worker.engine.kernels.attention import v_values
    from batchgen.worker.engine.kernels.kv_store import cache_slots, store_kv
    from batchgen.worker.engine.model_runner import kv_pool

    g = torch.Generator().manual_seed(3)
    table = torch.tensor([[3, 5], [1, 6], [7, 2], [4, 0]], dtype=torch.int32)
    lens = torch.tensor([BS - 2, BS - 1, 2 * BS - 1, 5])  # rows 1 and 2 fill a block with this step's token
    shape, int8 = (1, 8, BS, 2, 32), dtype == torch.int8
    prompt = torch.cat([torch.arange(n) for n in lens.tolist()])
    prompt_rows = torch.arange(4).repeat_interleave(lens)
    prompt_x = torch.randn(len(prompt), 2, 32, generator=g).half()
    step_x = torch.randn(4, 2, 32, generator=g).half()
    pools = []
    for transposed in (False, True):
        v = kv_pool(shape, dtype, torch.device("cpu"), True, transposed)[0]
        scale = torch.full((8, 2, BS), -1.0) if int8 else None
        store_kv(v, cache_slots(v, prompt_rows, prompt, table), prompt_x, scale, triton_kernel=True)
        store_kv(v, cache_slots(v, torch.arange(4), lens, table), step_x, scale, triton_kernel=True)
        pools.append((v, scale))
    (plain, plain_scale), (vt, vt_scale) = pools
    held = (lens + 1).to(torch.int32)
    live = torch.arange(2 * BS)[None, :] < held[:, None]
    values = [pool[table.long()].flatten(1, 2)[live] for pool in (plain, v_values(vt, held, table))]
    assert torch.equal(*values) and values[0].abs().sum() > 0
    assert torch.equal(plain[table[1, 0]], vt[table[1, 0]])  # a block the step filled is V^T (the pool's view)
    assert plain[table[0, 0]].ne(vt[table[0, 0]]).any()  # a partial one as written
    if int8:
        assert torch.equal(vt_scale, plain_scale)
        filled = torch.stack([table[1, 0], table[2, 1]]).long()  # the blocks the step filled have all their scales
        assert (vt_scale[filled] > 0).all()


def test_a_prefills_seal_turns_every_block_it_fills_into_v_transposed():
    """seal_blocks' program looks through SEAL_GROUP tokens at once: stores whose tokens fill several blocks within
    one group (and past it) turn each into V^T, the values read back (v_values) as a plain pool holds them."""
    pytest.importorskip("triton")
    from batchgen.worker.engine.kernels.attention import v_values
    from batchgen.worker.engine.kernels.kv_store import SEAL_GROUP, store_kv
    from batchgen.worker.engine.model_runner import kv_pool

    g = torch.Generator().manual_seed(4)
    blocks = SEAL_GROUP + 3  # one group's tokens each fill a block, and a second group's
    plain, vt = (kv_pool((1, blocks + 1, BS, 2, 32), torch.float16, torch.device("cpu"), True, t)[0]
                 for t in (False, True))
    ends = torch.arange(1, blocks + 1) * BS + BS - 1
    body = torch.cat([torch.arange(b * BS, b * BS + BS - 1) for b in range(1, blocks + 1)])
    for slots in (body, ends):  # each block's first places, then its last ones: a token each, side by side
        x = torch.randn(len(slots), 2, 32, generator=g).half()
        for pool in (plain, vt):
            store_kv(pool, slots, x, triton_kernel=True)
    table = torch.arange(1, blocks + 1, dtype=torch.int32)[:, None]
    held = torch.full((blocks,), BS, dtype=torch.int32)
    assert torch.equal(v_values(vt, held, table)[1:], plain[1:])
    assert torch.equal(vt[1:], plain[1:])  # every block is V^T: the pool's own view reads its values
