"""Small-VRAM mode at its edges: stage-slot counts the piecewise decode cannot run with, and what the planner counts
for the device K/V of the layers CPU attention leaves on the device. Tiny random Llama models on CPU (the streamer's
real code path with device "cpu"), against the resident engine's greedy output."""

import pytest
from batchgen.worker.demo_model import write_demo_model
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.offload.build import build_streaming_engine
from batchgen.worker.offload.plan import plan_streaming

from tests.test_offload import greedy, offload


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Three layers: with none resident, layers 0, 1 and 2 all stream, each next to another streamed one."""
    return write_demo_model(tmp_path_factory.mktemp("demo3"), num_layers=3, chat_template=False)


@pytest.fixture(scope="module")
def resident(model_dir):
    return greedy(LLMEngine.from_config(EngineConfig(model=str(model_dir), max_batch_size=4)))


def test_one_stage_slot_cannot_stream_two_adjacent_layers_for_cpu_attention(model_dir, resident):
    """A piecewise decode step (CPU attention) runs the rest of layer i − 1 and the start of layer i in one piece,
    so both layers' weights are on the device at once: one stage slot cannot hold two adjacent streamed layers.
    That lever (benchmarks/small_vram.py's slots) is refused at build instead of decoding from overwritten
    weights; with the streamed layers apart (a resident one between them) one slot serves and the output is the
    resident engine's."""
    cfg = EngineConfig(model=str(model_dir), max_batch_size=4, offload=True)
    with pytest.raises(ValueError, match="stage slot"):
        build_streaming_engine(cfg, kv_placement="cpu", num_resident=0, num_slots=1)
    apart = build_streaming_engine(cfg, kv_placement="cpu", num_resident=1, num_slots=1)
    assert offload(apart).streamer.resident == {1} and len(offload(apart).streamer.stages) == 1
    assert greedy(apart) == resident
    device = build_streaming_engine(cfg, kv_placement="device", num_resident=0, num_slots=1)  # one layer at a time
    assert greedy(device) == resident


@pytest.mark.parametrize("max_rows", [3, 4])
def test_the_plan_counts_the_device_kv_rows_the_piecewise_halves_allocate(model_dir, max_rows):
    """Layers whose K/V CPU attention keeps on the device get a buffer row for each of the piecewise halves' padded
    rows (an even count, piecewise.split_slots): the plan counts those, so a plan at the edge of the cap does not
    allocate a row of K/V per device layer past it."""
    cfg = EngineConfig(model=str(model_dir), max_batch_size=max_rows, offload=True)
    engine = build_streaming_engine(cfg, kv_placement="cpu", num_resident=0, num_device_kv_layers=2)
    plan, streamer, attention = offload(engine).plan, offload(engine).streamer, engine.runner.cpu_attention
    assert plan.max_rows == max_rows and len(attention.device_layers) == 2
    weights = sum(s.numel() for s in streamer.stages) + sum(streamer.layer_bytes[i] for i in streamer.resident)
    kv = attention.device_k.nbytes + attention.device_v.nbytes
    budget = engine.budget
    counted = plan.device_bytes - budget.prefill_bytes - plan.max_rows * budget.activation_bytes_per_row
    assert weights + kv <= counted
    # at exactly that budget the plan still takes every row; a byte less, it does not
    args = dict(layer_bytes=streamer.layer_bytes, num_layers=3, kv_bytes_per_token_layer=100, max_model_len=10,
                activation_bytes_per_row=0, prefill_bytes=0, max_rows=max_rows, kv_placement="cpu",
                num_resident=0, num_device_kv_layers=2)
    exact = weights + 2 * (max_rows + max_rows % 2) * 100 * 10
    assert plan_streaming(budget_bytes=exact, **args).max_rows == max_rows
    assert plan_streaming(budget_bytes=exact - 1, **args).max_rows < max_rows
