"""The generic path's running batch: rows of a transformers DynamicCache, left-padded to one length.

TGI's CausalLM recipe: new requests are prefilled apart (left-padded among themselves), then their K/V is
left-padded to the running batch's length and concatenated on the batch axis; finished rows are dropped and the
all-padding columns at the left trimmed. The HF model's own forward does the rest: a 2-D attention mask hides
the padding, position ids count real tokens only, and its mask functions apply any sliding window on cache
indices, which advance one per token in every row, so the window stays exact and prompts may exceed it.
"""

import inspect
from dataclasses import dataclass

import torch


@dataclass
class ModelCalls:
    """What a model's forward accepts: BLOOM, for one, takes no position ids (ALiBi reads the mask)."""

    takes_position_ids: bool
    takes_logits_to_keep: bool
    cache_arg: str  # "cache" in current transformers, "past_key_values" before it
    pad_token_id: int

    @classmethod
    def of(cls, model: torch.nn.Module, pad_token_id: int | None) -> "ModelCalls":
        params = inspect.signature(model.forward).parameters
        return cls("position_ids" in params, "logits_to_keep" in params,
                   "cache" if "cache" in params else "past_key_values", pad_token_id or 0)


class PaddedBatch:
    """K/V of n rows [n, heads, length, head_dim] per layer, the mask [n, length] and each row's next position."""

    def __init__(self, cache, mask: torch.Tensor, next_positions: torch.Tensor):
        self.cache, self.mask, self.next_positions = cache, mask, next_positions

    @property
    def num_rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def mergeable(self) -> bool:
        """Whether rows can join and leave: only plain growing layers (not rolling buffers, not recurrent state)."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values)
                   if t is not None)

    def select(self, rows: list[int]) -> None:
        """Keeps these rows (in this order) and trims the columns that are padding in every row left."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask, self.next_positions = self.mask[index], self.next_positions[index]
        trim = int((self.mask.cumsum(-1) == 0).sum(-1).min()) if rows else 0
        self.mask = self.mask[:, trim:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, trim:]
            layer.values = layer.values[index, :, trim:]

    def crop(self) -> None:
        """Drops K/V a failed forward appended to some layers and not others (the mask still has the old length)."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, : self.length], layer.values[:, :, : self.length]

    def extend(self, other: "PaddedBatch") -> None:
        """Appends other's rows, left-padding whichever side is shorter."""
        length = max(self.length, other.length)
        self.mask = torch.cat([_pad_left(self.mask, length), _pad_left(other.mask, length)])
        self.next_positions = torch.cat([self.next_positions, other.next_positions])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, length, dim=2), _pad_left(theirs.keys, length, dim=2)])
            mine.values = torch.cat([_pad_left(mine.values, length, dim=2), _pad_left(theirs.values, length, dim=2)])


def prefill(model: torch.nn.Module, calls: ModelCalls, prompts: list[list[int]],
            device: torch.device) -> tuple[torch.Tensor, PaddedBatch]:
    """One left-padded forward over the prompts: last-token logits [n, vocab] and their new batch."""
    from transformers import DynamicCache

    length = max(len(p) for p in prompts)
    ids = torch.tensor([[calls.pad_token_id] * (length - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # No config: every layer a plain growing one, which rows can be concatenated into (the masks do the windows).
    cache = DynamicCache()
    logits = _forward(model, calls, ids, mask, positions, cache)
    return logits, PaddedBatch(cache, mask, positions[:, -1] + 1)


def decode(model: torch.nn.Module, calls: ModelCalls, batch: PaddedBatch, tokens: list[int]) -> torch.Tensor:
    """One token per row: next-token logits [n, vocab]. The batch grows by one column only if the forward succeeds."""
    ids = torch.tensor(tokens, device=batch.mask.device).unsqueeze(-1)
    mask = torch.cat([batch.mask, batch.mask.new_ones(batch.num_rows, 1)], dim=1)
    logits = _forward(model, calls, ids, mask, batch.next_positions.unsqueeze(-1), batch.cache)
    batch.mask, batch.next_positions = mask, batch.next_positions + 1
    return logits


def _forward(model, calls: ModelCalls, ids, mask, positions, cache) -> torch.Tensor:
    kwargs = {"input_ids": ids, "attention_mask": mask, calls.cache_arg: cache, "use_cache": True}
    if calls.takes_position_ids:
        kwargs["position_ids"] = positions
    if calls.takes_logits_to_keep:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs).logits[:, -1]


def _pad_left(t: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
