"""The generic path's forwards over left-padded rows, and a fresh prefill's batch.

TGI's CausalLM recipe: new requests are prefilled apart (left-padded among themselves), then join the running
batch (slot_batch.py); finished rows leave and the all-padding columns at the left are trimmed. The HF model's own
forward does the rest: a 2-D attention mask hides the padding, position ids count real tokens only, and its mask
functions apply any sliding window on cache indices, which advance one per token in every row, so the window stays
exact and prompts may exceed it.
"""

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import (
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionCacheLayerMixin,
)


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
    """K/V of n rows [n, heads, length, head_dim] per layer, the mask [n, length] and each row's next position.
    A fresh prefill's batch; the engine moves it into slots (slot_batch.py) where its layers allow, and runs it as
    it is otherwise (rolling or recurrent layers): then no row joins until it has drained."""

    mergeable = False

    def __init__(self, cache, mask: torch.Tensor, next_positions: torch.Tensor):
        self.cache, self.mask, self.next_positions = cache, mask, next_positions

    @property
    def num_rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values)
                   if isinstance(t, torch.Tensor))

    def before_decode(self) -> None:
        pass

    def advance(self, mask: torch.Tensor) -> None:
        self.mask, self.next_positions = mask, self.next_positions + 1

    def select(self, rows: list[int]) -> list[int]:
        """Keeps these rows (in this order) and trims the columns that are padding in every row left."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask, self.next_positions = self.mask[index], self.next_positions[index]
        trim = int((self.mask.cumsum(-1) == 0).sum(-1).min()) if rows else 0
        self.mask = self.mask[:, trim:]
        for layer in self.cache.layers:
            if isinstance(layer, LinearAttentionCacheLayerMixin):  # a conv / recurrent state per row, no columns
                LinearAttentionCacheLayerMixin.reorder_cache(layer, index)
            if getattr(layer, "keys", None) is not None:  # attention K/V (a hybrid layer has both)
                layer.keys = layer.keys[index, :, trim:]
                layer.values = layer.values[index, :, trim:]
        return rows

    def crop(self) -> None:
        """Drops K/V a failed forward appended to some layers and not others (the mask still has the old length)."""
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None:
                layer.keys, layer.values = layer.keys[:, :, : self.length], layer.values[:, :, : self.length]


def prefill(model: torch.nn.Module, calls: ModelCalls, prompts: list[list[int]],
            device: torch.device) -> tuple[torch.Tensor, PaddedBatch]:
    """One left-padded forward over the prompts: last-token logits [n, vocab] and their new batch."""
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[calls.pad_token_id] * (length - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = new_cache(model.config)
    logits = forward(model, calls, ids, mask, positions, cache)
    return logits, PaddedBatch(cache, mask, positions[:, -1] + 1)


def new_cache(config) -> DynamicCache:
    """A prefill's empty cache. Attention layers are plain growing ones, which rows can be concatenated into and
    columns trimmed from (the masks do the windows); a layer that holds a state instead (a hybrid model's conv, SSM
    or linear attention) is the config's own kind, or the model's forward finds no state to update."""
    try:
        cache = DynamicCache(config=config)
    except (AttributeError, KeyError, TypeError, ValueError):  # a config its cache cannot read: attention only
        return DynamicCache()
    if not any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in cache.layers):
        return DynamicCache()
    cache.layers = [_growing(layer) for layer in cache.layers]
    return cache


def _growing(layer: object) -> object:
    """A windowed layer's unwindowed kind (a window keeps only its last columns, which select's trim would cut)."""
    if not isinstance(layer, DynamicSlidingWindowLayer):
        return layer
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        return LinearAttentionAndFullAttentionLayer(number_of_states=layer.number_of_states)
    return DynamicLayer()


def decode(model: torch.nn.Module, calls: ModelCalls, batch, tokens: list[int]) -> torch.Tensor:
    """One token per row: next-token logits [n, vocab]. The batch grows by one column only if the forward succeeds."""
    ids = torch.tensor(tokens, device=batch.mask.device).unsqueeze(-1)
    mask = torch.cat([batch.mask, batch.mask.new_ones(batch.num_rows, 1)], dim=1)
    batch.before_decode()
    logits = forward(model, calls, ids, mask, batch.next_positions.unsqueeze(-1), batch.cache)
    batch.advance(mask)
    return logits


def forward(model, calls: ModelCalls, ids, mask, positions, cache) -> torch.Tensor:
    kwargs = {"input_ids": ids, "attention_mask": mask, calls.cache_arg: cache, "use_cache": True}
    if calls.takes_position_ids:
        kwargs["position_ids"] = positions
    if calls.takes_logits_to_keep:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs).logits[:, -1]
