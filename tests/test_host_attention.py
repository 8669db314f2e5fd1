"""The host CPU decode-attention kernel (small-VRAM mode), compiled by inductor here as on a GPU host.

Oracle: torch's sdpa in float64 over the same K/V (dequantized for int8), rows of unequal length masked.
"""

import pytest
import torch
import torch.nn.functional as F
from batchgen.worker.offload.host_attention import (
    Kernel,
    decode_attention,
    length_bias,
    native_store,
    quantize,
)

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


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_the_native_store_writes_what_index_put_writes(kv_dtype):
    """A decode step's new K/V (and int8 scales) land at each row's position of its cache row, nowhere else."""
    store = native_store()
    assert store is not None
    torch.manual_seed(1)
    rows, heads, max_len, d, layer, lo = 5, 3, 11, HEAD_DIM, 4, 1
    keys = torch.zeros(7, rows + 2, heads, max_len, d, dtype=kv_dtype)
    values = torch.zeros_like(keys)
    scales = [torch.zeros(keys.shape[:4]) for _ in range(2)] if kv_dtype == torch.int8 else None
    k, v = torch.randn(rows, 3 * heads, d).split([heads, 2 * heads], dim=1)[1].chunk(2, dim=1)  # strided, as sent
    new_scales = (None, None)
    if scales is not None:
        (k, ks), (v, vs) = quantize(k), quantize(v)
        new_scales = (ks, vs)
    else:
        k, v = k.to(kv_dtype), v.to(kv_dtype)
    positions = torch.tensor([3, 0, 10, 7, 3])
    expected = [t.clone() for t in [keys, values] + (scales or [])]
    where = (layer, torch.arange(lo, lo + rows), slice(None), positions)
    for t, new in zip(expected, [k, v, *new_scales][: len(expected)], strict=True):
        t[where] = new
    cache_scales = (None, None) if scales is None else tuple(s[layer, lo:lo + rows] for s in scales)
    store(keys[layer, lo:lo + rows], values[layer, lo:lo + rows], *cache_scales, k, v, *new_scales, positions)
    for got, want in zip([keys, values] + (scales or []), expected, strict=True):
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError):  # a position past the cache
        store(keys[layer, lo:lo + rows], values[layer, lo:lo + rows], *cache_scales, k, v, *new_scales,
              torch.full((rows,), max_len))
