"""An RMSNorm and the int8 linear after it as one kernel (int8_ops.norm_quantize, worker/engine/norm_linear.py):
the residual add, the norm and the quantisation equal the functions it stands in for, under Triton's interpreter."""

import json

import pytest
import torch
from batchgen.worker.engine import fused, int8_linear, norm_linear
from batchgen.worker.engine.kernels import int8_ops, tuned
from batchgen.worker.engine.kernels.int8_gemv import GuardBuffers
from batchgen.worker.engine.kernels.int8_ops import norm_quantize, quantize_guarded, quantize_rows


def guard_buffers(k: int, dense_cols: list[int]) -> GuardBuffers:
    keep = torch.ones(k, dtype=torch.float16)
    keep[dense_cols] = 0
    return GuardBuffers(keep, torch.zeros(k), torch.zeros(k), 6.0)


def assert_quantised_from_x(got, guard: GuardBuffers | None, dense_cols: list[int], keep: bool) -> None:
    """A fused kernel's got.xq and got.absmax are quantize_guarded's (with a guard, its records too) or
    quantize_rows' of its own got.x, bit for bit; row 2 (zeros) quantised to zeros, not NaN."""
    if guard is not None:
        ref = guard_buffers(got.x.shape[1], dense_cols)
        assert torch.equal(torch.cat([*quantize_guarded(got.x, ref, keep=keep)], 1).float(),
                           torch.cat([got.xq, got.absmax], 1).float())
        assert torch.equal(guard.seen, ref.seen) and torch.equal(guard.hits, ref.hits)
    else:
        xq, absmax = quantize_rows(got.x)
        assert torch.equal(got.xq, xq) and torch.equal(got.absmax, absmax)
    assert not got.xq[2].any() and got.absmax[2] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gemma", [False, True])
def test_norm_quantize_equals_the_norm_then_the_quantiser(dtype, gemma):
    """Llama's and Gemma's norm, with and without the residual add, then quantize_rows (int_mm) or quantize_guarded
    with and without the dense columns zeroed: the residual bit for bit, the normed rows to the float32 mean's
    summation order, and from those rows the int8 values, absmax and the guard's records bit for bit. 96 columns
    (not a power of two: the block is masked past them), 7 rows, a row of zeros (quantised to zeros, not NaN)."""
    g = torch.Generator().manual_seed(1)
    m, k = 7, 96
    h = (torch.randn(m, k, generator=g) * 3).to(dtype)
    h[2] = 0
    delta = torch.randn(m, k, generator=g).to(dtype)
    delta[2] = 0
    h[4, 10] = 400.0  # normed to about 10 (twice that for Gemma): a column the guard records as a hit
    weight = (torch.randn(k, generator=g) * 0.5 + 1).to(dtype)
    weight[10] = 1
    eps = 1e-5
    for add in (None, delta):
        want_h, want_x = (fused.add_rms_norm(h, add, weight, eps, gemma) if add is not None
                          else (h, fused.rms_norm(h, weight, eps, gemma)))
        for dense_cols, keep in (([], False), ([3, 10], True), ([3, 10], False)):
            for guarded in (True, False):
                guard = guard_buffers(k, dense_cols) if guarded else None
                got = norm_quantize(h, weight, eps, gemma, add, guard, keep=keep, store_x=True)
                if dtype == torch.float16:
                    assert torch.equal(got.h, want_h)
                    torch.testing.assert_close(got.x, want_x, rtol=2e-3, atol=1e-3)
                else:  # the interpreter casts float32 to bf16 by truncation (the GPU rounds to nearest): an ulp at
                    # each cast (2^-7 at most, relative), the add's one and the norm's two
                    torch.testing.assert_close(got.h, want_h, rtol=2**-7, atol=0)
                    torch.testing.assert_close(got.x, want_x, rtol=2**-5, atol=1e-3)
                assert_quantised_from_x(got, guard, dense_cols, keep)
                if guard is not None:
                    assert guard.hits[10] == (0 if keep else 1)  # zeroed where the dense path runs
                without_x = norm_quantize(h, weight, eps, gemma, add,
                                          guard_buffers(k, dense_cols) if guarded else None, keep=keep)
                assert without_x.x is None and torch.equal(without_x.xq, got.xq)


def _tune_every_int8_linear(model: torch.nn.Module, tables, monkeypatch) -> None:
    """A table for this CPU with a launch for every int8 linear's shape at 1 to 512 rows: every batch takes the
    tuned Triton GEMM (under the interpreter), as a GPU with a table does."""
    launch = {"block_m": 16, "block_n": 128, "block_k": 128, "group_m": 2, "num_warps": 4, "num_stages": 2}
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, int8_linear.Int8Linear)}
    entries = [{"n": n, "k": k, "rows": 2 ** i, "launch": launch} for n, k in shapes for i in range(10)]
    tables.mkdir()
    monkeypatch.setattr(tuned, "TABLES", tables)
    tuned.table_path("cpu").write_text(json.dumps({"gemm": entries}))
    tuned.forget()
    monkeypatch.setattr(int8_linear, "USE_TUNED_GEMM", True)


def test_the_fast_path_runs_norms_and_gated_mlps_with_their_quantisers_and_answers_like_hf_generate(tmp_path,
                                                                                                    monkeypatch):
    """The int8 fast path with a tuned launch for every linear, on a model whose MLP is 256 wide (the rotation's
    block): each layer's two norms (the input norm, the residual add with the post-attention norm) quantise the
    q/k/v and gate/up inputs in their own kernel, the MLP's activation, rotation and quantiser run as one
    (gated_linear) with the residual added in the down GEMM's epilogue, and the engine answers as HF generate on the
    same model does (HF's forward runs every piece apart). With both off, neither kernel runs, and the answer stays."""
    from batchgen.worker.demo_model import write_demo_model
    from batchgen.worker.engine import gated_linear
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.factory import build_llm_engine

    from tests.test_models import oracle, requests, run_engine

    path = write_demo_model(tmp_path / "model", intermediate_size=256)
    engine = build_llm_engine(EngineConfig(model=str(path), max_batch_size=3))
    assert all(m.down_proj.rotate_block == 256 for m in engine.model.modules() if hasattr(m, "gate_up_proj"))
    _tune_every_int8_linear(engine.model, tmp_path / "tables", monkeypatch)
    calls, gated = [], []
    norm_real, gated_real = int8_ops.norm_quantize, int8_ops.gated_quantize
    monkeypatch.setattr(int8_ops, "norm_quantize", lambda h, *a, **kw: calls.append((h.shape[0], a[3] is not None))
                        or norm_real(h, *a, **kw))
    monkeypatch.setattr(int8_ops, "gated_quantize", lambda g, *a, **kw: gated.append((g.shape[0], a[2]))
                        or gated_real(g, *a, **kw))
    got = run_engine(engine, requests())
    layers = engine.model.config.num_hidden_layers
    assert calls and len(calls) % (2 * layers) == 0  # two a layer, in every forward
    assert sum(add for _, add in calls) == len(calls) // 2  # one of them after the residual add
    assert len(gated) == len(calls) // 2 and all(block == 256 for _, block in gated)  # one a layer, rotating
    assert got == oracle(path, engine)
    calls.clear()
    gated.clear()
    monkeypatch.setattr(norm_linear, "ENABLED", False)
    monkeypatch.setattr(gated_linear, "ENABLED", False)
    first = requests()[:1]
    assert run_engine(engine, first) == {first[0].key: got[first[0].key]} and calls == [] and gated == []
