"""Row compaction (llm_engine.py, --compact-rows, paged KV): when sequences finish, the running rows above them move
down into their rows (block-table rows only), so a decode step computes the running rows and not every row up to
the highest one still running. Against the same engine with it off: the same tokens (greedy, seeded samples, rows
ending by length and on a stop token mid-queue, overlapped and synchronous steps), each decode launch computing just
its running rows, KV blocks all given back (CPU, the tiny 8-bit demo Llama)."""

import pytest
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.kv_blocks import BlockPool
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.scheduler import Scheduler
from batchgen.worker.engine.sequence import SamplingParams, Sequence

from tests.test_llm_engine import PROMPTS, completion, hf_generate_ids
from tests.test_overlap_decode import outputs

pytestmark = pytest.mark.slow


def test_compact_moves_the_highest_rows_into_the_lowest_free_ones():
    blocks = BlockPool(64, 16, 4)
    scheduler = Scheduler(8, max_prefill_tokens=1000, blocks=blocks)
    for i in range(6):
        scheduler.add(Sequence(f"s{i}", [1] * 20, SamplingParams(max_tokens=10), seed=i))
    admitted = scheduler.admit()
    assert [s.row for s in admitted] == [0, 1, 2, 3, 4, 5]
    owned = {s.key: blocks.rows[s.row] for s in admitted}
    blocks.take_changes()
    for seq in (admitted[1], admitted[3]):
        scheduler.finish(seq, "length")
    moves = scheduler.compact()
    assert moves == {5: 1, 4: 3} and sorted(scheduler.running) == [0, 1, 2, 3]
    assert {s.key: blocks.rows[s.row] for s in scheduler.running_seqs()} == {k: owned[k] for k in ("s0", "s5", "s2", "s4")}
    assert blocks.take_changes() == {1: owned["s5"], 3: owned["s4"], 5: [], 4: []}
    assert scheduler.compact() == {} and scheduler.num_decode_rows == 4


@pytest.fixture(scope="module")
def engines(demo_model_dir) -> tuple[LLMEngine, LLMEngine]:
    common = dict(model=str(demo_model_dir), max_batch_size=6)
    return (LLMEngine.from_config(EngineConfig(**common)),
            LLMEngine.from_config(EngineConfig(**common, compact_rows=False)))


def stepped(engine: LLMEngine, reqs, monkeypatch) -> tuple[dict, list[tuple[int, int]]]:
    """Results, and for every decode launch (rows computed, rows running)."""
    launches = []
    decode = engine.runner.decode

    def spy(tokens, positions):
        launches.append((len(positions), len(engine.scheduler.running)))
        return decode(tokens, positions)

    monkeypatch.setattr(engine.runner, "decode", spy)
    results = {r.key: r for r in engine.add(reqs)}
    while engine.num_unfinished:
        for r in engine.step():
            assert r.key not in results, f"{r.key} returned twice"
            results[r.key] = r
    monkeypatch.undo()
    return results, launches


@pytest.mark.parametrize("overlap", [True, False])
def test_same_tokens_fewer_rows_computed(engines, overlap, monkeypatch):
    on, off = engines
    for engine in engines:
        engine.cfg.overlap_decode = overlap
    reqs = [completion(f"p{i}", p, max_tokens=3 + (i * 5) % 19) for i, p in enumerate(PROMPTS[:10])]
    reqs[4] = completion("p4", PROMPTS[4], max_tokens=16, temperature=0.9, top_p=0.8, seed=7)
    reqs[6] = completion("p6", PROMPTS[6], max_tokens=20, temperature=1.1, top_k=5, seed=8)
    ids = hf_generate_ids(off, off.tokenizer(PROMPTS[2])["input_ids"], 12)
    token = next(t for j, t in enumerate(ids) if j >= 2 and t not in ids[:j])  # ends p2 mid-run, unknowable ahead
    reqs[2] = completion("p2", PROMPTS[2], max_tokens=12, stop_token_ids=[token])
    before = {e: (e.step_stats.num_rows_computed, e.step_stats.num_decode_steps) for e in engines}
    want, holes = stepped(off, reqs, monkeypatch)
    got, launches = stepped(on, reqs, monkeypatch)
    assert outputs(got) == outputs(want)
    assert got["p2"].finish_reason == "stop"
    assert all(n == running for n, running in launches), launches  # every launch computes its running rows only
    assert any(n > running for n, running in holes)  # where without it, holes were computed
    computed = {e: (e.step_stats.num_rows_computed - before[e][0]) / (e.step_stats.num_decode_steps - before[e][1])
                for e in engines}
    assert computed[on] < computed[off]
    assert on.blocks.num_used == 0 and off.blocks.num_used == 0
    for engine in engines:
        engine.cfg.overlap_decode = True


def test_the_bulk_workloads_scheduling_computes_only_running_rows_with_compaction():
    """benchmarks.rows_sim (the engine's Scheduler and BlockPool on the bulk workload, no model): the same steps
    either way; without compaction the steps compute holes above the running rows, with it exactly those rows."""
    from benchmarks.rows_sim import simulate

    without, with_ = (simulate(1024, 4023, 64, 4096, 768, compact) for compact in (False, True))
    assert without["decode_steps"] == with_["decode_steps"] and without["prefill_steps"] == with_["prefill_steps"]
    assert with_["mean_rows_computed"] == with_["mean_running_rows"] < without["mean_rows_computed"]
    assert with_["mean_graph_rows"] < without["mean_graph_rows"]


def test_the_cost_model_reads_the_same_kv_in_any_admission_order():
    """rows_sim's decode model: the K/V a workload reads is fixed by its requests, whatever the order; admitting the
    longest first (the whole workload pending) takes fewer, fuller steps."""
    from benchmarks.rows_sim import simulate

    fifo, longest = (simulate(1024, 4007, 64, 8192, 768, True, first) for first in (False, True))
    assert fifo["decode_model_s"]["kv"] == longest["decode_model_s"]["kv"] > 0
    assert longest["decode_steps"] < fifo["decode_steps"] and longest["mean_running_rows"] > fifo["mean_running_rows"]
    model = fifo["decode_model_s"]
    assert abs(model["total"] - (model["steps"] + model["rows"] + model["kv"])) <= 0.02  # three rounded terms
