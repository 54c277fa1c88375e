"""Scheduler: continuous batching over one token budget per step.

Each step it picks, in order: the running sequences' decodes, then the running sequences' next
prompt chunks, then waiting sequences (FCFS) while blocks, `max_num_seqs` and the token budget
`max_num_batched_tokens` allow. A long prompt is cut into chunks that fit the budget left after the
decodes (chunked prefill), so it never stalls anyone's decoding. When a sequence needs a block and
none is free, the newest running sequence is preempted: its blocks are freed and it goes back to
the front of the queue to be recomputed later, with the tokens it already has.

Parallel sampling (n > 1): a request's other sequences wait while its first one computes the
prompt; in the step that finishes the prompt they fork from it (sharing its blocks, see
`BlockManager.fork`) and sample their first tokens from the same logits row, computing nothing.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Request, Sequence, SequenceStatus


# ENGINE_DECODE_ORDER=longest-first: a step of decodes only lists its sequences longest context first, not in
# admission order. The decode kernel's grid launches a sequence's programs in batch order, so the longest start
# first and the short ones fill the tail (longest-processing-time-first scheduling). An experiment for A/B runs
# (perf/kernel_bench.py --nano times it on the kernel alone); off by default.
DECODE_ORDERS = ("arrival", "longest-first")
DECODE_ORDER = os.environ.get("ENGINE_DECODE_ORDER", "").strip() or "arrival"
if DECODE_ORDER not in DECODE_ORDERS:
    raise ValueError(f"ENGINE_DECODE_ORDER={DECODE_ORDER!r}; choose one of {', '.join(DECODE_ORDERS)}")


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens computed for it this step: 1 for a decode, a chunk for a prefill
    # A fork (n > 1) computes nothing (num_new_tokens 0): it samples from this sequence's last row,
    # which comes before it in the step.
    sample_from: Sequence | None = None
    samples: bool = field(init=False)  # does the step reach the end of its tokens, and so produce the next?

    def __post_init__(self) -> None:
        seq = self.seq
        self.samples = seq.num_computed_tokens + self.num_new_tokens == len(seq.token_ids) + seq.num_pending_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst): copy-on-write, before the forward

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0

    def add_request(self, request: Request) -> None:
        self.waiting.extend(request.seqs)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Decodes first (stable sort keeps admission order within each group).
        for seq in sorted(self.running, key=lambda s: s.in_prefill):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            if seq.num_pending_tokens and seq.reached_length_limit(self.max_model_len):
                continue  # async scheduling: its last token is in flight; it finishes when that arrives
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.try_grow(seq, num_new):
                victim = self.running[-1]
                budget += self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSequence(seq, num_new))
                budget -= num_new
        if not out.preempted:  # memory is short: admit no one new this step
            self._admit_waiting(out, budget)
            self._fork_siblings(out)
        if DECODE_ORDER == "longest-first" and all(s.num_new_tokens == 1 for s in out.scheduled):
            # (only decodes: a fork must come after the sequence it samples from)
            out.scheduled.sort(key=lambda s: s.seq.num_computed_tokens, reverse=True)
        out.block_copies = self.block_manager.take_block_copies()
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        held_back: list[Sequence] = []
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._waits_for_first_sibling(seq) or seq.num_pending_tokens:  # preempted with a token in flight
                held_back.append(self.waiting.popleft())
                continue
            # Siblings of an n > 1 request share the prompt blocks their first sequence computed.
            use_cache = bm.enable_prefix_caching or seq.index > 0
            cached = bm.find_cached_prefix(seq) if use_cache else []
            num_new = min(seq.num_tokens - len(cached) * bm.block_size, budget)
            if not bm.can_admit(seq, cached, num_new):
                break
            self.waiting.popleft()
            bm.admit(seq, cached, num_new, count_query=bm.enable_prefix_caching)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            request = seq.request
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.time()
                request.num_cached_tokens = seq.num_computed_tokens
        self.waiting.extendleft(reversed(held_back))

    def _fork_siblings(self, out: SchedulerOutput) -> None:
        """Siblings of a first sequence whose prompt this step finishes join it, sharing its blocks."""
        for i in range(len(out.scheduled) - 1, -1, -1):
            s = out.scheduled[i]
            first = s.seq
            if first.index != 0 or first.request.params.n == 1 or not s.samples or first.num_output_tokens:
                continue
            forks = []
            for sibling in first.request.seqs[1:]:
                if (len(self.running) >= self.max_num_seqs or sibling.status != SequenceStatus.WAITING
                        or sibling.num_output_tokens or sibling.num_pending_tokens):
                    continue  # no seat, or not a fresh copy of the prompt: it is admitted the usual way
                self.block_manager.fork(first, sibling, first.num_computed_tokens + s.num_new_tokens)
                self.waiting.remove(sibling)
                sibling.status = SequenceStatus.RUNNING
                self.running.append(sibling)
                forks.append(ScheduledSequence(sibling, 0, sample_from=first))
            out.scheduled[i + 1 : i + 1] = forks

    @staticmethod
    def _waits_for_first_sibling(seq: Sequence) -> bool:
        first = seq.request.seqs[0]
        return seq.index > 0 and not first.is_finished and first.in_prefill

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Free `seq`'s blocks and queue it for recompute; returns the budget it gave back."""
        refund = 0
        for i, s in enumerate(out.scheduled):
            if s.seq is seq:
                refund = s.num_new_tokens
                del out.scheduled[i]
                break
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions_total += 1
        out.preempted.append(seq)
        return refund

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and return its blocks at once."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def kv_slots_stats(self) -> tuple[int, int]:
        """(tokens stored, slots reserved) over running sequences' blocks."""
        stored = sum(s.num_computed_tokens for s in self.running)
        reserved = sum(len(s.block_table) for s in self.running) * self.block_manager.block_size
        return stored, reserved
