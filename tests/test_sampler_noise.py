"""The sampler's noise: Exp(1) draws made on the device from a counter-based hash of (seed, index, token id)."""

import torch
from batchgen.worker.engine import sampler
from batchgen.worker.engine.sampler import exponential_noise

CPU = torch.device("cpu")


def test_each_row_is_a_function_of_its_seed_and_index_alone():
    batch = exponential_noise([3, 9, 3, 3], [0, 0, 0, 1], 1000, CPU)
    alone = exponential_noise([3], [0], 1000, CPU)
    assert torch.equal(batch[0], alone[0]) and torch.equal(batch[2], alone[0])
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[0], batch[3])


def test_rows_split_into_passes_give_the_same_noise(monkeypatch):
    whole = exponential_noise(list(range(7)), [5] * 7, 300, CPU)
    monkeypatch.setattr(sampler, "_NOISE_CHUNK", 600)  # two rows a pass
    assert torch.equal(exponential_noise(list(range(7)), [5] * 7, 300, CPU), whole)


def test_the_noise_is_exponential_and_the_race_draws_from_probs():
    noise = exponential_noise(list(range(64)), [0] * 64, 4096, CPU)
    assert noise.min() > 0 and abs(noise.mean().item() - 1) < 0.01 and abs(noise.std().item() - 1) < 0.02
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 40_000
    for seeds, indices in (([11] * n, list(range(n))), (list(range(n)), [0] * n)):  # across steps, across requests
        tokens = (probs / exponential_noise(seeds, indices, 4, CPU)).argmax(-1)
        freq = torch.bincount(tokens, minlength=4).double() / n
        # 5 standard errors of each frequency: a biased or correlated stream fails, sampling noise does not
        assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt()).all(), freq


def test_the_hash_is_splitmix64_bit_for_bit():
    """The int64 tensor ops (products wrapping, logical shifts emulated) compute splitmix64 exactly, as Python's
    unbounded ints mod 2^64 do: the bits any device must reproduce."""
    from batchgen.worker.engine.sampler import _to_signed, noise_seed, uniform_hash

    mask = (1 << 64) - 1

    def splitmix(key: int, token: int) -> int:
        z = (key + (token + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    keys = [noise_seed(s, i) for s, i in ((0, 0), (7, 3), (2**40 + 5, 1000), (123456789, 0))]
    got = uniform_hash(torch.tensor([_to_signed(k) for k in keys]), 50)
    want = torch.tensor([[((splitmix(k, t) >> 40) + 0.5) / (1 << 24) for t in range(50)] for k in keys])
    assert torch.equal(got, want.float())
