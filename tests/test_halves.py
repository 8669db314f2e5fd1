"""--decode-halves: a paged decode step as two half-batches (halves.py), the halves' layers interleaved so that one
half's projections can run while the other attends. On the CPU the halves run one after the other in that order;
every row's arithmetic is the one-batch step's, so logits, cache writes and served tokens match it."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from batchgen.worker.engine import halves, model_runner
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.llama import decode_step, gather_rows
from batchgen.worker.engine.llm_engine import LLMEngine

from tests.test_llm_engine import PROMPTS, completion, hf_greedy, run
from tests.test_paged_kv import BS, _paged, _tiny_parts


def _paged_state(rows: int, seed: int):
    """A two-layer paged cache of random K/V for rows rows (two blocks each, shuffled) and its block table."""
    g = torch.Generator().manual_seed(seed)
    slot_k = torch.randn(2, rows, 2 * BS, 2, 16, generator=g)
    slot_v = torch.randn(2, rows, 2 * BS, 2, 16, generator=g)
    layers = [_paged(slot_k[i], slot_v[i], num_blocks=2 * rows + 4, seed=seed) for i in range(2)]
    paged_k, paged_v = torch.stack([k for k, _, _ in layers]), torch.stack([v for _, v, _ in layers])
    return paged_k, paged_v, layers[0][2]


@pytest.mark.parametrize(("attention", "rows"), [("sdpa", 7), ("sdpa", 8), ("triton", 5)])
def test_two_halves_give_the_one_batch_steps_logits_and_cache(attention, rows):
    """An odd row count too (the halves are n // 2 and the rest); the Triton kernel under its interpreter."""
    if attention == "triton":
        pytest.importorskip("triton")
    dtype = torch.float16 if attention == "triton" else torch.float32
    parts = _tiny_parts(dtype)
    k, v, table = _paged_state(rows, seed=rows)
    k, v = k.to(dtype), v.to(dtype)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (rows,), generator=g)
    positions = torch.randint(0, 2 * BS, (rows,), generator=g)
    one_k, one_v = k.clone(), v.clone()
    with torch.inference_mode():
        want = decode_step(parts, ids, positions, one_k, one_v, 2 * BS, attention, block_table=table)
        got = halves.decode_halves(parts, ids, positions, k, v, 2 * BS, attention, None, None, table)
    assert got.shape == want.shape == (rows, 128)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for layer in range(2):  # each half wrote its rows' new K/V where the block table puts them
        for cache, one in ((k, one_k), (v, one_v)):
            torch.testing.assert_close(gather_rows(cache[layer], table, rows, 2 * BS),
                                       gather_rows(one[layer], table, rows, 2 * BS), atol=tol, rtol=tol)
    assert not torch.equal(k, _paged_state(rows, seed=rows)[0].to(dtype))  # the step wrote K


def test_only_a_paged_resident_step_of_min_rows_takes_halves():
    parts = _tiny_parts(torch.float32)
    table = torch.zeros(halves.MIN_ROWS, 2, dtype=torch.int32)
    assert halves.halves_apply(parts, halves.MIN_ROWS, table)
    assert not halves.halves_apply(parts, halves.MIN_ROWS - 1, table)
    assert not halves.halves_apply(parts, halves.MIN_ROWS, None)  # a slot cache: a half is not a block table's rows
    streamed = dataclasses.replace(parts, layer_executor=object())
    assert not halves.halves_apply(streamed, halves.MIN_ROWS, table)


@pytest.mark.slow
@pytest.mark.parametrize("load_in_8bit", [True, False])
def test_an_engine_with_decode_halves_serves_what_the_one_batch_engine_does(demo_model_dir, monkeypatch,
                                                                           load_in_8bit):
    """The real int8 model (and fp32): greedy and seeded requests through an engine whose decode steps of >= 2 rows
    run as halves give the one-batch engine's tokens, and HF generate's where greedy."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2].shape[0])
        return halves.decode_halves(*args, **kwargs)

    monkeypatch.setattr(halves, "MIN_ROWS", 2)
    monkeypatch.setattr(model_runner, "decode_halves", counted)
    cfg = EngineConfig(model=str(demo_model_dir), max_batch_size=6, load_in_8bit=load_in_8bit, attention="sdpa")
    reqs = [completion(f"g{i}", p, max_tokens=8) for i, p in enumerate(PROMPTS[:5])]
    reqs += [completion("s0", PROMPTS[0], max_tokens=8, temperature=0.9, top_p=0.9, seed=3)]
    one = LLMEngine.from_config(cfg)
    want = run(one, reqs)
    assert calls == []
    two = LLMEngine.from_config(dataclasses.replace(cfg, decode_halves=True))
    got = run(two, reqs)
    assert calls and max(calls) >= 4 and min(calls) >= 2  # decode steps of several rows ran as halves
    assert two.stats().extra["decode_halves"] == 1 and one.stats().extra["decode_halves"] == 0
    assert {k: r.text for k, r in got.items()} == {k: r.text for k, r in want.items()}
    for r in reqs[:5]:
        ids = two.tokenizer(r.request.prompt)["input_ids"]
        assert got[r.key].text == hf_greedy(two, ids, 8)[0]


@pytest.mark.slow
def test_the_halves_benchmark_runs_end_to_end_on_cpu(tmp_path):
    """benchmarks/halves.py --tiny: both modes three times on one engine (the last profiled), their tokens the
    same."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.halves", "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "halves.json").read_text())
    assert [r["halves"] for r in report["runs"]] == [False, True] * 3
    assert [r["profile"] is not None for r in report["runs"]] == [False] * 4 + [True] * 2
    assert all(r["decode_steps"] == report["max_tokens"] - 1 and r["decode_ms_per_step"] > 0 for r in report["runs"])
    assert report["agreement_halves_vs_one_batch"] == report["agreement_one_batch_twice"] == 1.0
    assert report["agreement_halves_twice"] == 1.0
