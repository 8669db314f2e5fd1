"""StepClock (step_clock.py): the device's own time per engine step and its idle gaps between steps while the
engine had work. On the CPU a mark is the host clock where the step's work was called (CPU work runs as it is
called), so the engine's accounting is checked here for real; the GPU's timing events are measured by the bulk
benchmark. The tiny 8-bit demo Llama, synchronous and overlapped steps."""

import time

import pytest
import torch
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.step_clock import StepClock

from tests.test_llm_engine import PROMPTS, completion, run

pytestmark = pytest.mark.slow


def test_the_clock_counts_gaps_only_between_steps_with_work_pending():
    clock = StepClock(torch.device("cpu"))
    assert not clock.cuda
    a = clock.mark()
    time.sleep(0.02)
    b = clock.mark()
    clock.settle(a, b, prefill=True)  # the first step: nothing before it, no gap
    time.sleep(0.03)
    c = clock.mark()
    time.sleep(0.01)
    d = clock.mark()
    clock.settle(c, d, prefill=False)
    clock.idle()  # drained: the wait for the next request is not a gap
    time.sleep(0.02)
    e, f = clock.mark(), clock.mark()
    clock.settle(e, f, prefill=False)
    stats = clock.as_stats()
    assert stats["num_device_gaps"] == 1 and stats["device_gaps_n"] == {"prefill>decode": 1}
    assert 0.03 <= stats["device_gap_s"] < 0.03 + 0.01 + 0.005
    assert 0.02 <= stats["prefill_device_s"] < 0.03 and 0.01 <= stats["decode_device_s"] < 0.02
    clock.reset()
    assert clock.as_stats() == {"prefill_device_s": 0.0, "decode_device_s": 0.0, "device_gap_s": 0.0,
                                "num_device_gaps": 0, "device_gaps_s": {}, "device_gaps_n": {}}


@pytest.mark.parametrize("overlap", [True, False])
def test_device_time_and_gaps_fit_in_the_engines_wall_time(demo_model_dir, overlap):
    engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4, max_prefill_tokens=24,
                                                overlap_decode=overlap, overlap_prefill=overlap))
    reqs = [completion(f"p{i}", p, max_tokens=12 + i) for i, p in enumerate(PROMPTS[:6])]
    began = time.perf_counter()
    results = run(engine, reqs)
    wall = time.perf_counter() - began
    assert len(results) == 6 and all(r.error is None for r in results.values())
    steps = engine.step_stats.as_stats()
    clock = engine.clock.as_stats()
    assert steps["num_overlapped_steps"] > 0 if overlap else steps["num_overlapped_steps"] == 0
    assert clock["prefill_device_s"] > 0 and clock["decode_device_s"] > 0
    # every step after the first was settled with a gap (the engine never ran dry mid-run), each of them inside
    # the run: device time and gaps add up to at most the wall time
    assert clock["num_device_gaps"] == steps["num_prefill_steps"] + steps["num_decode_steps"] - 1
    assert clock["device_gap_s"] >= 0
    assert sum(clock["device_gaps_n"].values()) == clock["num_device_gaps"]  # by transition: decode>prefill, ...
    assert abs(sum(clock["device_gaps_s"].values()) - clock["device_gap_s"]) < 1e-3
    assert {"prefill>decode", "decode>decode"} <= set(clock["device_gaps_n"])
    device = engine.clock.device_s  # unrounded (the stats round to milliseconds)
    assert device["prefill"] + device["decode"] + engine.clock.gap_s <= wall
    if not overlap:  # a synchronous step's forward is inside its timed region
        assert device["decode"] <= engine.step_stats.decode_s and device["prefill"] <= engine.step_stats.prefill_s
    assert set(clock) <= set(engine.stats().extra)
    from benchmarks.bulk import time_breakdown  # the bulk report's device line reads these stats

    device = time_breakdown(wall, steps | clock)["device"]
    assert device["prefill_s"] == clock["prefill_device_s"] and device["gaps_s"] == clock["device_gap_s"]
    assert 0 < device["busy_fraction"] * wall <= wall + 0.002 and device["rest_s"] >= 0  # stats in whole ms


def test_the_clock_keeps_each_steps_time_where_asked():
    """StepClock.trace: (kind, the kind before it, tokens, rows, device ms, gap ms) per settled step; none kept by default."""
    clock = StepClock(torch.device("cpu"))
    a, b = clock.mark(), clock.mark()
    clock.settle(a, b, prefill=True, tokens=7)
    assert clock.trace is None
    clock.trace = []
    a = clock.mark()
    time.sleep(0.01)
    b = clock.mark()
    clock.settle(a, b, prefill=False, tokens=3, rows=3)
    (kind, before, tokens, rows, device_ms, gap_ms), = clock.trace
    assert (kind, before, tokens, rows) == ("decode", "prefill", 3, 3) and 10 <= device_ms < 30 and gap_ms >= 0
