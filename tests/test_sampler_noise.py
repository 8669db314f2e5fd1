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
