"""The host CPU decode-attention kernel (small-VRAM mode), compiled by inductor here as on a GPU host.

Oracle: torch's sdpa in float64 over the same K/V (dequantized for int8), rows of unequal length masked.
"""

import pytest
import torch
import torch.nn.functional as F
from batchgen.worker.host_attention import Kernel, decode_attention, length_bias, quantize

ROWS, HEADS, GROUP, HEAD_DIM, MAX_LEN = 3, 2, 2, 16, 24


def reference(q, k, v, lengths, scale):
    mask = (torch.arange(k.shape[2])[None, :] < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale).float()


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    q = torch.randn(ROWS, HEADS, GROUP, HEAD_DIM)
    k, v = torch.randn(ROWS, HEADS, MAX_LEN, HEAD_DIM), torch.randn(ROWS, HEADS, MAX_LEN, HEAD_DIM)
    return q, k, v


@pytest.mark.parametrize("native", [True, False], ids=["native", "inductor"])
@pytest.mark.parametrize("kv_dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-5), (torch.bfloat16, 1e-5),
                                           (torch.int8, 1e-5)])
def test_compiled_kernel_equals_sdpa_over_the_stored_kv(inputs, kv_dtype, tol, native):
    q, k, v = inputs
    kernel = Kernel.build(kv_dtype, num_kv_heads=HEADS, group=GROUP, head_dim=HEAD_DIM, native=native)
    # this host has a C++ compiler; a silent fallback (inductor for native, eager for both) would hide a broken build
    assert kernel.compiled and kernel.native == native
    scale = HEAD_DIM**-0.5
    for length, lengths in ((MAX_LEN, [MAX_LEN, 7, 1]), (13, [13, 13, 13]), (20, [5, 20, 11])):
        ks = vs = None
        if kv_dtype == torch.int8:
            (keys, ks), (values, vs) = quantize(k[:, :, :length]), quantize(v[:, :, :length])
            k_ref, v_ref = keys.float() * ks[..., None], values.float() * vs[..., None]  # what the cache holds
        else:
            keys, values = k[:, :, :length].to(kv_dtype), v[:, :, :length].to(kv_dtype)
            k_ref, v_ref = keys.float(), values.float()
        lengths_t = torch.tensor(lengths)
        bias = length_bias(lengths_t, length)
        out = kernel(q, keys, values, ks, vs, bias, scale)
        torch.testing.assert_close(out, reference(q, k_ref, v_ref, lengths_t, scale), atol=tol, rtol=tol)
        eager = decode_attention(q, keys, values, ks, vs, bias, scale)
        torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


def test_int8_quantization_error_is_bounded_by_half_a_step():
    x = torch.randn(4, 3, 5, 64) * torch.linspace(0.1, 10, 5)[None, None, :, None]
    q8, scale = quantize(x)
    assert q8.dtype == torch.int8 and scale.shape == x.shape[:-1]
    assert (q8.float() * scale[..., None] - x).abs().max() <= (scale.max() / 2) * 1.0001
    assert q8.abs().amax(-1).eq(127).all()  # absmax maps to ±127


def test_the_native_kernel_refuses_inputs_that_do_not_fit_together(inputs):
    """A shape mistake in the engine must be an error, not a read past a cache row."""
    q, k, v = inputs
    kernel = Kernel.build(torch.bfloat16, num_kv_heads=HEADS, group=GROUP, head_dim=HEAD_DIM)
    keys, values = k.to(torch.bfloat16), v.to(torch.bfloat16)
    bias = length_bias(torch.tensor([MAX_LEN] * ROWS), MAX_LEN)
    assert kernel.native
    kernel(q, keys, values, None, None, bias, 1.0)  # fits
    for args in ((q, keys, values[:, :, :5], None, None, bias, 1.0), (q, keys, values, None, None, bias[:, :5], 1.0),
                 (q[:2], keys, values, None, None, bias, 1.0), (q, keys, values, torch.ones(3), None, bias, 1.0)):
        with pytest.raises(RuntimeError):
            kernel(*args)
