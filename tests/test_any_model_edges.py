"""Architectures beyond tests/test_models.py's list, on the generic path: hybrid models whose cache holds a conv,
SSM or linear-attention state beside K/V, and Gemma 3n's per-layer MLP widths, answer like HF generate; a model that
keeps its state in its own modules is refused before any weight loads.
"""

from pathlib import Path

import pytest
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.families import UnsupportedModel
from batchgen.worker.engine.generic import GenericEngine
from batchgen.worker.factory import build_llm_engine

from tests.models import FFN, HEADS, HIDDEN, LAYERS, MAX_POS, WINDOW, write_tiny_model
from tests.test_models import oracle, requests, run_engine

LLAMA_LIKE = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=2)


def _hybrid_configs() -> dict:
    import transformers as t

    return {
        # a short conv (state: the last kernel-1 inputs) then attention
        "lfm2": lambda: t.Lfm2Config(layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False,
                                     max_position_embeddings=MAX_POS, **LLAMA_LIKE),
        # gated delta-net linear attention (conv + recurrent state) then gated attention, MoE
        "qwen3_next": lambda: t.Qwen3NextConfig(
            head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
            linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"],
            max_position_embeddings=MAX_POS, **LLAMA_LIKE),
        # Mamba then attention (its torch path: no mamba kernels here)
        "jamba": lambda: t.JambaConfig(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, num_experts=2,
                                       mamba_d_state=8, mamba_expand=2, use_mamba_kernels=False, **LLAMA_LIKE),
    }


def write_model(out: Path, config, tokenizer_dir: Path, *, weights: bool = True) -> Path:
    return write_tiny_model(out, None, tokenizer_dir, weights=weights, config=config)


@pytest.mark.parametrize("arch", list(_hybrid_configs()))
def test_a_hybrid_model_answers_like_hf_generate(arch, demo_model_dir, tmp_path):
    """Its conv / SSM / linear-attention layers keep their state in the cache the forward is handed: a prefill's
    cache has those layers (not K/V ones, whose update they never call), and rows leaving keep the others' states."""
    path = write_model(tmp_path / arch, _hybrid_configs()[arch](), demo_model_dir)
    for int8 in (True, False):
        engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=int8, max_batch_size=3))
        assert isinstance(engine, GenericEngine)
        assert run_engine(engine, requests()) == oracle(path, engine), f"int8={int8}"


def test_per_layer_mlp_widths_answer_like_hf_generate(demo_model_dir, tmp_path):
    """Gemma 3n's config lists intermediate_size per layer (its layers also share K/V and alternate windows, and
    prompts run past the window): the generic path's budget reads the widest, and answers match HF."""
    from transformers import Gemma3nTextConfig

    layers = 4  # two that compute K/V, two that reuse them
    config = Gemma3nTextConfig(**{**LLAMA_LIKE, "num_hidden_layers": layers, "intermediate_size": [FFN] * layers},
                               head_dim=16, sliding_window=WINDOW, num_kv_shared_layers=2,
                               layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=16,
                               vocab_size_per_layer_input=400, laurel_rank=8, altup_num_inputs=2,
                               activation_sparsity_pattern=[0.0] * layers, max_position_embeddings=MAX_POS)
    path = write_model(tmp_path / "gemma3n", config, demo_model_dir)
    for int8 in (True, False):
        engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=int8, max_batch_size=3))
        assert isinstance(engine, GenericEngine)
        assert engine.budget.max_rows >= 1
        assert run_engine(engine, requests()) == oracle(path, engine), f"int8={int8}"


def test_a_model_keeping_its_state_in_its_modules_is_refused_before_any_weight_loads(demo_model_dir, tmp_path):
    """RecurrentGemma's recurrent blocks hold their conv and LRU states as module attributes, sized by the last
    batch: rows cannot leave or join it, and a new batch of the same size would start from the last one's state."""
    from transformers import RecurrentGemmaConfig

    config = RecurrentGemmaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, num_key_value_heads=2, lru_width=HIDDEN,
                                  attention_window_size=WINDOW, block_types=["recurrent", "attention"])
    path = write_model(tmp_path / "recurrent_gemma", config, demo_model_dir, weights=False)
    with pytest.raises(UnsupportedModel, match=r"\(recurrent_gemma\) keeps its recurrent state") as exc:
        build_llm_engine(EngineConfig(model=str(path)))
    assert "\n" not in str(exc.value)
