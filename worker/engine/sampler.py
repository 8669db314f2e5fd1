"""Next-token choice per row: greedy argmax, or temperature + top-p sampling with per-request seeded noise.

Sampling uses the exponential race (argmax of probs / E, E ~ Exp(1) i.i.d.), which draws exactly from
probs. The noise comes from a CPU generator seeded by (request seed, output index), so a seeded request
samples the same tokens whatever its batch mates, row, or how often it was restarted after an OOM.
"""

from collections.abc import Sequence as Seq

import torch
from batchgen.jobs.schema import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # golden-ratio increment: neighbouring (seed, index) pairs get unrelated streams


def noise_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + (index + 1) * _MIX) % (2**63)


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zeroes the tail outside the smallest set whose mass reaches top_p (the top token always stays)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p.unsqueeze(-1), 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def exponential_noise(seeds: Seq[int], indices: Seq[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    rows = []
    for seed, index in zip(seeds, indices, strict=True):
        gen.manual_seed(noise_seed(seed, index))
        rows.append(torch.empty(vocab_size, dtype=torch.float32).exponential_(generator=gen))
    return torch.stack(rows).to(device)


def sample(
    logits: torch.Tensor, params: Seq[SamplingParams], seeds: Seq[int], indices: Seq[int]
) -> list[int]:
    """logits [n, vocab] (any float dtype) -> one token id per row; indices = output position of the token."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)
        probs = torch.softmax(logits[idx] / temps.unsqueeze(-1), dim=-1)
        probs = top_p_filter(probs, top_p)
        noise = exponential_noise([seeds[i] for i in rows], [indices[i] for i in rows], logits.shape[-1],
                                  logits.device)
        tokens[idx] = (probs / noise).argmax(dim=-1)
    return tokens.tolist()
