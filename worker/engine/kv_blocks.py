"""The KV block pool: which blocks of the paged cache each row holds. Pure Python, no torch.

The device cache is [layers, 1 + num_blocks, block_size, kv_heads, head_dim]; block 0 is scratch (what free
rows and padding rows of a decode step write to and never read), blocks 1..num_blocks are handed out. A row
reserves, at admission, the blocks its whole sequence can reach (prompt + max_tokens, within max_model_len)
and keeps them until it finishes, is aborted or requeued: no preemption, so a running row never waits for a
block. Each change of a row's blocks is recorded until the runner copies it into its device block table.
"""

from collections import deque

SCRATCH_BLOCK = 0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, max_blocks_per_row: int):
        if num_blocks < max_blocks_per_row:
            raise ValueError(f"{num_blocks} KV blocks cannot hold one row of {max_blocks_per_row} blocks")
        self.num_blocks, self.block_size, self.max_blocks_per_row = num_blocks, block_size, max_blocks_per_row
        self.free: deque[int] = deque(range(SCRATCH_BLOCK + 1, num_blocks + 1))
        self.rows: dict[int, list[int]] = {}  # row -> its blocks, in token order
        self.changes: dict[int, list[int]] = {}  # row -> its new blocks ([]: released) since take_changes

    def blocks_for(self, num_tokens: int) -> int:
        return min(self.max_blocks_per_row, -(-num_tokens // self.block_size))

    def can_reserve(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self.free)

    def reserve(self, row: int, num_tokens: int) -> list[int]:
        if row in self.rows:
            raise ValueError(f"row {row} already holds blocks")
        wanted = self.blocks_for(num_tokens)
        if wanted > len(self.free):
            raise ValueError(f"{wanted} blocks wanted, {len(self.free)} free")
        blocks = [self.free.popleft() for _ in range(wanted)]
        self.rows[row] = self.changes[row] = blocks
        return blocks

    def release(self, row: int) -> None:
        blocks = self.rows.pop(row, None)
        if blocks is not None:
            self.free.extend(blocks)
            self.changes[row] = []

    def move(self, src: int, dst: int) -> None:
        """Row src's blocks become row dst's (a free row): the K/V stays where it is, only the table rows change."""
        if dst in self.rows:
            raise ValueError(f"row {dst} already holds blocks")
        self.rows[dst] = self.changes[dst] = self.rows.pop(src)
        self.changes[src] = []

    def take_changes(self) -> dict[int, list[int]]:
        """Rows whose blocks changed since the last call (a released row: []), for the device block table."""
        changes, self.changes = self.changes, {}
        return changes

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)
