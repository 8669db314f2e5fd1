"""A gated MLP's activation, the down projection's input rotation and its quantisation as one kernel
(int8_ops.gated_quantize), and the residual add in the int8 GEMM's epilogue: each equals the functions it stands in
for, under Triton's interpreter."""

import pytest
import torch
from batchgen.worker.engine import fused, rotation
from batchgen.worker.engine.kernels import int8_ops
from batchgen.worker.engine.kernels.int8_ops import gated_quantize

from tests.test_norm_linear import assert_quantised_from_x, guard_buffers


def _gate_up(dtype: torch.dtype, m: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(m, 2 * k, generator=g) * 3).to(dtype)
    gate_up[2] = 0  # a row of zeros: quantised to zeros, not NaN
    gate_up[4, 10], gate_up[4, k + 10] = 9.0, 40.0  # act · up ≈ 360 at column 10: a column the guard records
    return gate_up


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["SiLU", "GELUTanh"])
def test_gated_quantize_equals_the_activation_then_the_quantiser(dtype, act):
    """fused.gated, then quantize_rows (int_mm) or quantize_guarded with and without the dense columns zeroed: the
    activations to an ulp of the activation's exp (bf16: the interpreter's truncating casts), and from those
    activations the int8 values, absmax and the guard's records bit for bit. 320 columns, in one tile of 1,024 and
    in three of 128 (the last masked past them)."""
    m, k = 7, 320
    gate_up = _gate_up(dtype, m, k)
    want = fused.gated(gate_up, k, act)
    for dense_cols, keep in (([], False), ([3, 10], True), ([3, 10], False)):
        for guarded in (True, False):
            guard = guard_buffers(k, dense_cols) if guarded else None
            got = gated_quantize(gate_up, k, act, 0, guard, keep=keep, store_x=True, tile=128 if guarded else 1024)
            ulp = 2**-10 if dtype == torch.float16 else 2**-6
            torch.testing.assert_close(got.x, want, rtol=ulp, atol=1e-4)
            assert_quantised_from_x(got, guard, dense_cols, keep)
            if guard is not None:
                assert guard.hits[10] == (0 if keep else 1)  # zeroed where the dense path runs
    without_x = gated_quantize(gate_up, k, act, 0)
    assert without_x.x is None and torch.equal(without_x.xq, got.xq)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gated_quantize_rotates_as_the_block_hadamard(dtype):
    """With the 256-wide rotation (two tf32 dots over H16 ⊗ H16): the rotated activations equal rotation.rotate of
    the kernel's own unrotated ones, computed in float64 and rounded once, to an ulp (the kernel's sums keep ~21
    bits); the int8 values, absmax and guard records equal quantize_guarded's of those rotated rows."""
    m, k = 5, 768  # three blocks: one a tile, or tiles of two (the second masked past its first block)
    gate_up = _gate_up(dtype, m, k)
    plain = gated_quantize(gate_up, k, "SiLU", 0, store_x=True).x
    want = rotation.rotate(plain.double(), 256).to(dtype)
    assert not torch.allclose(want.float(), plain.float(), atol=1e-2)  # the rotation moves every value
    for tile in (256, 512):
        guard = guard_buffers(k, [5])
        got = gated_quantize(gate_up, k, "SiLU", 256, guard, keep=True, store_x=True, tile=tile)
        torch.testing.assert_close(got.x, want, rtol=2**-10 if dtype == torch.float16 else 2**-7, atol=1e-4)
        assert_quantised_from_x(got, guard, [5], True)


def test_gated_quantize_refuses_what_it_does_not_build():
    gate_up = torch.zeros(2, 512, dtype=torch.float16)
    for act, block, size in (("GELUActivation", 0, 256), ("SiLU", 128, 256), ("SiLU", 0, 200)):
        with pytest.raises(ValueError, match="gated_quantize takes"):
            gated_quantize(gate_up, size, act, block)


@pytest.mark.parametrize("dense", [False, True])
def test_the_gemm_adds_the_residual_as_torch_does(dense):
    """int8_matmul_dequant(residual=r) equals r + int8_matmul_dequant(...) bit for bit: the product rounded to the
    output dtype, then added (with and without the dense columns in the epilogue; 40 rows, not a tile's multiple)."""
    g = torch.Generator().manual_seed(3)
    m, n, k = 40, 96, 64
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    cb = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    absmax = torch.rand(m, 1, generator=g) * 4
    scb = torch.rand(n, generator=g)
    bias = torch.randn(n, generator=g).half()
    residual = (torch.randn(m, n, generator=g) * 8).half()
    columns = None
    if dense:
        x = torch.randn(m, k, generator=g).half()
        columns = int8_ops.DenseColumns(x, torch.tensor([3, 0]), torch.randn(2, n, generator=g).half())
    launch = dict(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2)
    plain = int8_ops.int8_matmul_dequant(xq, absmax, cb, scb, bias, torch.float16, dense=columns, **launch)
    got = int8_ops.int8_matmul_dequant(xq, absmax, cb, scb, bias, torch.float16, dense=columns, residual=residual,
                                       **launch)
    assert torch.equal(got, residual + plain)
    assert not torch.equal(got, plain)


def test_the_engine_takes_the_tuned_launch_of_the_gated_kernel(tmp_path, monkeypatch):
    """gated_linear.gated_launch: the "gated" section's launch nearest the rows (within a factor of two), else the
    kernel's defaults; the launch it picks computes the same int8 values."""
    import json

    from batchgen.worker.engine.gated_linear import gated_launch
    from batchgen.worker.engine.kernels import tuned

    monkeypatch.setattr(tuned, "TABLES", tmp_path)
    launch = {"tile": 256, "num_warps": 2}
    tuned.table_path("cpu").write_text(json.dumps({"gated": [{"n": 512, "k": 512, "rows": 64, "launch": launch}]}))
    tuned.forget()
    try:
        assert gated_launch(100, 512, "cpu") == launch and gated_launch(200, 512, "cpu") == {}
        assert gated_launch(64, 1024, "cpu") == {}  # another width
        gate_up = _gate_up(torch.float16, 5, 512)
        assert torch.equal(gated_quantize(gate_up, 512, "SiLU", 256, **gated_launch(64, 512, "cpu")).xq,
                           gated_quantize(gate_up, 512, "SiLU", 256).xq)
    finally:
        tuned.forget()
