"""Small-VRAM mode: a model bigger than the VRAM cap streams its decoder layers from host memory.

On CPU the streaming executor runs its real code path with device "cpu" (host buffers → stage buffers
are CPU→CPU copies, stream and event calls are no-ops). Wherever the KV cache lives — on the device, or in host
memory attended by the host CPU — and with some layers resident or none, the greedy output is token-for-token the
resident engine's.
"""

import functools

import pytest
import torch
from batchgen.jobs.schema import Request, SamplingParams
from batchgen.worker.demo_model import write_demo_model
from batchgen.worker.engine import budget
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.cuda_graphs import batch_buckets
from batchgen.worker.engine.llama import prompt_groups
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.protocol import GenerationRequest
from batchgen.worker.factory import build_llm_engine
from batchgen.worker.offload.build import (
    Offload,
    build_streaming_engine,
    streaming_prefill_tokens,
    wants_streaming,
)
from batchgen.worker.offload.layer_stream import (
    LINEARS,
    DenseLinear,
    LayerStreamer,
    _chunks,
    _next_in_slot,
    device_kv_layers,
    resident_layers,
)
from batchgen.worker.offload.piecewise import split_halves, split_slots
from batchgen.worker.offload.plan import int8_weights_bytes, plan_streaming

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "batch", "generation", "keeps", "the", "gpu", "busy", "all", "night", "long"]
PROMPTS = [" ".join(WORDS[i % 7: i % 7 + 2 + (i * 5) % 11]) for i in range(10)]
MAX_TOKENS = [3 + (i * 7) % 17 for i in range(10)]
GB = 10**9


def greedy(engine: LLMEngine) -> dict[str, tuple[str, str, int]]:
    requests = [GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=p,
                                                   params=SamplingParams(temperature=0.0, max_tokens=m)))
                for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True))]
    assert engine.add(requests) == []
    results = {}
    while engine.num_unfinished:
        for r in engine.step():
            assert r.error is None, r.error
            results[r.key] = (r.text, r.finish_reason, r.completion_tokens)
    return results


def offload(engine: LLMEngine) -> Offload:
    """What small-VRAM mode set up beside the runner: its plan and weight streamer."""
    (report,) = engine.reporters
    return report


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Six layers, so a plan can keep some resident and stream the rest through its stage buffers."""
    return write_demo_model(tmp_path_factory.mktemp("demo6"), num_layers=6, chat_template=False)


@pytest.fixture(scope="module")
def resident(model_dir):
    """The resident engine's default: the streamed one runs the same int8 arithmetic (outlier kernel, rotated down
    projections; tests/test_offload_int8.py plants outliers)."""
    return greedy(LLMEngine.from_config(EngineConfig(model=str(model_dir), max_batch_size=4)))


@pytest.mark.slow
@pytest.mark.parametrize("kv_placement, num_resident",
                         [("device", 0), ("device", 2), ("cpu", 0), ("cpu", 3)])
def test_streamed_greedy_output_equals_the_resident_engine(model_dir, resident, kv_placement, num_resident):
    cfg = EngineConfig(model=str(model_dir), max_batch_size=4, offload=True)
    engine = build_streaming_engine(cfg, kv_placement=kv_placement, num_resident=num_resident)
    plan, streamer = offload(engine).plan, offload(engine).streamer
    assert plan.num_resident == num_resident and plan.kv_placement == kv_placement
    assert streamer.num_layers == 6 and engine.runner.parts.layer_executor is streamer
    assert len(streamer.stages) == 2
    assert greedy(engine) == resident
    stats = engine.stats().extra
    assert stats["offload_resident_layers"] == num_resident and stats["max_rows"] == 4
    assert stats["offload_cpu_attention"] == (kv_placement == "cpu")
    assert stats["prefill_device_s"] > 0 and stats["decode_device_s"] > 0  # StepClock timed the steps
    engine.reset_timing()  # whatever the placement: a benchmark's timed run apart from its warm-up
    assert engine.stats().extra["prefill_device_s"] == engine.stats().extra["decode_device_s"] == 0
    if kv_placement == "cpu":  # the native host kernel (this host has a compiler), not the inductor fallback
        assert stats["offload_cpu_attention_native"] == 1
        assert stats["offload_piecewise_graphs"] == stats["offload_piecewise_graph_count"] == 0  # no CUDA here
        by_layer = stats["offload_cpu_attention_wait_s_by_layer"]  # every layer attended on the host waited
        assert len(by_layer) == 6 and sum(by_layer) == pytest.approx(stats["offload_cpu_attention_wait_s"], abs=0.01)
        assert "offload_copy_gap_s" not in stats  # copies are timed on CUDA only
        stats = engine.stats().extra
        assert stats["offload_cpu_attention_kernel_s"] == 0 and not any(stats["offload_cpu_attention_wait_s_by_layer"])


@pytest.mark.slow
@pytest.mark.parametrize("num_resident, num_device_kv", [(2, 2), (0, 3)])
def test_cpu_attention_with_some_layers_kv_on_the_device_gives_the_same_output(model_dir, resident, num_resident,
                                                                                num_device_kv):
    """Layers the planner keeps the KV of on the device are attended there, inside the GPU work between host
    attentions (piecewise), the others on the host CPU: the output is still the resident engine's."""
    cfg = EngineConfig(model=str(model_dir), max_batch_size=4, offload=True)
    engine = build_streaming_engine(cfg, kv_placement="cpu", num_resident=num_resident,
                                    num_device_kv_layers=num_device_kv)
    attention = engine.runner.cpu_attention
    assert len(attention.device_layers) == num_device_kv == engine.stats().extra["offload_device_kv_layers"]
    assert not set(attention.device_layers) & engine.runner.streamer.resident  # spread over the streamed layers
    assert attention.keys.shape[0] == 6 - num_device_kv  # the host cache holds only the host layers' K/V
    kernel_s = attention.seconds["kernel"]
    assert greedy(engine) == resident
    assert attention.seconds["kernel"] > kernel_s and attention.device_k.abs().sum() > 0  # both sides attended
    assert attention.seconds["prefill_store"] > 0  # the prefills put the host layers' K/V into the cache, timed
    assert {"offload_cpu_attention_prefill_store_s", "offload_cpu_attention_prefill_wait_s"} <= engine.stats().extra.keys()


@pytest.mark.slow
def test_offload_flag_routes_from_config_to_the_streaming_engine(model_dir, resident):
    engine = build_llm_engine(EngineConfig(model=str(model_dir), max_batch_size=4, offload=True))
    assert isinstance(engine.runner.parts.layer_executor, LayerStreamer) and offload(engine).plan.max_rows == 4
    assert greedy(engine) == resident


def test_auto_offload_only_on_cuda_when_int8_weights_exceed_the_cap(model_dir):
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    assert not wants_streaming(EngineConfig(model=str(model_dir), max_vram_bytes=1), cpu, torch.float32)
    assert wants_streaming(EngineConfig(model=str(model_dir), max_vram_bytes=1, vram_reserve_bytes=0), cuda, torch.float16)
    assert not wants_streaming(EngineConfig(model=str(model_dir), max_vram_bytes=GB), cuda, torch.float16)
    assert not wants_streaming(EngineConfig(model=str(model_dir), max_vram_bytes=1, offload=False), cuda, torch.float16)


class _Llama13B:
    hidden_size, intermediate_size, num_hidden_layers = 5120, 13824, 40
    num_attention_heads = num_key_value_heads = 40
    vocab_size, tie_word_embeddings = 32000, False


def test_a_prefill_admits_fewer_tokens_where_the_host_has_little_memory_for_their_staging():
    mib = 2**20  # a 13B token's K/V in fp16: 2 × 40 layers × 5120 × 2 bytes = 800 KiB of pinned staging
    assert streaming_prefill_tokens(_Llama13B, 2, 128 * 1024 * mib) == 8192
    assert streaming_prefill_tokens(_Llama13B, 2, 16 * 1024 * mib) == 16 * 1024 // 8 * 1024 // 800
    assert streaming_prefill_tokens(_Llama13B, 2, 1024 * mib) == 1024  # never below one group
    assert streaming_prefill_tokens(_Llama13B, 2, None) == 8192


def test_13b_weighs_about_13_gb_in_int8():
    assert 13.2 * GB < int8_weights_bytes(_Llama13B) < 13.5 * GB


LAYER_13B = 5120 * (4 * 5120 + 3 * 13824)  # int8 bytes of one decoder layer
KV_13B = 2 * 40 * 128 * 2  # K+V bytes of one token in one layer, fp16


def plan_13b(**kwargs):
    args = dict(budget_bytes=5 * GB, layer_bytes=LAYER_13B, num_layers=40, kv_bytes_per_token_layer=KV_13B,
                max_model_len=256, activation_bytes_per_row=2 * 10**6, prefill_bytes=300 * 10**6, max_rows=64)
    return plan_streaming(**{**args, **kwargs})


def test_13b_in_6_gib_keeps_the_kv_on_the_host_for_64_rows():
    plan = plan_13b(cpu_attention_cost=0.3)
    assert plan.kv_on_host and plan.max_rows == 64
    assert 0 < plan.num_resident < 40 and plan.device_bytes <= 5 * GB
    device = plan_13b(kv_placement="device")
    assert not device.kv_on_host and device.max_rows < 64 and device.tokens_per_streamed_gb < plan.tokens_per_streamed_gb


def test_everything_resident_when_it_fits_and_no_plan_when_nothing_does():
    plan = plan_13b(budget_bytes=40 * GB)
    assert plan.num_resident == 40 and not plan.kv_on_host and plan.streamed_bytes_per_step == 0
    assert plan_13b(budget_bytes=LAYER_13B) is None  # not even the two stage buffers fit
    assert plan_13b(num_resident=3).num_resident == 3
    with pytest.raises(ValueError):
        plan_13b(kv_placement="disk")


def test_cpu_attention_frees_the_device_from_the_kv_and_wins_only_when_the_host_reads_fast_enough():
    kv_cpu = 2 * KV_13B  # the host cache is float32
    device = plan_13b()
    fast = plan_13b(cpu_kv_bytes_per_token_layer=kv_cpu, cpu_attention_cost=0.3)
    assert fast.kv_placement == "cpu" and fast.max_rows == 64 and fast.num_resident > device.num_resident
    assert fast.streamed_bytes_per_step == (40 - fast.num_resident) * LAYER_13B  # weights only cross the bus
    assert fast.device_bytes == 300 * 10**6 + 64 * 2 * 10**6 + (fast.num_resident + 2) * LAYER_13B  # 2 stages
    slow = plan_13b(cpu_kv_bytes_per_token_layer=kv_cpu, cpu_attention_cost=5.0)
    assert slow == device and device.kv_placement == "device" and device.max_rows < 64
    assert plan_13b(cpu_kv_bytes_per_token_layer=kv_cpu) == device  # unmeasured: not chosen
    assert plan_13b(kv_placement="cpu").kv_placement == "cpu"


def test_attention_activations_are_spared_only_where_the_cpu_attends_every_layer():
    """A row's device attention share (scores, a K/V copy) is not budgeted where no layer attends on the device:
    the room goes to resident layers; a plan with device-KV layers still pays it."""
    cpu = dict(kv_placement="cpu", cpu_attention_cost=0.3, activation_bytes_per_row=7 * 10**6)
    full = plan_13b(**cpu, num_device_kv_layers=0)
    spared = plan_13b(**cpu, num_device_kv_layers=0, attention_bytes_per_row=5 * 10**6)  # 64 rows: > a layer
    assert spared.num_resident == full.num_resident + 1
    assert spared.device_bytes == full.device_bytes - 64 * 5 * 10**6 + LAYER_13B
    with_device_kv = dict(cpu, num_device_kv_layers=2)
    assert plan_13b(**with_device_kv, attention_bytes_per_row=5 * 10**6) == plan_13b(**with_device_kv)


def test_the_prefill_budget_covers_a_prompt_longer_than_a_group(tmp_path):
    """A prompt longer than a prefill group runs as a group of its own: the plan budgets the longest prompt's
    activations (and, with sdpa on this CPU, its T×T scores), not a group's."""
    model = write_demo_model(tmp_path, num_layers=2, max_position_embeddings=2048, chat_template=False)
    cfg = EngineConfig(model=str(model), max_batch_size=2, offload=True, max_model_len=2048, max_prefill_tokens=4096)
    engine = build_streaming_engine(cfg, kv_placement="cpu")
    c, bytes_ = engine.model.config, engine.runner.kv_dtype_bytes
    longest = budget.estimate_prefill_bytes(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                            num_heads=c.num_attention_heads, num_tokens=2048, dtype_bytes=bytes_)
    assert engine.runner.attention == "sdpa"
    assert engine.budget.prefill_bytes == longest + 2 * 4096 * c.hidden_size * bytes_  # + the residual stream


@pytest.mark.slow
@pytest.mark.parametrize("kv_dtype, min_equal", [("bfloat16", 7), ("int8", 7)])
def test_lossy_host_kv_dtypes_round_only_some_tokens(model_dir, resident, kv_dtype, min_equal):
    """BATCHGEN_HOST_KV_DTYPE=bfloat16 / int8: the CPU-attention cache reads fewer bytes per step. Its K/V
    rounding is lossy, which is why both are opt-in: on this random tiny model a near-tie greedy token may
    flip in a few of the 10 requests, the rest stay identical to the exact path."""
    cfg = EngineConfig(model=str(model_dir), max_batch_size=4, offload=True, host_kv_dtype=kv_dtype)
    engine = build_streaming_engine(cfg, kv_placement="cpu")
    out = greedy(engine)
    attention = engine.runner.cpu_attention
    assert attention.keys.dtype == attention.values.dtype == getattr(torch, kv_dtype)
    assert {k: v[1:] for k, v in out.items()} == {k: v[1:] for k, v in resident.items()}  # lengths, finish reasons
    equal = sum(out[k] == resident[k] for k in resident)
    assert equal >= min_equal, f"{equal} of 10 requests equal"
    with pytest.raises(ValueError, match="host_kv_dtype"):
        EngineConfig(model=str(model_dir), host_kv_dtype="float64")


def test_layers_whose_kv_stays_on_the_device_take_no_host_memory():
    """The host cache holds only the host-attended layers' K/V, so where host memory limits the rows, keeping
    some layers' KV on the device admits more of them."""
    row_layer = KV_13B * 256  # one row's K/V of one layer at max_model_len
    host = 64 * 30 * row_layer
    plan = functools.partial(plan_13b, kv_placement="cpu", budget_bytes=8 * GB, host_bytes=host)
    assert plan(num_device_kv_layers=10).max_rows == 64
    assert plan(num_device_kv_layers=0).max_rows == 64 * 30 // 40
    chosen = plan(cpu_attention_cost=1.0)  # the planner's own choice: the fewest device-KV layers for all 64 rows
    assert chosen.max_rows == 64 and chosen.num_device_kv_layers == 10


def test_a_slow_host_cpu_keeps_every_layers_kv_on_the_host_and_the_weights_resident():
    """However slow the host's attention, the planner does not trade resident weights for device-KV layers: the
    kernel and the weight copies read the same host memory, so a device-KV layer adds more copied bytes than it
    spares the kernel (measured slower; docs/benchmarks.md). A slow host loses "cpu" to "device"."""
    kv_cpu = KV_13B
    fast = plan_13b(kv_placement="cpu", cpu_kv_bytes_per_token_layer=kv_cpu, cpu_attention_cost=0.5)
    slow = plan_13b(kv_placement="cpu", cpu_kv_bytes_per_token_layer=kv_cpu, cpu_attention_cost=2.0)
    assert fast == slow and slow.num_device_kv_layers == 0
    assert plan_13b(cpu_kv_bytes_per_token_layer=kv_cpu, cpu_attention_cost=5.0).kv_placement == "device"
    assert plan_13b(kv_placement="cpu", cpu_attention_cost=2.0, num_device_kv_layers=1).num_device_kv_layers == 1
    assert device_kv_layers(10, {1, 5}, 2) == (3, 8) and device_kv_layers(4, {1}, 4) == (0, 1, 2, 3)


@pytest.mark.slow
def test_three_stage_slots_stream_the_same_output(model_dir, resident):
    """The number of stage slots (two by default, plan.STAGE_SLOTS) is a lever the benchmark sets: the planner
    leaves room for every slot, and the layers cycle through them, with the same output."""
    cfg = EngineConfig(model=str(model_dir), max_batch_size=4, offload=True)
    engine = build_streaming_engine(cfg, kv_placement="cpu", num_resident=2, num_slots=3)
    streamer = offload(engine).streamer
    assert offload(engine).plan.num_slots == 3
    assert len(streamer.stages) == 3 and len(set(streamer.slot_of.values())) == 3
    assert greedy(engine) == resident


@pytest.mark.slow
def test_a_piece_waits_for_the_qkv_of_its_second_layer_and_all_of_its_first(model_dir):
    """Piecewise decode (lag 1): yield i runs the rest of layer i − 1 and layer i up to its attention, so it waits
    for all of layer i − 1 and only layer i's q/k/v, which each copy puts in first. (The waits are CUDA events,
    no-ops here: a recording stream object stands in for them; the GPU test replays the same schedule.)"""
    cfg = EngineConfig(model=str(model_dir), max_batch_size=4, offload=True)
    streamer = offload(build_streaming_engine(cfg, kv_placement="cpu", num_resident=0)).streamer
    specs = streamer.specs[0]
    assert [s.name for s in specs[:3]] == list(LINEARS[:3])  # q/k/v, with their scales, lead the layer's buffer
    assert streamer.head_bytes[0] == specs[3].offset < streamer.stages[0].numel()
    assert all(s.offset + s.shape[0] * s.shape[1] <= specs[0].scb_offset for s in specs[:3])
    log = []

    class Recording(type(streamer.streams)):
        def record_copied(self, slot, *, head=False):
            log.append(("copied", slot, head))

        def compute_waits_for_copy(self, slot, *, head=False):
            log.append(("wait", slot, head))

    streamer.streams = Recording(torch.device("cpu"), len(streamer.stages))
    for _ in range(2):  # the second forward starts from the copies the first one queued for it
        for i in streamer.schedule(lag=1):
            log.append(("yield", i))
    yields = [k for k, e in enumerate(log) if e[0] == "yield"]
    for k, start in zip(yields, [-1] + yields[:-1], strict=True):
        i, waits = log[k][1], {e for e in log[start + 1:k] if e[0] == "wait"}
        expected = {("wait", streamer.slot_of[i], True)} if i < streamer.num_layers else set()
        expected |= {("wait", streamer.slot_of[i - 1], False)} if i > 0 else set()
        assert waits == expected, (i, waits)
    copies = [e for e in log if e[0] == "copied"]
    heads, wholes = copies[::2], copies[1::2]  # each copy: its q/k/v, then the whole layer, in the same slot
    assert heads and all(h[2] and not w[2] and h[1] == w[1] for h, w in zip(heads, wholes, strict=True))


def test_device_kv_layers_never_cost_rows():
    """With CPU attention rows cost the device next to nothing, so the plan takes all it can: a slightly faster step
    for fewer rows would run the batch's last requests in an extra wave of steps (scored by rows per step alone,
    with device-KV layers weighed for speed, this case took 56 rows and 10 such layers)."""
    plan = plan_13b(kv_placement="cpu", cpu_attention_cost=2.0, budget_bytes=4 * GB)
    assert plan.max_rows == 64 and plan.num_device_kv_layers == 0 and plan.device_bytes <= 4 * GB
    assert plan_13b(kv_placement="cpu", cpu_attention_cost=2.0, budget_bytes=4 * GB, max_rows=10).max_rows == 10


@pytest.mark.parametrize("max_rows", [1, 2, 5, 63, 64, 200])
def test_a_step_splits_in_two_halves_that_cover_its_rows_once(max_rows):
    """Piecewise decode runs a step as two halves: together they cover rows [0, n) once; with graphs the first
    half is a whole bucket (its padding would land on the second half's rows) and both fit the buffers."""
    buckets = batch_buckets(split_slots(max_rows) // 2)
    for n in range(1, max_rows + 1):
        for graphs in (True, False):
            halves = split_halves(n, buckets if graphs else None)
            assert [r for lo, hi, _ in halves for r in range(lo, hi)] == list(range(n))
            assert all(hi - lo <= b for lo, hi, b in halves) and halves[-1][0] + halves[-1][2] <= split_slots(max_rows)
            if graphs:
                assert halves[0][1] - halves[0][0] == halves[0][2] and all(b in buckets for _, _, b in halves)
            assert len(halves) == min(n, 2)


def test_resident_layers_are_spread_and_slots_cycle_over_the_streamed_ones():
    """The resident layers sit between streamed ones (the bus keeps copying through them) and each slot's next
    layer wraps to the next forward."""
    spread = resident_layers(40, 7)
    assert len(spread) == 7 and min(spread) > 0 and max(spread) < 39
    gaps = sorted(b - a for a, b in zip(sorted(spread), sorted(spread)[1:], strict=False))
    assert gaps[-1] - gaps[0] <= 1
    assert resident_layers(6, 6) == set(range(6))
    streamed = [0, 2, 3, 5, 6]
    slots = {i: k % 2 for k, i in enumerate(streamed)}
    assert _next_in_slot(streamed, slots) == {0: 3, 3: 6, 6: 0, 2: 5, 5: 2}
    assert _chunks(0, 10, 4) == [(0, 4), (4, 8), (8, 10)] and _chunks(3, 3, 4) == []  # a layer's copies


def test_prompt_groups_pack_whole_prompts_up_to_the_token_limit():
    assert prompt_groups([0, 5, 10, 15], 10) == [(0, 2), (2, 3)]
    assert prompt_groups([0, 20, 25], 10) == [(0, 1), (1, 2)]  # a longer prompt is a group of its own
    assert prompt_groups([0, 3, 6], 100) == [(0, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("kv_placement", ["device", "cpu"])
def test_a_prefill_in_groups_of_prompts_gives_the_same_output(model_dir, resident, kv_placement):
    """Small-VRAM prefill streams each layer once for every admitted prompt and runs the layer over groups of
    whole prompts (here at most 8 tokens, so every prefill has several groups): the output does not change."""
    cfg = EngineConfig(model=str(model_dir), max_batch_size=4, offload=True)
    engine = build_streaming_engine(cfg, kv_placement=kv_placement, num_resident=2)
    engine.runner.prefill_group_tokens = 8
    calls = []
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda rows, prompts: calls.append(prompt_groups(
        [sum(len(p) for p in prompts[:i]) for i in range(len(prompts) + 1)], 8)) or prefill(rows, prompts)
    assert greedy(engine) == resident
    assert max(len(groups) for groups in calls) >= 2


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("host_kv_dtype", ["auto", "int8"])
def test_piecewise_cuda_graphs_replay_what_the_eager_pieces_compute(model_dir, host_kv_dtype):
    """With CPU attention the GPU work between two host attentions replays from CUDA graphs (piecewise), two
    layers' KV staying on the device and attended inside the graphs (FlashAttention); on the same device, in
    float16, it computes exactly what the same pieces compute launched one by one, with the host cache in the
    compute dtype or int8 (quantized inside the graphs). (In bfloat16, small-VRAM's default on CUDA, a graph's
    batch-bucket padding changed a near-tie greedy token in 2 of 10 requests on an H100: its kernels are not
    batch-size invariant there.)"""
    out = {}
    for graphs in (False, True):
        cfg = EngineConfig(model=str(model_dir), max_batch_size=4, offload=True, device="cuda", cuda_graphs=graphs,
                           compute_dtype="float16", host_kv_dtype=host_kv_dtype)
        engine = build_streaming_engine(cfg, kv_placement="cpu", num_resident=2, num_device_kv_layers=2)
        stats = engine.stats().extra
        assert stats["offload_piecewise_graphs"] == int(graphs)
        buckets = len(engine.runner.piecewise.buckets)  # both halves of every bucket, each piece
        assert stats["offload_piecewise_graph_count"] == graphs * buckets * 2 * (engine.runner.parts.num_layers + 1)
        assert stats["offload_overhead_now_gib"] > 0 and stats["offload_overhead_at_plan_gib"] > 0
        assert len(engine.runner.cpu_attention.device_layers) == 2
        assert engine.runner.parts.embed.weight.device.type == "cpu"  # the table stays on the host
        out[graphs] = greedy(engine)
        stats = engine.stats().extra  # the weight copies, timed on the GPU: 4 streamed layers a forward at least
        assert stats["offload_copy_bytes"] >= 4 * min(engine.runner.streamer.layer_bytes)
        assert stats["offload_copy_busy_s"] > 0 and stats["offload_copy_gb_s_while_busy"] > 0
        streamed = {str(i) for i in range(engine.runner.parts.num_layers) if engine.runner.streamer.host[i] is not None}
        assert set(stats["offload_copy_gap_s_by_layer"]) <= streamed and stats["offload_copy_gap_s"] >= 0
    assert out[True] == out[False]


@pytest.fixture(scope="module")
def resident_with(model_dir):
    """The resident engine's greedy output with some modules kept in the compute dtype (--fp16-modules)."""
    outputs = {}

    def get(fp16_modules: tuple[str, ...], kernel: str = "auto"):
        if (fp16_modules, kernel) not in outputs:
            cfg = EngineConfig(model=str(model_dir), max_batch_size=4, fp16_modules=fp16_modules, int8_kernel=kernel)
            outputs[fp16_modules, kernel] = greedy(LLMEngine.from_config(cfg))
        return outputs[fp16_modules, kernel]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("fp16_modules, kv_placement, num_resident, layer, linear, kernel", [
    (("model.layers.0",), "device", 2, 0, "self_attn.q_proj", "auto"),  # a whole layer, streamed
    (("model.layers.1.mlp.down_proj",), "cpu", 0, 1, "mlp.down_proj", "auto"),  # one linear, streamed
    (("model.layers.1.mlp.down_proj",), "device", 2, 1, "mlp.down_proj", "auto"),  # one linear of a resident layer
    (("model.layers.0",), "device", 0, 0, "self_attn.q_proj", "bnb"),  # bnb's kernel: no fused groups
])
def test_fp16_modules_stream_at_their_own_size_with_the_resident_engines_output(
        model_dir, resident_with, fp16_modules, kv_placement, num_resident, layer, linear, kernel):
    """--fp16-modules in small-VRAM mode: the named linears stay in the compute dtype, their layer streams (or
    stays resident) at its own, larger size, the stage slots hold the largest streamed layer, and the greedy
    output is the resident engine's with the same modules kept."""
    cfg = EngineConfig(model=str(model_dir), max_batch_size=4, offload=True, fp16_modules=fp16_modules,
                       int8_kernel=kernel)
    engine = build_streaming_engine(cfg, kv_placement=kv_placement, num_resident=num_resident)
    plan, streamer = offload(engine).plan, offload(engine).streamer
    dense = {(i, s.name) for i, specs in enumerate(streamer.specs) for s in specs if not s.int8}
    names = LINEARS if fp16_modules == ("model.layers.0",) else ("mlp.down_proj",)
    assert dense == {(layer, name) for name in names}
    others = [b for i, b in enumerate(streamer.layer_bytes) if i != layer]
    assert len(set(others)) == 1 and streamer.layer_bytes[layer] > others[0]
    # the device copy runs the dense linear in the compute dtype, over a view of its layer's buffer
    device_layer = streamer.layers[layer]
    module = device_layer.self_attn.q_proj if linear == "self_attn.q_proj" else device_layer._down
    assert isinstance(module, DenseLinear) and module.weight.dtype == engine.runner.dtype
    on_hf = engine.model.model.layers[layer].get_submodule(linear)
    assert type(on_hf) is torch.nn.Linear  # loaded as bnb's skip modules are
    streamed = layer not in streamer.resident
    assert streamed == (num_resident == 0 or layer == 0)
    if streamed:
        slot = streamer.stages[streamer.slot_of[layer]]
        assert slot.data_ptr() <= module.weight.data_ptr() < slot.data_ptr() + slot.numel()
        assert on_hf.weight.data_ptr() == streamer.host[layer].data_ptr() + streamer.specs[layer][
            [s.name for s in streamer.specs[layer]].index(linear)].offset  # the host copy is the only one
    largest_streamed = max(b for i, b in enumerate(streamer.layer_bytes) if i not in streamer.resident)
    assert streamer.slot_bytes == largest_streamed == plan.slot_bytes
    assert all(stage.numel() == largest_streamed for stage in streamer.stages)
    assert largest_streamed == (max(streamer.layer_bytes) if streamed else others[0])
    assert plan.streamed_bytes_per_step == sum(b for i, b in enumerate(streamer.layer_bytes)
                                               if i not in streamer.resident)
    assert greedy(engine) == resident_with(fp16_modules, kernel)


def test_the_plan_counts_each_layers_own_bytes_and_sizes_the_slots_for_the_largest_streamed_one():
    """Layers kept in the compute dtype weigh about twice an int8 one: the plan counts each layer at its size
    (the resident ones where LayerStreamer puts them) and leaves its stage slots room for the largest streamed."""
    sizes = [2 * LAYER_13B] + [LAYER_13B] * 38 + [2 * LAYER_13B]
    cpu = dict(kv_placement="cpu", cpu_attention_cost=0.3)  # the KV on the host: the device holds weights
    plan, uniform = plan_13b(layer_bytes=sizes, **cpu), plan_13b(**cpu)
    resident = resident_layers(40, plan.num_resident)
    assert 0 < plan.num_resident < uniform.num_resident and not {0, 39} & resident
    assert plan.slot_bytes == 2 * LAYER_13B and uniform.slot_bytes == LAYER_13B
    assert plan.streamed_bytes_per_step == sum(b for i, b in enumerate(sizes) if i not in resident)
    assert plan.device_bytes == (300 * 10**6 + plan.max_rows * 2 * 10**6
                                 + sum(sizes[i] for i in resident) + 2 * 2 * LAYER_13B) <= 5 * GB
    everything = plan_13b(layer_bytes=sizes, budget_bytes=40 * GB)
    assert everything.num_resident == 40 and everything.slot_bytes == 0 and everything.streamed_bytes_per_step == 0
    with pytest.raises(ValueError, match="sizes"):
        plan_13b(layer_bytes=sizes[:-1])


def test_auto_offload_counts_fp16_modules_at_the_compute_dtype(model_dir):
    """A cap the int8 weights fit under but not with a layer kept in fp16: --fp16-modules turns streaming on."""
    from transformers import AutoConfig

    int8 = int8_weights_bytes(AutoConfig.from_pretrained(model_dir), 2)
    cap = dict(model=str(model_dir), max_vram_bytes=int8 + 1024, vram_reserve_bytes=0)
    cuda = torch.device("cuda:0")
    assert not wants_streaming(EngineConfig(**cap), cuda, torch.float16)
    assert wants_streaming(EngineConfig(**cap, fp16_modules=("model.layers.0",)), cuda, torch.float16)
