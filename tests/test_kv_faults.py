"""benchmarks/kv_faults' check of an int8 pool: every (token, head) of a sound block holds a +-127 (each token's
head quantised on its own absmax); a V^T block sealed a second time does not."""

import pytest
import torch

from benchmarks.kv_faults import block_faults

BS = 64


@pytest.mark.parametrize("transposed", [False, True])
def test_a_sound_int8_pool_has_no_faults_and_a_block_sealed_twice_has(transposed):
    pytest.importorskip("triton")
    from batchgen.worker.engine.kernels.kv_store import cache_slots, seal_blocks, store_kv
    from batchgen.worker.engine.model_runner import kv_pool

    g = torch.Generator().manual_seed(0)
    table = torch.tensor([[3, 1], [2, 4]], dtype=torch.int32)
    lens = torch.tensor([BS + 5, 2 * BS])  # row 0: one whole block and a partial one; row 1: two whole blocks
    v = kv_pool((1, 5, BS, 2, 32), torch.int8, torch.device("cpu"), True, transposed)[0]
    scale = torch.zeros(5, 2, BS)
    positions = torch.cat([torch.arange(n) for n in lens.tolist()])
    slots = cache_slots(v, torch.arange(2).repeat_interleave(lens), positions, table)
    store_kv(v, slots, torch.randn(len(positions), 2, 32, generator=g).half(), scale, triton_kernel=True)
    whole = torch.tensor([3, 2, 4])
    assert block_faults(v, whole) == 0
    assert block_faults(v, torch.tensor([], dtype=torch.long)) == 0
    if transposed:  # block 4's last slot sealed again: V^T turned over a second time
        seal_blocks(v, torch.tensor([4 * BS + BS - 1]), True)
        assert block_faults(v, whole) > 0
        assert block_faults(v, torch.tensor([3, 2])) == 0
    else:  # one (token, head) written over without its absmax: one fault
        v[3, 0, 0] = v[3, 0, 0] // 2
        assert block_faults(v, whole) == 1
