"""Which waiting inputs share the next embedding forward: pure Python, testable without a model.

The oldest input always goes, so none waits forever; the inputs nearest its length join it while the padded batch
(rows x its longest input) stays within the token budget, so little of the forward is spent on padding.
"""

from collections.abc import Sequence


def plan(lengths: Sequence[int], *, max_tokens: int, max_rows: int) -> list[int]:
    """Indexes into lengths (oldest first) of the inputs to run now, ascending; the oldest alone may exceed
    max_tokens (it has to run some time, and alone it pads nothing)."""
    if not lengths:
        return []
    head = lengths[0]
    chosen, longest = [0], head
    for i in sorted(range(1, len(lengths)), key=lambda i: (abs(lengths[i] - head), i)):
        if len(chosen) == max_rows:
            break
        if max(longest, lengths[i]) * (len(chosen) + 1) <= max_tokens:
            chosen.append(i)
            longest = max(longest, lengths[i])
    return sorted(chosen)
