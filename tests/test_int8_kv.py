"""--kv-cache-dtype int8: the resident engine keeps K/V as int8, each token's KV head rounded on its own absmax
with a float32 scale beside it (1 + 4 / head_dim bytes an element: about half of fp16's).

On CPU the engine decodes through masked sdpa, which dequantises the slice it reads; tests/test_kernels.py checks
the Triton kernel and the store over the same cache. The quality benchmark measures the drift on planted-outlier
models (benchmarks/quality.py --kv)."""

import pytest
import torch
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.int8_outliers import calibration_ids
from batchgen.worker.engine.llama import from_cache, gather_rows, gather_scales
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.setup import resolve_attention

from benchmarks.quality import kl_top1, teacher_forced
from tests.test_fp8_kv import auto_runner, prefilled
from tests.test_fp8_kv import test_the_fp8_engine_serves_greedy_requests as serves_greedy_requests

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def int8_engine(demo_model_dir) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4, kv_cache_dtype="int8"))


def test_the_int8_cache_takes_a_byte_a_value_and_a_scale_a_token_and_head(int8_engine):
    runner = int8_engine.runner
    assert runner.attention == "sdpa" and runner.k_cache.dtype == runner.v_cache.dtype == torch.int8
    layers, blocks, block_size, kv_heads, head_dim = runner.k_cache.shape
    assert runner.k_scale.shape == runner.v_scale.shape == (layers, blocks, kv_heads, block_size)
    assert runner.k_scale.dtype == torch.float32
    # each block's heads outermost (model_runner.kv_pool): a head's tokens of a block side by side
    assert runner.k_cache.stride()[2:] == runner.v_cache.stride()[2:] == (head_dim, block_size * head_dim, 1)
    assert runner.kv_dtype_bytes == 1 + 4 / head_dim  # the demo model's head_dim is 16: 1.25
    assert int8_engine.stats().extra["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 1.25
    assert int8_engine.stats().extra["kv_cache_dtype"] == "int8"


def test_the_same_memory_budget_holds_more_int8_rows_than_auto_and_fewer_than_fp8(demo_model_dir):
    budgets = {kv: LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), kv_cache_dtype=kv,
                                                      vram_reserve_bytes=0, max_vram_bytes=32 * 2**20)).budget
               for kv in ("auto", "int8", "fp8")}
    assert budgets["int8"].kv_bytes_per_row * 4 == budgets["auto"].kv_bytes_per_row * 1.25
    assert budgets["auto"].num_kv_blocks * 2 < budgets["int8"].num_kv_blocks < budgets["fp8"].num_kv_blocks


def test_writing_then_reading_the_cache_reproduces_kv_within_half_an_int8_step(int8_engine):
    """The prompt's own K/V (captured from a prefill) against what the int8 cache gives back: each value within
    half a step (absmax / 254) of its token and head's absmax, and each head's largest value exact."""

    def dequantised(runner):
        return {name: [from_cache(gather_rows(cache[layer], runner.block_table, 2, 48),
                                  gather_scales(scale[layer], runner.block_table, 2, 48), torch.float32)
                       for layer in range(cache.shape[0])]
                for name, cache, scale in (("k", runner.k_cache, runner.k_scale), ("v", runner.v_cache, runner.v_scale))}

    seen, read = prefilled(int8_engine, dequantised)
    for layer, (k, v) in seen.items():
        for got, exact in ((read["k"][layer], k), (read["v"][layer], v)):
            got = got.reshape(exact.shape)
            half_step = exact.abs().amax(dim=-1, keepdim=True) / 254
            assert ((got - exact).abs() <= half_step * 1.0001 + 1e-7).all()
            assert not torch.equal(got, exact)
            peak = exact.abs().argmax(dim=-1, keepdim=True)
            torch.testing.assert_close(got.gather(-1, peak), exact.gather(-1, peak), rtol=1e-6, atol=0)


def test_teacher_forced_decode_logits_drift_less_than_with_fp8(int8_engine, demo_model_dir):
    """Prefill half of each sequence, then decode the rest on the true tokens: the decode steps read the rounded
    cache. int8 with a scale per token drifts from the unquantised cache's logits less than fp8 does."""
    ids = calibration_ids(int8_engine.tokenizer, CPU, num_seqs=3, seq_len=40)
    ids[:, 1:] = ids[:, 1:].roll(7, dims=1)
    auto = teacher_forced(auto_runner(int8_engine), ids)
    int8 = teacher_forced(int8_engine.runner, ids)
    fp8_engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4, kv_cache_dtype="fp8"))
    fp8 = teacher_forced(fp8_engine.runner, ids)
    assert not torch.equal(int8[:, 1:], auto[:, 1:])  # the decode steps read rounded K/V
    torch.testing.assert_close(int8[:, 0], auto[:, 0])  # the prefill attends over its own fresh K/V
    assert 0 < kl_top1(auto, int8)[0] < kl_top1(auto, fp8)[0]
    assert kl_top1(auto, int8)[0] < 1e-3


def test_the_int8_engine_serves_greedy_requests(int8_engine):
    serves_greedy_requests(int8_engine)


def test_int8_is_refused_with_flash_and_off_the_fast_path(tmp_path, demo_model_dir):
    from batchgen.worker.factory import build_llm_engine
    from batchgen.worker.offload.build import build_streaming_engine

    from tests.models import write_tiny_model

    with pytest.raises(ValueError, match="int8 needs attention triton or sdpa"):
        EngineConfig(model="m", kv_cache_dtype="int8", attention="flash")
    with pytest.raises(ValueError, match="FlashAttention reads no quantised cache"):
        resolve_attention("flash", CPU, torch.float16, "int8")
    path = write_tiny_model(tmp_path, "bloom", demo_model_dir)  # a generic-path architecture
    with pytest.raises(ValueError, match="int8 runs on the resident fast path only"):
        build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, kv_cache_dtype="int8"))
    with pytest.raises(ValueError, match="--host-kv-dtype"):
        build_streaming_engine(EngineConfig(model=str(demo_model_dir), offload=True, kv_cache_dtype="int8"))


def test_auto_attention_on_cuda_takes_triton_for_int8_on_any_card(monkeypatch):
    """int8 needs no e4m3: Triton reads it below sm89 too (fp8 is refused there)."""
    from batchgen.worker.engine import setup

    monkeypatch.setattr(setup, "flash_works", lambda device, dtype: True)
    monkeypatch.setattr(setup, "HAS_TRITON", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    assert resolve_attention("auto", torch.device("cuda"), torch.float16, "int8") == "triton"


def test_the_engines_drain_line_names_its_cache_bytes_and_the_bulk_report_counts_them(int8_engine, caplog):
    """The `engine steps:` line a drained engine logs carries the cache's bytes a token (int8: 1 + 4 / head_dim an
    element), so benchmarks.bulk's decode efficiency counts the bytes this cache really reads, not fp16's."""
    import json
    import logging

    from benchmarks.bulk import KV_BYTES_PER_TOKEN, decode_efficiency
    from benchmarks.common import Req

    caplog.set_level(logging.INFO, logger="batchgen.engine")
    serves_greedy_requests(int8_engine)
    lines = [r.getMessage().split("engine steps: ", 1)[1] for r in caplog.records if "engine steps: " in r.getMessage()]
    engine = json.loads(lines[-1])
    assert engine["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 1.25
    reqs = [Req("a", [1] * 2000, 500)]  # Llama-7B's fp16 K/V: about 1.2 GB a decode step
    line = {"num_decode_steps": 499, "decode_s": 1.0}
    fp16 = decode_efficiency(line, reqs, 1e12, weights_bytes=0)
    int8 = decode_efficiency(line | {"kv_bytes_per_token": KV_BYTES_PER_TOKEN * 1.03125 / 2}, reqs, 1e12,
                             weights_bytes=0)
    assert int8["bytes_per_step_gb"] == pytest.approx(fp16["bytes_per_step_gb"] * 1.03125 / 2, rel=0.01)


def test_auto_is_the_int8_cache_where_the_triton_kernel_decodes_fp16_on_cuda():
    """--kv-cache-dtype auto: int8 (its drift inside #20's bounds, measured on the GPU) only where the fast path
    decodes with the Triton kernel on CUDA in float16; the compute dtype elsewhere; compute is that dtype always."""
    from batchgen.worker.engine.setup import resolve_kv_cache_dtype

    cuda = torch.device("cuda")
    assert resolve_kv_cache_dtype("auto", cuda, torch.float16, "triton") == "int8"
    assert resolve_kv_cache_dtype("auto", cuda, torch.bfloat16, "triton") == "auto"  # bf16 q: the float32 path
    assert resolve_kv_cache_dtype("auto", cuda, torch.float16, "sdpa") == "auto"  # windows, soft-capping
    assert resolve_kv_cache_dtype("auto", cuda, torch.float16, "flash") == "auto"
    assert resolve_kv_cache_dtype("auto", CPU, torch.float16, "triton") == "auto"
    assert resolve_kv_cache_dtype("compute", cuda, torch.float16, "triton") == "auto"
    for named in ("int8", "fp8", "fp8v"):
        assert resolve_kv_cache_dtype(named, CPU, torch.float32, "sdpa") == named


def test_compute_is_the_exact_cache_everywhere_a_quantised_one_is_refused(demo_model_dir):
    """compute names the exact cache: accepted with flash and on the paths that refuse a quantised one."""
    from batchgen.worker.engine.embedding import refuse_generation_flags
    from batchgen.worker.offload.build import refuse_kv_cache_dtype

    cfg = EngineConfig(model=str(demo_model_dir), kv_cache_dtype="compute", attention="flash")
    refuse_kv_cache_dtype(cfg)
    refuse_generation_flags(cfg)
    assert resolve_attention("flash", CPU, torch.float16, "compute") == "flash"
    with pytest.raises(ValueError, match="--host-kv-dtype"):
        refuse_kv_cache_dtype(EngineConfig(model="m", kv_cache_dtype="int8"))
    engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=2,
                                                kv_cache_dtype="compute"))
    assert engine.runner.k_cache.dtype == torch.float32 and engine.stats().extra["kv_cache_dtype"] == "auto"
