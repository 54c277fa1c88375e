"""Sampler: logits of the rows that produce a token this step -> next token ids (and logprobs).

Everything runs on the logits' device in a handful of batched ops; the only host sync is reading
the sampled ids back. Random draws use gpt-fast's trick, argmax(probs / Exponential(1)), which is
an exact sample from probs; seeded rows draw their noise from their own generator, so a seeded
request gives the same tokens whatever else is in the batch.

On a GPU every batch with a sampled row draws in one Triton kernel instead (`ops.triton_sampling`:
the same draw, Gumbel-max, in one read of the logits rather than about eleven; top-k / top-p /
min-p still sort first and leave -inf where they cut). Each row's noise comes from a seed drawn
for it this step, from its own generator when the request is seeded: one draw a step whatever the
other rows ask for, so a seeded request repeats in any batch there too.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from engine.device_io import host_to_device
from engine.sampling_params import SamplingParams

# Devices whose sampled rows draw in the fused Triton kernel (none where triton is not installed).
FUSED_SAMPLING_DEVICES = ("cuda",) if importlib.util.find_spec("triton") is not None else ()
_SEED_BOUND = 2**62


@dataclass
class SamplingBatch:
    """Per-row sampling inputs, built by the model runner."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    token_ids: list[list[int]]  # each row's prompt + output so far (the sequence's own list: not copied)
    num_prompt_tokens: list[int]
    eos_token_ids: set[int]

    def prompt_token_ids(self) -> list[list[int]]:
        return [t[:n] for t, n in zip(self.token_ids, self.num_prompt_tokens)]

    def output_token_ids(self) -> list[list[int]]:
        return [t[n:] for t, n in zip(self.token_ids, self.num_prompt_tokens)]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] on the logits' device (reading it back is the step's host sync)
    # Present when some row asked for logprobs (computed for every row, read only where asked):
    sampled_logprobs: torch.Tensor | None = None  # [N] logprob of the sampled token
    sampled_ranks: torch.Tensor | None = None  # [N] rank of the sampled token (1 = most likely)
    top_logprobs: torch.Tensor | None = None  # [N, K]
    top_token_ids: torch.Tensor | None = None  # [N, K]


def sample(logits: torch.Tensor, batch: SamplingBatch, max_logprobs: int) -> SamplerOutput:
    """logits: [N, vocab], one row per sampled sequence, in float32 or the model's dtype (widened
    here unless the rows only need an argmax or the fused kernel, which read them as they are)."""
    num_rows, vocab = logits.shape
    device = logits.device
    params = batch.params
    # The checks of the whole batch look at each SamplingParams object once: rows mostly share a
    # few (LLM.generate gives every prompt the same one).
    distinct = list({id(p): p for p in params}.values())
    greedy_only = all(p.greedy for p in distinct)
    fused = not greedy_only and device.type in FUSED_SAMPLING_DEVICES
    filtered = _needs_filter(distinct, vocab)
    # Logprobs are of the model's own distribution, before penalties and temperature (as vLLM).
    want_logprobs = max((p.logprobs for p in distinct if p.logprobs is not None), default=None)
    blocked = _min_token_blocks(batch, vocab) if any(p.min_tokens for p in distinct) else []
    edits = bool(blocked) or _has_penalties(distinct) or any(p.logit_bias for p in distinct)
    if want_logprobs is not None or edits or filtered or not (greedy_only or fused):
        logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs is not None else None

    if edits:
        logits = _apply_logit_bias(logits, params)
        logits = _apply_penalties(logits, batch)
        logits = _block(logits, blocked)

    if greedy_only:
        token_ids = logits.argmax(dim=-1)
    elif fused:
        temperatures = [0.0 if p.greedy else p.temperature for p in params]
        if filtered:  # top-k / top-p / min-p act on the tempered distribution: temper and cut, then draw at T = 1
            tempered = host_to_device([1.0 if p.greedy else p.temperature for p in params], torch.float32, device)
            logits = _filter(logits / tempered[:, None], params)
            temperatures = [0.0 if p.greedy else 1.0 for p in params]
        token_ids = _sample_fused(logits, batch, temperatures)
    else:
        temperature = host_to_device([1.0 if p.greedy else p.temperature for p in params], torch.float32, device)
        probs = _filter(logits / temperature[:, None], params).softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for i, generator in enumerate(batch.generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        sampled = (probs / noise).argmax(dim=-1)
        greedy = host_to_device([p.greedy for p in params], torch.bool, device)
        token_ids = torch.where(greedy, logits.argmax(dim=-1), sampled)

    out = SamplerOutput(token_ids=token_ids)
    if raw_logprobs is not None:
        ids = token_ids[:, None]
        chosen = raw_logprobs.gather(1, ids)
        out.sampled_logprobs = chosen.squeeze(1)
        out.sampled_ranks = (raw_logprobs > chosen).sum(dim=1) + 1
        k = min(want_logprobs, max_logprobs, vocab)
        out.top_logprobs, out.top_token_ids = raw_logprobs.topk(k, dim=-1)
    return out


def _sample_fused(logits: torch.Tensor, batch: SamplingBatch, temperatures: list[float]) -> torch.Tensor:
    """Temperature + draw + argmax in one kernel (temperature 0: the plain argmax)."""
    from ops.triton_sampling import gumbel_argmax

    device = logits.device
    temperature = host_to_device(temperatures, torch.float32, device)
    seeds = torch.randint(0, _SEED_BOUND, (logits.shape[0],), device=device)  # the engine's generator
    for i, generator in enumerate(batch.generators):
        if generator is not None:
            seeds[i] = torch.randint(0, _SEED_BOUND, (), generator=generator, device=device)
    return gumbel_argmax(logits, temperature, seeds)


def _needs_filter(params: list[SamplingParams], vocab: int) -> bool:
    return any(0 < p.top_k < vocab or p.top_p < 1.0 or p.min_p for p in params)


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """top-k, top-p and min-p: set the logits of excluded tokens to -inf."""
    device = logits.device
    if not _needs_filter(params, logits.shape[1]):
        return logits
    top_k = [min(p.top_k, logits.shape[1]) if p.top_k > 0 else logits.shape[1] for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=device)[None, :]
    remove = ranks >= host_to_device(top_k, torch.long, device)[:, None]
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token if the mass before it is still under top_p (the first token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= host_to_device(top_p, torch.float32, device)[:, None]
    remove |= probs < host_to_device(min_p, torch.float32, device)[:, None] * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    entries = [(i, token, bias) for i, p in enumerate(params) if p.logit_bias for token, bias in p.logit_bias.items()]
    if not entries:
        return logits
    rows, tokens, biases = zip(*entries)
    device = logits.device
    index = (host_to_device(list(rows), torch.long, device), host_to_device(list(tokens), torch.long, device))
    return logits.index_put(index, host_to_device(list(biases), torch.float32, device), accumulate=True)


def _has_penalties(params: list[SamplingParams]) -> bool:
    return any(p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1 for p in params)


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    params = batch.params
    if not _has_penalties(params):
        return logits
    num_rows, vocab = logits.shape
    device = logits.device
    output_counts = _token_counts(batch.output_token_ids(), num_rows, vocab, device)
    prompt_seen = _token_counts(batch.prompt_token_ids(), num_rows, vocab, device) > 0
    repetition = host_to_device([p.repetition_penalty for p in params], torch.float32, device)[:, None]
    seen = prompt_seen | (output_counts > 0)
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    frequency = host_to_device([p.frequency_penalty for p in params], torch.float32, device)[:, None]
    presence = host_to_device([p.presence_penalty for p in params], torch.float32, device)[:, None]
    return logits - frequency * output_counts - presence * (output_counts > 0)


def _token_counts(token_lists: list[list[int]], num_rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    width = max((len(t) for t in token_lists), default=0)
    if width == 0:
        return torch.zeros(num_rows, vocab, device=device)
    padded = torch.full((num_rows, width), vocab, dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        padded[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    padded = host_to_device(padded, torch.long, device)
    # Column `vocab` collects the padding and is dropped.
    ones = torch.ones_like(padded, dtype=torch.float32)
    return torch.zeros(num_rows, vocab + 1, device=device).scatter_add_(1, padded, ones)[:, :vocab]


def _min_token_blocks(batch: SamplingBatch, vocab: int) -> list[tuple[int, int]]:
    """(row, token) of every stop token a row may not produce yet (min_tokens not reached)."""
    rows = []
    for i, (p, tokens, num_prompt) in enumerate(zip(batch.params, batch.token_ids, batch.num_prompt_tokens)):
        if len(tokens) - num_prompt < p.min_tokens:
            stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else batch.eos_token_ids)
            rows.extend((i, t) for t in stop_ids if 0 <= t < vocab)
    return rows


def _block(logits: torch.Tensor, rows: list[tuple[int, int]]) -> torch.Tensor:
    if not rows:
        return logits
    logits = logits.clone()
    index = host_to_device(rows, torch.long, logits.device)
    logits[index[:, 0], index[:, 1]] = float("-inf")
    return logits
