"""Requests and their sequences: the state the scheduler, block manager and detokenizer share."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from engine.outputs import PositionLogprobs, RequestMetrics
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One user request: a prompt and the n sequences sampled from it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.time)
    seqs: list["Sequence"] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_prompt_logprobs_sent: int = 0  # RequestOutputKind.DELTA: positions in an earlier output
    num_cached_tokens: int = 0
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no logprob

    @property
    def finished(self) -> bool:
        for seq in self.seqs:  # all(seq.is_finished ...), without a generator: asked every step
            if seq.status is not SequenceStatus.FINISHED:
                return False
        return True


_seq_ids = itertools.count()


class Sequence:
    """One stream of tokens: the prompt plus what has been generated, and where its KV lives."""

    def __init__(self, request: Request, index: int, generator: torch.Generator | None):
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index  # which of the request's n completions
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache (or being written by a launched step)
        self.num_pending_tokens = 0  # sampled by a launched step, not yet read back (async scheduling)
        # Only ever appended to in place; any other change is a new list (BlockTableRows relies on it).
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.generator = generator  # seeded requests sample from their own generator
        # Generated text and incremental-detokenization state (engine.detokenizer).
        self.output_text = ""
        self.prefix_offset = max(self.num_prompt_tokens - 5, 0)
        self.read_offset = self.num_prompt_tokens
        self.output_logprobs: list[PositionLogprobs] = []
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # RequestOutputKind.DELTA: text characters, output tokens and logprobs in earlier outputs.
        self.num_sent: tuple[int, int, int] = (0, 0, 0)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        """Tokens the sequence has, counting those a launched step is still sampling."""
        return len(self.token_ids) + self.num_pending_tokens

    def reached_length_limit(self, max_model_len: int) -> bool:
        """Will it be finished by length once its pending tokens arrive? Then no step should extend it."""
        max_tokens = self.request.params.max_tokens or max_model_len
        num_tokens = len(self.token_ids) + self.num_pending_tokens
        return num_tokens - self.num_prompt_tokens >= max_tokens or num_tokens >= max_model_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    def reset_for_recompute(self) -> None:
        """After preemption: the cache is gone, every token (prompt and output) is recomputed later."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING

    def __repr__(self) -> str:
        return f"Sequence(id={self.seq_id}, request={self.request.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens})"
