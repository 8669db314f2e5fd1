"""Small-VRAM mode on the fast path keeps the resident engine's int8 arithmetic: LLM.int8()'s outlier columns
(int_mm_outliers, calibrated through the streamed layers, guarded) and the rotated down projections.

A tiny Llama with planted outliers (benchmarks/quality.py: six residual channels with mean |x| = 20 at the q/k/v
and gate/up inputs) and the demo tokenizer is run through the streamed engine, the resident engine and fp32 HF.
The streamed default finds the resident default's columns and gives its logits exactly; threshold 0 (int_mm)
squeezes the outliers into 127 levels and lands far further from fp32.
"""

import shutil

import pytest
import torch
from batchgen.worker.demo_model import write_demo_model
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.int8_linear import OUTLIER_KERNEL, dequantize_weight
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.offload.build import OUTLIER_SLOTS, build_streaming_engine
from batchgen.worker.offload.layer_stream import outlier_bytes

from benchmarks.quality import Shape, build_planted, eval_ids
from tests.test_offload import greedy

pytestmark = pytest.mark.slow

TINY = Shape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512, num_seqs=4, seq_len=32,
             num_prompts=2, prompt_len=8, new_tokens=4)
LENGTHS = (12, 20, 32)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted model saved with the demo tokenizer (the engines calibrate on its encoding of the text),
    its fp32 last-token logits for prompts cut from the evaluation ids, and those prompts."""
    root = tmp_path_factory.mktemp("planted")
    demo = write_demo_model(root / "demo", chat_template=False)
    ref = build_planted(TINY, 20)
    ref.save_pretrained(root / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (demo / name).exists():
            shutil.copy(demo / name, root / "model" / name)
    ids = eval_ids(TINY, seed=2)
    prompts = [ids[i, :n].tolist() for i in range(ids.shape[0]) for n in LENGTHS]
    with torch.inference_mode():
        full = ref(input_ids=ids).logits.float()
    logits = torch.stack([full[i, n - 1] for i in range(ids.shape[0]) for n in LENGTHS])
    return root / "model", logits, prompts


def kl(ref: torch.Tensor, logits: torch.Tensor) -> float:
    logp, logq = ref.double().log_softmax(-1), logits.double().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean().item()


def last_logits(engine: LLMEngine, prompts: list[list[int]]) -> torch.Tensor:
    with torch.inference_mode():
        return engine.runner.prefill(list(range(len(prompts))), prompts).float()


def streamed(model_dir, **kwargs) -> LLMEngine:
    cfg = EngineConfig(model=str(model_dir), max_batch_size=len(LENGTHS) * TINY.num_seqs, offload=True, **kwargs)
    return build_streaming_engine(cfg, kv_placement="device", num_resident=0)


def test_the_streamed_default_is_the_resident_default_and_keeps_the_outlier_columns(planted):
    model_dir, ref, prompts = planted
    resident = LLMEngine.from_config(EngineConfig(model=str(model_dir), max_batch_size=len(prompts)))
    engine = streamed(model_dir)
    stats, resident_stats = engine.stats().extra, resident.stats().extra
    assert stats["int8_kernel"] == resident_stats["int8_kernel"] == OUTLIER_KERNEL
    assert stats["int8_rotated_inputs"] == resident_stats["int8_rotated_inputs"] == TINY.layers
    assert stats["int8_outlier_columns"] == resident_stats["int8_outlier_columns"] > 0
    default = last_logits(engine, prompts)
    assert torch.equal(default, last_logits(resident, prompts))

    threshold_zero = streamed(model_dir, int8_threshold=0.0)
    assert threshold_zero.stats().extra["int8_kernel"] == "int_mm"
    assert kl(ref, default) < 0.5 * kl(ref, last_logits(threshold_zero, prompts))


def test_a_column_the_guard_adds_to_a_streamed_layer_takes_its_rows_from_the_host_copy(planted):
    """A stage slot holds whichever layer streamed last: the dense rows of a column added to a streamed layer are
    read from the layer's pinned copy (here the slot is zeroed meanwhile), and the outputs then equal the resident
    engine's with the same column added."""
    model_dir, _, _ = planted
    engine = streamed(model_dir)
    resident = LLMEngine.from_config(EngineConfig(model=str(model_dir), max_batch_size=len(LENGTHS) * TINY.num_seqs))
    streamer = engine.reporters[0].streamer
    owner = streamer.layers[0].owners[-1]  # the down projection: no planted column there
    column = next(c for c in range(owner.in_features) if c not in owner.outliers.columns)
    stage = streamer.stages[streamer.slot_of[0]]
    held = stage.clone()
    stage.zero_()
    assert owner.outliers.add([column]) == [column]
    stage.copy_(held)
    expected = dequantize_weight(*owner.host_weights, owner.dense.dtype)[:, column]
    assert expected.abs().sum() > 0
    torch.testing.assert_close(owner.dense[owner.outliers.columns.index(column)], expected)  # not the zeroed slot's

    assert resident.model.model.layers[0].mlp.down_proj.outliers.add([column]) == [column]
    assert greedy(engine) == greedy(resident)
    assert engine.stats().extra["int8_outlier_columns"] == resident.stats().extra["int8_outlier_columns"]


def test_the_plan_counts_the_outlier_slots_of_every_layer(planted):
    """The budget reserves each layer's dense rows and guard counters before the plan: OUTLIER_SLOTS per input."""
    model_dir, _, _ = planted
    engine = streamed(model_dir)
    owners = engine.reporters[0].streamer.owners()
    assert len(owners) == 4 * TINY.layers  # q/k/v, o, gate/up, down
    assert all(o.outliers.capacity == OUTLIER_SLOTS and o.outliers.fixed_path for o in owners)
    held = sum(o.dense.numel() * o.dense.element_size() + o.outliers.idx.numel() * 8
               + o.in_features * (2 + 4 + 4) for o in owners)
    layers = engine.model.model.layers
    assert sum(outlier_bytes(layer, torch.float32, OUTLIER_SLOTS) for layer in layers) == held
