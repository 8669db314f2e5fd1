"""The generic path's K/V slots: rows join and leave without copying the batch, the active columns move back when
they reach the slots' edge, the slots grow on the host, and greedy output stays HF generate's (fp32, exact)."""

import functools

import pytest
import torch
from batchgen.jobs.schema import Request, SamplingParams
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.generic import GenericEngine
from batchgen.worker.engine.padded_batch import PaddedBatch
from batchgen.worker.engine.protocol import GenerationRequest
from batchgen.worker.engine.slot_batch import CPU_INITIAL_ROWS, SlotBatch, slot_columns
from batchgen.worker.factory import build_llm_engine
from transformers import DynamicCache

from tests.models import write_tiny_model

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "batch", "generation", "keeps", "every", "gpu", "busy", "at", "night"]
MAX_MODEL_LEN = 160


def prompt(i: int) -> str:
    return " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(1 + (7 * i) % 20))


def wanted(i: int) -> int:
    return 12 + (29 * i) % 60  # up to 71 tokens: several moves of the window, rows finishing apart


@functools.lru_cache(maxsize=1)
def hf_model(path):
    """The HF model at path in float32, loaded once for the prompts a test checks against it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path, ids: list[int], n: int) -> list[int]:
    model = hf_model(path)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ["bloom", "gpt2"])  # ALiBi from the 2-D mask; learned absolute positions
def test_rows_join_leave_and_move_in_slots_with_hf_generate_output(arch, demo_model_dir, tmp_path):
    path = write_tiny_model(tmp_path, arch, demo_model_dir)
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=12,
                                           max_model_len=MAX_MODEL_LEN, max_prefill_tokens=96))
    assert isinstance(engine, GenericEngine)
    shapes = []  # each prefill forward's [prompts, padded length]
    engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    num = 30
    reqs = [GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=prompt(i), params=SamplingParams(
        max_tokens=wanted(i), temperature=0, ignore_eos=True))) for i in range(num)]
    assert engine.add(reqs) == []
    texts, moves, grown = {}, 0, False
    while engine.num_unfinished:
        for r in engine.step():
            assert r.error is None, r.error
            texts[r.key] = r.text
        batch = engine.batch
        if isinstance(batch, SlotBatch):
            moves = max(moves, batch.num_window_moves)
            grown |= batch.layers[0].key_slots.shape[0] > CPU_INITIAL_ROWS
            assert batch.layers[0].keys.shape[2] == batch.mask.shape[1] <= MAX_MODEL_LEN
    assert moves >= 1 and grown and engine.stats().extra["num_joins"] > 0
    prefills = [(n, length) for n, length in shapes if length > 1]
    # grouped by length: no forward pads past the 96-token budget unless one prompt alone is that long
    assert all(n * length <= 96 or n == 1 for n, length in prefills) and max(n for n, _ in prefills) > 1
    for i in range(num):
        ids = engine.tokenizer(prompt(i))["input_ids"]
        expected = engine.tokenizer.decode(hf_greedy(path, ids, wanted(i)), skip_special_tokens=True)
        assert texts[f"r{i}"] == expected, i


def fresh(rows: int, lengths: list[int], heads: int = 2, dim: int = 4) -> PaddedBatch:
    """A left-padded prefill's batch whose K/V values name their row and column (row * 1000 + column)."""
    width = max(lengths)
    cache = DynamicCache()
    keys = torch.arange(width, dtype=torch.float32).repeat(rows, 1) + 1000 * torch.arange(rows)[:, None] + 1
    keys = keys[:, None, :, None].expand(rows, heads, width, dim).contiguous()
    cache.update(keys, -keys, 0)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    return PaddedBatch(cache, mask, torch.tensor(lengths))


def test_select_moves_only_the_rows_past_the_new_count_into_the_freed_slots():
    batch = SlotBatch(fresh(6, [3, 5, 2, 4, 1, 5]), max_rows=8, max_model_len=16)
    before = batch.layers[0].keys.clone()
    order = batch.select([0, 2, 4, 5])
    assert order == [0, 4, 2, 5]  # slots 1 and 3 freed: rows 4 and 5 (past the new count) fill them
    assert batch.num_row_moves == 2
    keys = batch.layers[0].keys
    assert keys.shape[2] == batch.mask.shape[1] == 5  # the longest row kept spans 5 columns: nothing to trim
    for slot, old in enumerate(order):
        assert torch.equal(keys[slot], before[old])
    assert torch.equal(batch.next_positions, torch.tensor([3, 1, 2, 5]))
    assert batch.select([1, 2]) == [2, 1]  # rows of 2 and 1 tokens left: the 3 columns padding in both go
    assert batch.mask.tolist() == [[1, 1], [0, 1]] and batch.layers[0].keys.shape[2] == 2


def test_growing_slots_take_the_rows_in_sight_at_once():
    """Where slots grow (host RAM, --stream-kv's pinned slots), the first batch allocates the rows already running
    or pending, up to max_rows: each growth would allocate and copy every layer's slots again."""
    grown = SlotBatch(fresh(2, [3, 2]), max_rows=64, max_model_len=16)
    hinted = SlotBatch(fresh(2, [3, 2]), max_rows=64, max_model_len=16, expected_rows=40)
    capped = SlotBatch(fresh(2, [3, 2]), max_rows=24, max_model_len=16, expected_rows=40)
    assert [b.layers[0].key_slots.shape[0] for b in (grown, hinted, capped)] == [CPU_INITIAL_ROWS, 40, 24]
    slots = hinted.layers[0].key_slots
    for _ in range(19):  # 2 + 38 rows: no growth, the same tensors
        hinted.extend(fresh(2, [4, 1]))
    assert hinted.num_rows == 40 and hinted.layers[0].key_slots is slots
    assert torch.equal(hinted.layers[0].keys[-2:, :, -4:], fresh(2, [4, 1]).cache.layers[0].keys)


def test_the_window_moves_back_to_end_at_max_model_len_and_keeps_every_row():
    max_model_len = 80
    batch = SlotBatch(fresh(2, [3, 2]), max_rows=2, max_model_len=max_model_len)
    layer = batch.layers[0]
    slack = slot_columns(max_model_len) - max_model_len
    for step in range(slack):
        layer.update(torch.full((2, 2, 1, 4), -7.0 - step), torch.zeros(2, 2, 1, 4))
        batch.advance(torch.cat([batch.mask, batch.mask.new_ones(2, 1)], dim=1))
    assert batch.num_window_moves == 1
    assert (batch.start, batch.end) == (max_model_len - 3 - slack, max_model_len)
    keys = layer.keys[:, 0, :, 0]
    assert keys[0, :3].tolist() == [1, 2, 3] and keys[1, 1:3].tolist() == [1002, 1003]
    assert keys[:, 3:].tolist() == [[-7.0 - s for s in range(slack)]] * 2


def test_fp8_slots_store_e4m3_and_attend_over_a_dequantized_copy():
    batch = SlotBatch(fresh(3, [4, 2, 3]), max_rows=4, max_model_len=32, fp8=True)
    layer = batch.layers[0]
    assert layer.key_slots.dtype == torch.float8_e4m3fn and layer.scales[0].shape == (1, 2, 1, 1)
    new = torch.randn(3, 2, 1, 4) * 500  # the prefill's keys run to ~3,000: these stay inside the scale's range
    keys, values = layer.update(new, -new)
    assert keys.dtype == values.dtype == torch.float32 and keys.shape == (3, 2, 5, 4)
    assert torch.allclose(keys[:, :, -1:], new, rtol=1 / 16, atol=layer.scales[0].max().item())
    assert torch.allclose(keys[0, :, :4, 0], torch.arange(1, 5.0).expand(2, 4), rtol=1 / 16)
    assert layer.keys.dtype == torch.float8_e4m3fn  # what stays between steps: one byte per value
    # the dequantized copy is a view of buffers the batch's layers share: the next step (a column wider) allocates
    # nothing and gives the same values for the columns it had
    first = keys.clone()
    keys2, _ = layer.update(new, -new)
    assert keys2.shape == (3, 2, 6, 4) and keys2.data_ptr() == keys.data_ptr()
    assert torch.equal(keys2[:, :, :5], first)


def test_the_generic_path_runs_with_an_fp8_kv_cache_in_half_the_bytes(demo_model_dir, tmp_path):
    path = write_tiny_model(tmp_path, "bloom", demo_model_dir)
    engines = {kv: build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=4,
                                                 max_model_len=MAX_MODEL_LEN, kv_cache_dtype=kv))
               for kv in ("auto", "fp8")}
    # fp32 compute on the CPU: an fp8 slot takes a quarter of an auto one's bytes
    assert engines["fp8"].budget.kv_bytes_per_token * 4 == engines["auto"].budget.kv_bytes_per_token
    engine = engines["fp8"]
    reqs = [GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=prompt(i), params=SamplingParams(
        max_tokens=wanted(i), temperature=0, ignore_eos=True))) for i in range(8)]
    assert engine.add(reqs) == []
    done, fp8_seen = {}, False
    while engine.num_unfinished:
        done.update({r.key: r for r in engine.step()})
        fp8_seen |= isinstance(engine.batch, SlotBatch) and engine.batch.layers[0].key_slots.dtype == torch.float8_e4m3fn
    assert fp8_seen and engine.stats().extra["kv_cache_dtype"] == "fp8"
    assert all(r.error is None and r.completion_tokens == wanted(int(k[1:])) for k, r in done.items()) and len(done) == 8


def test_an_oom_allocating_the_slots_halves_the_rows_and_loses_nothing(demo_model_dir, tmp_path, monkeypatch):
    """The first prefill after a drain allocates the slots: an OOM there is the engine's usual back-off."""
    from batchgen.worker.engine import slot_batch

    path = write_tiny_model(tmp_path, "gpt2", demo_model_dir)
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=8,
                                           max_model_len=MAX_MODEL_LEN))
    zeros = slot_batch._zeros

    def small_card(like, rows, columns, dtype=None, host=False):
        if rows > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return zeros(like, rows, columns, dtype, host)

    monkeypatch.setattr(slot_batch, "_zeros", small_card)
    reqs = [GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=prompt(i), params=SamplingParams(
        max_tokens=wanted(i) // 4, temperature=0, ignore_eos=True))) for i in range(10)]
    assert engine.add(reqs) == []
    done = {}
    while engine.num_unfinished:
        done.update({r.key: r for r in engine.step()})
    assert engine.stats().extra["num_ooms"] >= 1 and engine.scheduler.max_batch_size <= 4
    assert sorted(done) == sorted(r.key for r in reqs)
    assert all(r.error is None and r.completion_tokens == wanted(int(k[1:])) // 4 for k, r in done.items())
