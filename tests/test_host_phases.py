"""StepStats' named host phases: the engine times what it does besides its steps (slot allocation and growth,
joins, window moves, landing --stream-kv columns, row moves, graph captures, intake, finishing rows), keeps what
runs inside a step apart from what runs between steps, and logs it all in its "engine steps" line, from which
benchmarks/models.py splits a run's generate_s."""

import json
import logging

import pytest
import torch
from batchgen.jobs.schema import Request, SamplingParams
from batchgen.worker.engine import step_stats
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.generic import GenericEngine
from batchgen.worker.engine.protocol import GenerationRequest
from batchgen.worker.engine.slot_batch import CPU_INITIAL_ROWS, SlotBatch, slot_columns
from batchgen.worker.engine.slot_graphs import SlotDecodeGraphs
from batchgen.worker.engine.step_stats import StepStats
from batchgen.worker.factory import build_llm_engine

from tests.models import write_tiny_model
from tests.test_slot_batch import MAX_MODEL_LEN, WORDS, fresh, prompt, wanted


class Clock:
    """perf_counter for step_stats: advances only when told."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(step_stats, "time", fake)
    return fake


def test_phases_add_up_by_name_nested_ones_count_once_and_steps_keep_theirs_apart(clock):
    stats = StepStats()
    for _ in range(2):
        with stats.timed("slot_alloc"):
            clock.now += 1.0
    with stats.timed("row_select"):
        clock.now += 0.5
        with stats.timed("window_move"):  # nested: its 2 s are not row_select's too
            clock.now += 2.0
    with stats.stepping():
        with stats.timed("kv_land"):
            clock.now += 0.25
        stats.add_host("graph_capture", 3.0)
    with stats.engine_call():
        clock.now += 7.0
    out = stats.as_stats()
    assert out["host_s"] == {"row_select": 0.5, "slot_alloc": 2.0, "window_move": 2.0}
    assert out["host_n"] == {"slot_alloc": 2, "row_select": 1, "window_move": 1}
    assert out["step_host_s"] == {"graph_capture": 3.0, "kv_land": 0.25}
    assert out["step_host_n"] == {"kv_land": 1, "graph_capture": 1}
    assert out["engine_s"] == 7.0
    json.dumps(out)  # the "engine steps" log line
    # a phase that raises is still counted, and a step that raises closes
    with pytest.raises(RuntimeError), stats.stepping(), stats.timed("kv_land"):
        clock.now += 1.0
        raise RuntimeError
    with stats.timed("slot_alloc"):
        clock.now += 1.0
    assert stats.step_host_n["kv_land"] == 2 and stats.host_s["slot_alloc"] == 3.0
    assert "engine_s" not in StepStats().as_stats()  # an engine that does not time its calls says nothing


def test_a_slot_batch_times_its_allocation_growth_joins_window_moves_and_row_moves():
    stats = StepStats()
    batch = SlotBatch(fresh(2, [3, 2]), max_rows=32, max_model_len=16, stats=stats)
    assert stats.host_n == {"slot_alloc": 1, "slot_join": 1}
    for _ in range(CPU_INITIAL_ROWS // 2):  # past the first allocation's rows: the slots grow (host RAM: on demand)
        batch.extend(fresh(2, [4, 1]))
    assert batch.layers[0].key_slots.shape[0] > CPU_INITIAL_ROWS
    assert stats.host_n["slot_grow"] == 1 and stats.host_n["slot_join"] == 1 + CPU_INITIAL_ROWS // 2
    layer = batch.layers[0]
    n = batch.num_rows
    for _ in range(slot_columns(16) - batch.end):
        layer.update(torch.zeros(n, 2, 1, 4), torch.zeros(n, 2, 1, 4))
        batch.advance(torch.cat([batch.mask, batch.mask.new_ones(n, 1)], dim=1))
    assert batch.num_window_moves == stats.host_n["window_move"] == 1
    batch.select([0, n - 1])
    assert batch.num_row_moves == 1 and stats.host_n["row_select"] == 1
    assert all(s >= 0 for s in stats.host_s.values()) and not stats.step_host_n
    SlotBatch(fresh(2, [3, 2]), max_rows=4, max_model_len=16, fp8=True, stats=stats)  # fp8: scales from the prefill
    assert stats.host_n["fp8_calibrate"] == 1 and stats.host_n["slot_alloc"] == 2


def steps_line(caplog) -> dict:
    """The engine's last "engine steps" line, as the benchmark reads it."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine steps: ")]
    assert lines
    return json.loads(lines[-1].removeprefix("engine steps: "))


def test_stream_kv_records_its_host_slots_growing_landing_and_moving(demo_model_dir, tmp_path, caplog):
    """--stream-kv on CPU (small-VRAM mode's code, host tensors for the device): two rows first, so the pinned
    slots are allocated for 8, then twelve more join and the slots grow; every decode step lands its columns in
    the host slots, the window moves; the drained line carries the phases."""
    path = write_tiny_model(tmp_path, "bloom", demo_model_dir, num_layers=3)
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=16, offload=True,
                                           max_model_len=80, max_prefill_tokens=48, stream_kv=True))
    assert isinstance(engine, GenericEngine) and engine.kv_stream is not None

    def request(i: int) -> GenerationRequest:
        return GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=" ".join(WORDS[: 1 + (5 * i) % 14]),
                                                  params=SamplingParams(max_tokens=20 + (7 * i) % 30, temperature=0,
                                                                        ignore_eos=True)))

    caplog.set_level(logging.INFO, logger="batchgen.engine")
    assert engine.add([request(0), request(1)]) == []
    engine.step()
    assert engine.batch.host and engine.batch.layers[0].key_slots.shape[0] == CPU_INITIAL_ROWS
    assert engine.add([request(i) for i in range(2, 14)]) == []
    done = 0
    while engine.num_unfinished:
        done += len(engine.step())
    assert done == 14 and engine.batch is None
    stats = engine.step_stats
    assert engine._idle.layers[0].key_slots.shape[0] > CPU_INITIAL_ROWS
    # in the steps: the first prefill's allocation, the joins' growth, each decode's columns landed, window moves
    assert stats.step_host_n["slot_alloc"] == 1 and stats.step_host_n["slot_grow"] >= 1
    assert stats.step_host_n["kv_buffers"] == 1 + stats.step_host_n["slot_grow"]  # pinned columns, device stages
    assert stats.step_host_n["kv_land"] == stats.num_decode_steps
    assert stats.step_host_n["window_move"] == engine._idle.num_window_moves >= 1
    assert stats.step_host_n["slot_join"] >= stats.num_prefill_steps  # one per prefill group
    # between the steps: intake, admission, finishing rows each step, rows leaving
    assert stats.host_n["intake"] == 2 and stats.host_n["row_select"] >= 1
    assert stats.host_n["finish_rows"] == stats.num_prefill_steps + stats.num_decode_steps
    assert sum(stats.step_host_s.values()) <= stats.prefill_s + stats.decode_s
    # the parts are disjoint and all inside the engine's calls
    assert stats.prefill_s + stats.decode_s + sum(stats.host_s.values()) <= stats.engine_s + 1e-6
    line = steps_line(caplog)
    assert line["step_host_n"] == stats.step_host_n and line["host_n"] == stats.host_n
    assert set(line["host_s"]) == set(stats.host_s) and line["engine_s"] > 0


def test_graph_captures_are_timed_inside_the_decode_steps(demo_model_dir, tmp_path, monkeypatch):
    """The engine counts each capture its decode graphs report (CPU: the static forward uncaptured, captures
    stood in for by 0.5 s a new (rows, width))."""
    path = write_tiny_model(tmp_path, "gpt2", demo_model_dir)
    monkeypatch.setattr(GenericEngine, "_why_eager", lambda self: "")
    run = SlotDecodeGraphs.run

    def capturing_run(self, tokens):
        before = set(self.used)
        logits = run(self, tokens)
        self.fake_capture_s = getattr(self, "fake_capture_s", 0.0) + 0.5 * len(self.used - before)
        return logits

    monkeypatch.setattr(SlotDecodeGraphs, "run", capturing_run)
    monkeypatch.setattr(SlotDecodeGraphs, "capture_s", property(lambda self: getattr(self, "fake_capture_s", 0.0)))
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=12,
                                           max_model_len=MAX_MODEL_LEN))
    engine.add([GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=prompt(i), params=SamplingParams(
        max_tokens=wanted(i), temperature=0, ignore_eos=True))) for i in range(6)])
    while engine.num_unfinished:
        engine.step()
    stats, captured = engine.step_stats, len(engine.graphs.used)
    assert captured > 1 and stats.step_host_n["graph_capture"] == captured
    assert stats.step_host_s["graph_capture"] == pytest.approx(0.5 * captured)
    assert stats.step_host_n["graph_setup"] == 1 and "graph_capture" not in stats.host_n


def test_the_benchmark_splits_generate_s_from_the_last_engine_steps_line():
    """benchmarks/models.py reads a `batchgen run --json` log: the last "engine steps" line (the drained one)."""
    from batchgen.producer.cli import JsonLogFormatter

    from benchmarks.models import describe_breakdown, engine_steps, time_breakdown

    def log_line(message: str) -> str:
        return JsonLogFormatter().format(logging.LogRecord("batchgen.engine", logging.INFO, __file__, 1, message,
                                                           None, None))

    early, final = StepStats(prefill_s=1.0), StepStats(prefill_s=2.5, decode_s=25.0, num_decode_steps=64,
                                                       num_prefill_steps=8, engine_s=40.0)
    final.host_s, final.host_n = {"row_select": 3.0, "finish_rows": 1.5}, {"row_select": 9, "finish_rows": 72}
    final.step_host_s, final.step_host_n = {"slot_grow": 4.0}, {"slot_grow": 3}
    log = "\n".join([log_line("engine up: 'x'"), log_line("engine steps: " + json.dumps(early.as_stats())),
                     "a tqdm line", log_line("engine steps: " + json.dumps(final.as_stats())),
                     log_line("done")])
    steps = engine_steps(log)
    assert steps["prefill_s"] == 2.5 and steps["host_s"] == {"finish_rows": 1.5, "row_select": 3.0}
    split = time_breakdown(43.4, steps)
    assert split == {"host_s_total": 4.5, "unaccounted_s": pytest.approx(43.4 - 2.5 - 25.0 - 4.5, abs=1e-3),
                     "outside_engine_s": pytest.approx(3.4, abs=1e-3)}
    line = describe_breakdown({"generate_s": 43.4, "steps": steps, **split})
    assert "host 4.50 [row_select 3.00/9, finish_rows 1.50/72]" in line and "slot_grow 4.00/3" in line
    assert engine_steps(log_line("engine up")) is None and time_breakdown(1.0, None) == {"unaccounted_s": None}
