"""The fused elementwise functions (worker/engine/fused.py) compute what the HF modules they stand in for compute,
and modules whose arithmetic differs keep their own forward."""

import pytest
import torch
from batchgen.worker.engine import fused
from batchgen.worker.engine.fused import (
    FUSED,
    NORM_KIND_ATTR,
    activation_name,
    add_norm,
    fuse_norms,
    norm_kind,
    rope_qk,
)
from transformers.activations import ACT2FN
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm


class ScaledNorm(LlamaRMSNorm):
    """An RMSNorm-like module with other arithmetic: the probe must leave it alone."""

    def forward(self, x):
        return super().forward(x) * 2


def _norms(dtype: torch.dtype) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    out = [LlamaRMSNorm(64, eps=1e-5), GemmaRMSNorm(64, eps=1e-6)]
    for m in out:
        m.weight.data = torch.randn(64) * 0.5 + 0.1
    return [m.to(dtype) for m in out]


def test_fused_norms_equal_the_hf_modules_exactly():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        llama, gemma = _norms(dtype)
        x = (torch.randn(5, 7, 64) * 3).to(dtype)
        want = [llama(x), gemma(x)]
        assert norm_kind(llama) == fused.NormKind(1e-5, gemma=False)
        assert norm_kind(gemma) == fused.NormKind(1e-6, gemma=True)
        assert fuse_norms([llama, gemma]) == 2
        for module, expected in zip((llama, gemma), want, strict=True):
            got = module(x)  # the fused forward now
            assert got.dtype == expected.dtype and torch.equal(got, expected)
            delta = (torch.randn(5, 7, 64)).to(dtype)
            h, normed = add_norm(module, x, delta)
            assert torch.equal(h, x + delta) and torch.equal(normed, module(x + delta))


def test_a_norm_with_other_arithmetic_keeps_its_forward():
    odd = ScaledNorm(64)
    odd.weight.data = torch.randn(64)  # (with ones, 2 * w * x is Gemma's (1 + w) * x, and fusing it would be right)
    x = torch.randn(3, 64)
    want = odd(x)
    assert norm_kind(odd) is None
    assert fuse_norms([odd]) == 0
    assert getattr(odd, NORM_KIND_ATTR, None) is None
    assert torch.equal(odd(x), want)
    h, normed = add_norm(odd, x, x)  # the unfused fallback
    assert torch.equal(h, 2 * x) and torch.equal(normed, odd(2 * x))


def test_rope_qk_is_hf_apply_rotary_pos_emb_with_partial_rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(1)
    q, k = torch.randn(2, 8, 5, 32), torch.randn(2, 2, 5, 32)
    cos, sin = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)  # unsqueezes dim 1 itself
    got_q, got_k = rope_qk(q, k, cos.unsqueeze(1), sin.unsqueeze(1))
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    # partial rotary: the first 16 of each head rotate, the rest pass through
    got_q, _ = rope_qk(q, k, cos[..., :16].unsqueeze(1), sin[..., :16].unsqueeze(1))
    assert torch.equal(got_q[..., 16:], q[..., 16:])
    assert torch.equal(got_q[..., :16], apply_rotary_pos_emb(q[..., :16], k[..., :16], cos[..., :16], sin[..., :16])[0])


def test_activation_probe_and_gated():
    assert activation_name(ACT2FN["silu"]) is not None
    assert activation_name(ACT2FN["gelu_pytorch_tanh"]) is not None
    assert activation_name(torch.nn.Tanh()) is None  # not in the table: the MLP keeps its own forward
    gate_up = torch.randn(4, 2 * 24)
    got = fused.gated(gate_up, 24, activation_name(ACT2FN["silu"]))
    assert torch.equal(got, ACT2FN["silu"](gate_up[:, :24]) * gate_up[:, 24:])


def test_chained_activations_of_a_generic_model_compile_once_per_class(tmp_path, demo_model_dir):
    """BLOOM's GELU (eight elementwise kernels eagerly) runs as one compiled function shared by every layer; the
    model's logits stay those of the eager modules (inductor's CPU backend here, Triton on CUDA)."""
    from transformers import AutoModelForCausalLM

    from tests.models import write_tiny_model

    path = write_tiny_model(tmp_path, "bloom", demo_model_dir, num_layers=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 13, 2, 7, 11]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert fused.fuse_activations(model) == 3
        forwards = {id(m.forward) for m in model.modules() if type(m).__name__ == "BloomGelu"}
        assert len(forwards) == 1  # one compiled function for the class
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    assert fused.fuse_activations(torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(2, 2))) == 0


@pytest.fixture
def dynamo_config_restored():
    """compile_shapes="static-features" sets two dynamo options process-wide: as they were after the test."""
    config = torch._dynamo.config
    with config.patch(automatic_dynamic_shapes=config.automatic_dynamic_shapes, recompile_limit=config.recompile_limit):
        yield


@pytest.mark.parametrize("shapes,archs", [("static-features", ("qwen3", "phi3", "gemma")),  # the default
                                          ("dynamic", ("qwen3",))])
def test_the_fast_path_with_compiled_kernels_answers_like_hf_generate(shapes, archs, tmp_path, demo_model_dir,
                                                                      monkeypatch, dynamo_config_restored):
    """What CUDA runs, on inductor's CPU backend: the fused functions compiled (Qwen3's per-head q/k norms, Phi-3's
    partial rotary, Gemma's (1 + w) norms and tanh-GELU gated MLP), fp32, against HF generate token for token; with
    every dimension symbolic, and with only the token dimensions symbolic (EngineConfig.compile_shapes)."""
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.engine.llm_engine import LLMEngine
    from batchgen.worker.factory import build_llm_engine

    from tests.models import write_tiny_model
    from tests.test_models import hf_greedy, requests, run_engine

    compiled = fused.fused_functions()
    compiled.compile(shapes)
    for name in ("rms_norm", "add_rms_norm", "rope_qk", "gated"):
        monkeypatch.setattr(FUSED, name, getattr(compiled, name))
    for arch in archs:
        path = write_tiny_model(tmp_path / arch, arch, demo_model_dir)
        engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=3))
        assert isinstance(engine, LLMEngine)
        norms = [m for m in engine.model.modules() if type(m).__name__.endswith("RMSNorm")]
        assert norms and all(getattr(m, NORM_KIND_ATTR, None) is not None for m in norms), arch
        assert run_engine(engine, requests()) == hf_greedy(path, int8=False), arch
