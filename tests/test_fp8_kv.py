"""--kv-cache-dtype fp8: the resident engine keeps K/V as float8_e4m3fn, a quarter of the demo model's float32
bytes per token, with a scale per layer and KV head calibrated at load.

On CPU the engine decodes through masked sdpa, which dequantises the slice it reads; its logits stay within
e4m3's rounding of the unquantised cache's. (tests/test_kernels.py checks the Triton kernel over the same cache.)
"""

import pytest
import torch
from batchgen.jobs.schema import Request, SamplingParams
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.int8_outliers import calibration_ids
from batchgen.worker.engine.llama import from_cache, gather_rows, prefill_step
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.model_runner import KV_SCALE_MARGIN, ModelRunner, pack_prompts
from batchgen.worker.engine.protocol import GenerationRequest
from batchgen.worker.engine.setup import resolve_attention

from benchmarks.quality import kl_top1, teacher_forced

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
E4M3_RELATIVE = 2.0**-4  # 3 mantissa bits: a normal value rounds within half an ulp, 2^-4 of itself
E4M3_SUBNORMAL_STEP = 2.0**-9  # the smallest e4m3 step: below 2^-6 values round within half of it (absolute)


@pytest.fixture(scope="module")
def fp8_engine(demo_model_dir) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4, kv_cache_dtype="fp8"))


def auto_runner(engine: LLMEngine) -> ModelRunner:
    """A runner with the compute-dtype cache over the fp8 engine's very model: only the cache differs."""
    fp8 = engine.runner
    return ModelRunner(fp8.parts, device=fp8.device, dtype=fp8.dtype, max_model_len=fp8.max_model_len,
                       attention=fp8.attention)


def test_the_fp8_cache_takes_one_byte_per_value_and_the_budget_counts_it(fp8_engine):
    runner = fp8_engine.runner
    assert runner.attention == "sdpa" and runner.k_cache.dtype == runner.v_cache.dtype == torch.float8_e4m3fn
    assert runner.kv_dtype_bytes == 1 and fp8_engine.runner.dtype == torch.float32
    assert fp8_engine.stats().extra["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 1  # layers, kv heads, head dim, fp8
    assert fp8_engine.stats().extra["kv_cache_dtype"] == "fp8"
    assert runner.k_scale.shape == runner.v_scale.shape == (2, 2)  # per layer and KV head
    assert not torch.equal(runner.k_scale, torch.ones_like(runner.k_scale))  # calibrated at load
    assert not torch.equal(runner.k_scale[:, 0], runner.k_scale[:, 1])  # heads of their own ranges


def test_the_same_memory_budget_holds_more_fp8_rows(demo_model_dir):
    """Per token: a quarter of the float32 K/V bytes, the same activations per row (on CPU their estimate includes
    the dequantised copy masked attention reads); the paged cache's blocks take what the row slots leave."""
    budgets = {kv: LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), kv_cache_dtype=kv, vram_reserve_bytes=0,
                                                      max_vram_bytes=32 * 2**20)).budget for kv in ("auto", "fp8")}
    auto, fp8 = budgets["auto"], budgets["fp8"]
    assert fp8.kv_bytes_per_row * 4 == auto.kv_bytes_per_row
    assert fp8.activation_bytes_per_row == auto.activation_bytes_per_row
    assert auto.max_rows <= fp8.max_rows <= 64  # 64: the CPU row cap
    assert auto.num_kv_blocks * 2 < fp8.num_kv_blocks  # the same memory, more blocks


def prefilled(engine: LLMEngine, read):
    """Two 48-token prompts of calibration text prefilled into rows 0 and 1 (their blocks held meanwhile): the K/V
    each layer computed for them ({layer: (k, v)}), and read(runner) of the cache they were written into."""
    runner = engine.runner
    prompts = calibration_ids(engine.tokenizer, CPU, num_seqs=2, seq_len=48).tolist()
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    packed, positions, starts = pack_prompts(prompts, CPU)
    blocks = engine.blocks  # rows 0 and 1 hold blocks for the prompts while the test writes them
    for row in (0, 1):
        blocks.reserve(row, 48)
    runner.set_blocks(blocks.take_changes())
    with torch.inference_mode():
        prefill_step(runner.parts, packed, positions, starts,
                     lambda layer, tokens, k, v: seen.__setitem__(layer, (k.clone(), v.clone())), runner.attention)
        runner.prefill([0, 1], prompts)
    cached = read(runner)
    for row in (0, 1):
        blocks.release(row)
    runner.set_blocks(blocks.take_changes())
    return seen, cached


def test_writing_then_reading_the_cache_reproduces_kv_within_e4m3_rounding(fp8_engine):
    """The prompt's own K/V (captured from a prefill) against what the fp8 cache gives back for them."""
    runner = fp8_engine.runner
    seen, caches = prefilled(fp8_engine, lambda runner: {
        name: torch.stack([gather_rows(c[layer], runner.block_table, 2, 48) for layer in range(c.shape[0])])
        for name, c in (("k", runner.k_cache), ("v", runner.v_cache))})
    for layer, (k, v) in seen.items():
        for cache, scale, exact in ((caches["k"], runner.k_scale, k), (caches["v"], runner.v_scale, v)):
            # text like the calibration's stays inside e4m3's range (448), with room to spare: nothing saturates
            assert (exact.abs().amax(dim=(0, 2)) / scale[layer]).max() <= 448 / KV_SCALE_MARGIN * 1.5
            read = from_cache(cache[layer], scale[layer], torch.float32).reshape(exact.shape)
            bound = E4M3_RELATIVE * exact.abs() + E4M3_SUBNORMAL_STEP / 2 * scale[layer][:, None]
            assert ((read - exact).abs() <= bound * 1.001).all()
            assert not torch.equal(read, exact)  # rounded, not stored exactly


def test_teacher_forced_decode_logits_stay_close_to_the_unquantised_cache(fp8_engine):
    """Prefill half of each sequence, then decode the rest one token a step on the true tokens: every logit
    after the first reads the cache. Not token equality: a near-tie may flip either way."""
    ids = calibration_ids(fp8_engine.tokenizer, CPU, num_seqs=3, seq_len=40)
    ids[:, 1:] = ids[:, 1:].roll(7, dims=1)  # not the exact text the scales came from
    fp8 = teacher_forced(fp8_engine.runner, ids)
    auto = teacher_forced(auto_runner(fp8_engine), ids)
    assert fp8.shape == auto.shape == (3, 20, 384)
    assert not torch.equal(fp8[:, 1:], auto[:, 1:])  # the decode steps read rounded K/V
    torch.testing.assert_close(fp8[:, 0], auto[:, 0])  # the prefill attends over its own fresh K/V
    # e4m3 rounds each K/V value within 2^-4 of itself: the logits move by a few percent of their spread
    spread, drift = auto.std().item(), (fp8 - auto).abs()
    assert drift.mean().item() < 0.05 * spread and drift.max().item() < 0.2 * spread
    kl, _ = kl_top1(auto, fp8)
    assert kl < 1e-3


def test_the_fp8_engine_serves_greedy_requests(fp8_engine):
    requests = [GenerationRequest(f"k{i}", Request(custom_id=f"k{i}", prompt=p,
                                                   params=SamplingParams(temperature=0.0, max_tokens=6,
                                                                         ignore_eos=True)))
                for i, p in enumerate(["the quick brown fox", "a short poem about the sea", "night"])]
    results = {r.key: r for r in fp8_engine.add(requests)}
    while fp8_engine.num_unfinished:
        results.update({r.key: r for r in fp8_engine.step()})
    assert sorted(results) == ["k0", "k1", "k2"]
    assert all(r.error is None and r.completion_tokens == 6 for r in results.values())


def test_the_startup_block_names_an_fp8_kv_cache(fp8_engine, demo_model_dir):
    from batchgen.worker.config import WorkerConfig
    from batchgen.worker.startup import startup_block

    cfg = WorkerConfig(engine_config=EngineConfig(model=str(demo_model_dir), kv_cache_dtype="fp8"))
    bytes_per_token = fp8_engine.stats().extra["kv_bytes_per_token"]
    assert f"  KV bytes/token {bytes_per_token:,} (fp8)" in startup_block(fp8_engine.stats(), cfg).splitlines()


def test_fp8_with_flash_attention_is_refused_at_start_up():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(model="m", kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="fp8 needs attention triton or sdpa"):
        EngineConfig(model="m", kv_cache_dtype="fp8", attention="flash")
    with pytest.raises(ValueError, match="FlashAttention reads no quantised cache"):
        resolve_attention("flash", CPU, torch.float16, "fp8")
    assert resolve_attention("auto", CPU, torch.float32, "fp8") == "sdpa"


def test_auto_attention_on_cuda_takes_triton_for_fp8_and_refuses_it_where_triton_cannot(monkeypatch):
    from batchgen.worker.engine import setup

    cuda = torch.device("cuda")  # only resolved here, never used
    monkeypatch.setattr(setup, "flash_works", lambda device, dtype: True)
    monkeypatch.setattr(setup, "HAS_TRITON", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert resolve_attention("auto", cuda, torch.float16, "fp8") == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))  # A100: no e4m3 in Triton
    with pytest.raises(ValueError, match="sm89"):
        resolve_attention("auto", cuda, torch.float16, "fp8")
    assert resolve_attention("sdpa", cuda, torch.float16, "fp8") == "sdpa"
    monkeypatch.setattr(setup, "HAS_TRITON", False)
    assert resolve_attention("auto", cuda, torch.float16, "auto") == "flash"
    with pytest.raises(ValueError, match="Triton is not installed"):
        resolve_attention("auto", cuda, torch.float16, "fp8")


def test_small_vram_mode_refuses_fp8_and_names_its_own_host_kv_flag(demo_model_dir):
    from batchgen.worker.offload.build import build_streaming_engine

    with pytest.raises(ValueError, match="--host-kv-dtype"):
        build_streaming_engine(EngineConfig(model=str(demo_model_dir), offload=True, kv_cache_dtype="fp8"))


def test_the_kv_cache_dtype_is_a_flag_with_its_env_name(monkeypatch):
    from batchgen.producer.cli import engine_config, worker

    def params(*args: str) -> dict:
        return worker.make_context("worker", ["--model", "m", *args]).params

    assert engine_config(params()).kv_cache_dtype == "auto"
    assert engine_config(params("--kv-cache-dtype", "fp8")).kv_cache_dtype == "fp8"
    monkeypatch.setenv("BATCHGEN_KV_CACHE_DTYPE", "fp8")
    assert engine_config(params()).kv_cache_dtype == "fp8"


def test_the_quality_benchmarks_kv_section_runs_on_cpu():
    """benchmarks/quality.py --kv on a tiny planted model: the runner's drift from fp32 with each cache dtype, and
    #20's references through the same runner."""
    from benchmarks.quality import Shape, run_kv

    tiny = Shape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512, num_seqs=2, seq_len=16,
                 num_prompts=1, prompt_len=4, new_tokens=2)
    auto, fp8, fp8v, int8, bnb, weight_only = run_kv(tiny, 20, CPU, torch.float32)
    assert [r["kv_cache_dtype"] for r in (auto, fp8, fp8v, int8)] == ["auto", "fp8", "fp8v", "int8"]
    assert {r["variant"] for r in (auto, fp8, fp8v, int8)} == {"default_rotated"}
    assert auto["attention"] == fp8["attention"] == fp8v["attention"] == int8["attention"] == "sdpa"
    assert auto["kl_vs_auto"] == 0 < fp8v["kl_vs_auto"] and fp8["kl_vs_auto"] > 0 and int8["kl_vs_auto"] > 0
    assert auto["kl"] > 0 and fp8["kl"] > 0 and 0 <= fp8["top1"] <= 1
    # #20's references over the auto cache, and each default row's ratio to them
    assert (bnb["variant"], weight_only["variant"]) == ("bnb_t6", "weight_only")
    assert bnb["kv_cache_dtype"] == weight_only["kv_cache_dtype"] == "auto" and bnb["kl"] > 0 < weight_only["kl"]
    for row in (auto, int8):
        assert row["vs_bnb_t6"] == pytest.approx(row["kl"] / bnb["kl"], rel=1e-2)
        assert row["vs_weight_only"] == pytest.approx(row["kl"] / weight_only["kl"], rel=1e-2)


def test_fp8v_keeps_k_exact_and_v_in_e4m3_at_three_quarters_of_the_bytes(fp8_engine, demo_model_dir):
    """--kv-cache-dtype fp8v: V in e4m3 with its calibrated scales, K in the compute dtype (scale 1); the budget
    counts the mean element; its decode logits drift from the unquantised cache's less than all-fp8's do."""
    engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4, kv_cache_dtype="fp8v"))
    runner = engine.runner
    assert runner.k_cache.dtype == torch.float32 and runner.v_cache.dtype == torch.float8_e4m3fn
    assert runner.kv_dtype_bytes == 2.5  # (float32 K + e4m3 V) / 2
    assert engine.stats().extra["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2.5
    assert torch.equal(runner.k_scale, torch.ones_like(runner.k_scale))
    assert not torch.equal(runner.v_scale, torch.ones_like(runner.v_scale))  # calibrated at load
    ids = calibration_ids(engine.tokenizer, CPU, num_seqs=3, seq_len=40)
    ids[:, 1:] = ids[:, 1:].roll(7, dims=1)
    auto = teacher_forced(auto_runner(fp8_engine), ids)
    v_only, both = teacher_forced(runner, ids), teacher_forced(fp8_engine.runner, ids)
    assert not torch.equal(v_only[:, 1:], auto[:, 1:])  # the decode steps read rounded V
    assert 0 < kl_top1(auto, v_only)[0] < kl_top1(auto, both)[0]
    test_the_fp8_engine_serves_greedy_requests(engine)


def test_the_generic_path_refuses_fp8v(tmp_path, demo_model_dir):
    from batchgen.worker.factory import build_llm_engine

    from tests.models import write_tiny_model

    path = write_tiny_model(tmp_path, "bloom", demo_model_dir)  # a generic-path architecture
    with pytest.raises(ValueError, match="fp8v runs on the resident fast path only"):
        build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, kv_cache_dtype="fp8v"))
