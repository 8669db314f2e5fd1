"""Next-token choice per row: greedy argmax, or temperature + top-k + top-p + min-p sampling with per-request
seeded noise, after the rows' logits processors and grammar masks; plus the raw logprobs rows asked for.

Sampling uses the exponential race (argmax of probs / E, E ~ Exp(1) i.i.d.), which draws exactly from
probs. The noise is a counter-based hash of (request seed, output index, token id) computed on the device, so a
seeded request samples the same tokens whatever its batch mates, row, or how often it was restarted after an OOM.
Every stage runs over the rows that need it only: a batch of plain greedy rows is one argmax.
"""

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from batchgen.worker.engine import logits_processors
from batchgen.worker.engine.host_copy import to_device
from batchgen.worker.engine.sequence import Sequence, TokenLogprobs
from batchgen.worker.engine.structured import StructuredOutput

_MIX = 0x9E3779B97F4A7C15  # golden-ratio increment: neighbouring (seed, index) pairs get unrelated streams
_CHOICE_MIX = 0xD1B54A32D192ED03  # a second odd constant: choice seeds never collide with noise seeds


def noise_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + (index + 1) * _MIX) % (2**63)


def choice_seed(seed: int, choice: int) -> int:
    """Choice i of a request with n > 1 samples under its own seed, a pure function of (seed, i); choice 0 keeps
    the request's seed, so n = 1 and the first of n choices agree."""
    return seed if choice == 0 else (seed * 0x2545F4914F6CDD1D + choice * _CHOICE_MIX) % (2**63)


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[TokenLogprobs | None]  # per row: set where params.logprobs is not None


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zeroes the tail outside the smallest set whose mass reaches top_p (the top token always stays)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p.unsqueeze(-1), 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keeps each row's top_k logits (ties with the k-th kept, as HF's TopKLogitsWarper); top_k 0 keeps all."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1).unsqueeze(-1))
    return logits.masked_fill(logits < kth, float("-inf"))


def min_p_filter(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zeroes tokens less likely than min_p times the row's top probability (min_p 0 keeps all)."""
    top = probs.max(dim=-1, keepdim=True).values
    return probs.masked_fill(probs < min_p.unsqueeze(-1) * top, 0.0)


def _to_signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_SPLITMIX = [_to_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]
_NOISE_CHUNK = 1 << 23  # elements per pass: the int64 temporaries stay a few hundred MB at any vocab


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_hash(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """keys [rows] int64 -> [rows, vocab] float32 in (0, 1): splitmix64 of (key, token id), a counter-based
    generator (as Philox is) in plain integer ops, so every device computes the same bits (int64 products wrap)."""
    z = keys.unsqueeze(-1) + (torch.arange(1, vocab_size + 1, device=keys.device) * _SPLITMIX[0])
    z = (z ^ _shr(z, 30)) * _SPLITMIX[1]
    z = (z ^ _shr(z, 27)) * _SPLITMIX[2]
    z = z ^ _shr(z, 31)
    return (_shr(z, 40).float() + 0.5) * (1.0 / (1 << 24))  # the top 24 bits, centred: never 0 or 1


def exponential_noise(seeds: Seq[int], indices: Seq[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [rows, vocab] on the device, each row a pure function of (seed, index): one transfer of the
    row keys, the draws made where they are used (a host generator took ~1 ms a row at a 32k vocabulary)."""
    keys = to_device([_to_signed(noise_seed(s, i)) for s, i in zip(seeds, indices, strict=True)], device)
    rows = max(1, _NOISE_CHUNK // vocab_size)
    return torch.cat([-torch.log(uniform_hash(keys[i:i + rows], vocab_size)) for i in range(0, len(keys), rows)])


def sample(logits: torch.Tensor, seqs: Seq[Sequence], grammar: StructuredOutput | None = None) -> Sampled:
    """logits [rows, vocab] (any float dtype), one row per sequence -> one token id per row (and logprobs)."""
    logits = logits.float()
    want_logprobs = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    raw = logits[want_logprobs].log_softmax(dim=-1) if want_logprobs else None  # OpenAI reports the raw model's
    if logits_processors.needed(seqs) or (grammar is not None and any(s.matcher is not None for s in seqs)):
        model_logits, logits = logits, logits.clone()
        logits_processors.apply(logits, seqs)
        if grammar is not None:
            grammar.mask(logits, seqs)
            _end_dead_ends(logits, model_logits, seqs, grammar)
    tokens = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if rows:
        tokens[rows] = _draw(logits[rows], [seqs[i] for i in rows])
    token_list = tokens.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
    if raw is not None:
        for i, lp in zip(want_logprobs, _logprobs(raw, [token_list[i] for i in want_logprobs],
                                                  [seqs[i].params.logprobs for i in want_logprobs]), strict=True):
            logprobs[i] = lp
    return Sampled(token_list, logprobs)


def _end_dead_ends(logits: torch.Tensor, model_logits: torch.Tensor, seqs: Seq[Sequence],
                   grammar: StructuredOutput) -> None:
    """A row left no token (its grammar can only end, min_tokens bans the end) takes its grammar's mask alone: it
    ends short of min_tokens with output its format holds, not with a filler token the grammar refused."""
    dead = (~logits.isfinite().any(dim=-1)).nonzero().flatten().tolist()
    if dead:
        rows = model_logits[dead].clone()
        grammar.mask(rows, [seqs[i] for i in dead])
        logits[dead] = rows


def pick(logits: torch.Tensor, seqs: Seq[Sequence], ahead: int, *, by_row: bool = True) -> torch.Tensor:
    """The next token of each row of logits [rows, vocab] on the device, without reading it: argmax, and for the
    sampled rows among seqs (each at logits[seq.row]; by_row=False: at logits[i] for seqs[i], as a prefill's
    logits are) the draw sample() makes, their `ahead` tokens beyond output_ids counted in the noise index. Rows
    needing more (logprobs, processors, grammars) use sample()."""
    tokens = logits.argmax(dim=-1)  # as sample()'s over float32: the cast is exact and keeps the order
    drawn = [(s.row if by_row else i, s) for i, s in enumerate(seqs) if not s.params.greedy]
    if drawn:
        rows = to_device([r for r, _ in drawn], logits.device)
        tokens[rows] = _draw(logits[rows].float(), [s for _, s in drawn], ahead)  # only the sampled rows cast
    return tokens


def _draw(logits: torch.Tensor, seqs: Seq[Sequence], ahead: int = 0) -> torch.Tensor:
    """HF's warper order: temperature, top-k, top-p, min-p; then the seeded exponential race. Each parameter
    reaches the device without waiting for it (pick() runs while an earlier step is still queued)."""
    device = logits.device
    params = [s.params for s in seqs]
    logits = logits / to_device([p.temperature for p in params], device, torch.float32).unsqueeze(-1)
    if any(p.top_k > 0 for p in params):
        logits = top_k_filter(logits, to_device([p.top_k for p in params], device))
    probs = torch.softmax(logits, dim=-1)
    probs = top_p_filter(probs, to_device([p.top_p for p in params], device, torch.float32))
    if any(p.min_p > 0 for p in params):
        probs = min_p_filter(probs, to_device([p.min_p for p in params], device, torch.float32))
    noise = exponential_noise([s.seed for s in seqs], [len(s.output_ids) + ahead for s in seqs], logits.shape[-1],
                              device)
    return (probs / noise).argmax(dim=-1)


def _logprobs(raw: torch.Tensor, tokens: list[int], num_top: list[int]) -> list[TokenLogprobs]:
    """The sampled tokens' logprobs and each row's top alternatives, in one transfer to the host."""
    chosen = raw.gather(-1, torch.tensor(tokens, device=raw.device).unsqueeze(-1)).squeeze(-1)
    top = raw.topk(max(num_top), dim=-1) if max(num_top) else None
    chosen_list = chosen.tolist()
    top_values = top.values.tolist() if top is not None else [[] for _ in tokens]
    top_ids = top.indices.tolist() if top is not None else [[] for _ in tokens]
    return [TokenLogprobs(chosen_list[i], top_ids[i][:k], top_values[i][:k]) for i, k in enumerate(num_top)]
