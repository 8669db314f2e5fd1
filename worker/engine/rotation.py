"""A block Hadamard rotation of a linear's input, folded into its int8 weights (`--int8-rotate down`).

For an orthonormal, symmetric H (Sylvester's, scaled by 1/√n), (x·H)(W·H)ᵀ = x·Wᵀ, so a linear computes the same
function with its weight rows rotated once at load and each input rotated on the way in (H block-diagonal: one
H over each run of BLOCK columns, or of the largest power of two under it that divides the width). The product is
exact; what changes is what int8 rounds. A gated MLP's down projection reads act(gate)·up, a heavy-tailed input
whose per-token absmax sits far above its typical value. Rotated, every column is a mix of BLOCK of them, so the
tails spread out and the per-token int8 scale shrinks.
That is QuaRot's (Ashkboos et al., 2024) online rotation of that input, with block-diagonal Hadamard blocks.
benchmarks/quality.py measures it (variant default_rotated).

The weights are rotated from bnb's int8 rows (Int8Linear.rotate_input: dequantised, rotated, quantised again per
row), so they are rounded twice; the quality benchmark measured the result within #20's goals, at its speed bounds,
so it is the default wherever the outlier kernel runs (--int8-rotate auto; docs/benchmarks.md).
"""

import functools

import torch

BLOCK = 256


@functools.cache
def hadamard(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sylvester's n×n Hadamard matrix over √n: orthonormal and symmetric (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard block needs a power of two, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return (h / n ** 0.5).to(device=device, dtype=dtype)


MIN_BLOCK = 64  # a smaller block mixes too few columns to spread a tail


def block_for(in_features: int) -> int:
    """The largest power of two up to BLOCK that divides in_features; 0 where it is under MIN_BLOCK."""
    block = BLOCK
    while block >= MIN_BLOCK and in_features % block:
        block //= 2
    return block if block >= MIN_BLOCK else 0


def rotate(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """x [..., k] times the block-diagonal Hadamard matrix (its own inverse: rotating twice gives x back)."""
    h = hadamard(block, x.device, x.dtype)
    return (x.reshape(*x.shape[:-1], -1, block) @ h).reshape(x.shape)

