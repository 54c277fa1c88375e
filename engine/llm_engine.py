"""LLMEngine: the step loop. `add_request` queues work, each `step()` schedules one batch, runs it,
and returns the progress of every request it touched; `abort_request` drops a request and frees
its blocks at once. The offline `LLM` and the server's async front both drive this class."""

from __future__ import annotations

import gc
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Union

import numpy as np
import torch
from transformers import AutoTokenizer

from engine.block_manager import BlockManager
from engine.config import EngineArgs, ModelConfig, check_tokenizer_files
from engine.detokenizer import IncrementalDetokenizer, find_stop_string, visible_text, visible_text_len
from engine.model_runner import ModelRunner, SampledRows
from engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams, is_integer
from engine.scheduler import ScheduledSequence, Scheduler
from engine.sequence import Request, Sequence, SequenceStatus

logger = logging.getLogger("engine")

# A prompt: text, token ids, or vLLM's dict forms {"prompt": ...} / {"prompt_token_ids": [...]}.
PromptType = Union[str, list[int], dict]


def async_depth(tensor_parallel_size: int) -> int:
    """ENGINE_ASYNC_DEPTH: how many launched steps async scheduling keeps in flight (default 2: the host
    builds step N+2 while the device runs N and N+1, so one step whose host work outlasts the device's
    step no longer leaves the GPU idle; 1: only N+1). nano on one H100 (perf/RESULTS.md, session 26):
    18,684 / 18,511 output tok/s against 18,601 / 18,085 with 1, alternating; profiled, the GPU busy
    94.6% of the run against 91.4%. One rank only: tensor-parallel workers run one step ahead."""
    raw = os.environ.get("ENGINE_ASYNC_DEPTH", "").strip() or "2"
    if raw not in ("1", "2"):
        raise ValueError(f"ENGINE_ASYNC_DEPTH={raw!r}: 1 or 2")
    return 1 if tensor_parallel_size > 1 else int(raw)


def _reads_token_history(params: SamplingParams) -> bool:
    penalized = params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
    return bool(penalized or params.min_tokens or params.prompt_logprobs is not None)


@dataclass
class LaunchedStep:
    """A step launched with async scheduling whose tokens have not been read back."""

    scheduled: list[ScheduledSequence]
    sampled: SampledRows | None


@dataclass
class StepTimings:
    """Seconds spent in each phase of `step()`, summed over the engine's life (logged at debug level
    per step). `execute` includes the GPU work, since reading the sampled ids waits for it."""

    steps: int = 0
    schedule: float = 0.0
    execute: float = 0.0
    update: float = 0.0  # detokenize, stop checks, outputs
    device_wait: float = 0.0  # of `execute`: the host blocked, waiting for sampled ids from the device
    # A list to record every step in (benchmarks: where a run is host-bound): (sequences scheduled, host
    # seconds, seconds waiting for the device); None records nothing.
    per_step: list[tuple[int, float, float]] | None = None

    def as_dict(self) -> dict:
        return {"steps": self.steps, "schedule_s": self.schedule, "execute_s": self.execute, "update_s": self.update,
                "device_wait_s": self.device_wait}


@dataclass
class EngineStats:
    """A snapshot of the engine's load and lifetime counters."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use
    num_used_blocks: int
    num_total_blocks: int
    num_cached_free_blocks: int  # free blocks still holding a reusable prefix
    kv_slots_stored: int  # tokens whose K/V are in running sequences' blocks
    kv_slots_reserved: int  # slots in those blocks
    kv_slots_stored_sum: int  # the two above summed over every step so far (for the mean waste)
    kv_slots_reserved_sum: int
    num_preemptions_total: int
    prompt_tokens_total: int  # prompt tokens computed (prefix-cache hits excluded)
    generation_tokens_total: int
    prefix_cache_queries_total: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int  # of which found

    @property
    def kv_waste_fraction(self) -> float:
        """Reserved-but-empty slots over reserved slots (internal fragmentation of the paged cache)."""
        if self.kv_slots_reserved == 0:
            return 0.0
        return 1.0 - self.kv_slots_stored / self.kv_slots_reserved

    @property
    def kv_waste_fraction_mean(self) -> float:
        """The same, averaged over every step so far (weighted by slots reserved)."""
        if self.kv_slots_reserved_sum == 0:
            return 0.0
        return 1.0 - self.kv_slots_stored_sum / self.kv_slots_reserved_sum


def freeze_gc_heap() -> None:
    """Put every object alive now out of the cyclic garbage collector's reach (gc.freeze), as vLLM does
    after start-up. What a start leaves (the model, torch.compile's graphs and guards, a cold compile's
    caches: ~0.7M tracked objects warm, ~1.2M cold on Qwen3-0.6B) would otherwise be walked by every
    full collection while requests run: one took 1.17 s in the middle of a timed `nano` run on the
    H100 (perf/RESULTS.md, session 9). For processes that keep one engine for their life (the server,
    its engine process, tensor-parallel workers): frozen objects in reference cycles are never freed."""
    gc.collect()
    gc.freeze()


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        device = args.resolve_device()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available here (torch.cuda.is_available() is "
                             "False); use device='cpu' or 'auto'")
        self.model_config = ModelConfig.from_args(args, device)
        check_tokenizer_files(args.tokenizer or args.model)
        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
        self.detokenizer = IncrementalDetokenizer(self.tokenizer)
        self.device = device
        torch.manual_seed(args.seed)  # unseeded requests draw from the global generator
        self.runner = ModelRunner(args, self.model_config, device)
        self.block_manager = BlockManager(self.runner.num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens,
                                   self.model_config.max_model_len)
        self.requests: dict[str, Request] = {}
        self._history_readers = 0  # requests in self.requests whose sampling reads the token history (_needs_sync)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.timings = StepTimings()
        self.kv_slots_stored_sum = 0
        self.kv_slots_reserved_sum = 0
        # async scheduling: launched steps whose tokens have not been read back, oldest first
        self._in_flight: deque[LaunchedStep] = deque()
        self._async_depth = async_depth(args.tensor_parallel_size)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    def check_health(self) -> None:
        """Raise if the engine can run no more steps (vLLM's name): TensorParallelError once a
        tensor-parallel worker has died. Cheap, and safe to call from another thread."""
        self.runner.check_health()

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to do with one rank); a tensor-parallel
        engine runs no more steps after this. Process exit does it too."""
        self.runner.shutdown()

    # ---- requests in -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. Bad input raises ValueError and leaves the engine untouched."""
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        if not isinstance(params, (SamplingParams, type(None))):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        prompt_text, token_ids = self._tokenize(prompt)
        self._validate(token_ids, params)
        request = Request(request_id, prompt_text, token_ids, params, arrival_time or time.time())
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                # torch takes seeds as unsigned 64-bit: wrap, so seed + index never overflows.
                generator = torch.Generator(self.device).manual_seed((params.seed + index) % 2**64)
            request.seqs.append(Sequence(request, index, generator))
        self.requests[request_id] = request
        self._history_readers += _reads_token_history(params)
        self.scheduler.add_request(request)
        logger.debug("request %s added: %d prompt tokens", request_id, len(token_ids))

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                token_ids = prompt["prompt_token_ids"]
                if not isinstance(token_ids, (list, tuple, np.ndarray)):
                    raise ValueError(f"prompt_token_ids must be a list of integers, got {token_ids!r:.80}")
                return prompt.get("prompt"), self._token_ids(token_ids)
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(is_integer(t) for t in prompt[:1]):
            return None, self._token_ids(prompt)
        raise ValueError(f"a prompt is a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def _token_ids(self, token_ids) -> list[int]:
        """Token ids as a list of Python ints. The length is checked first: a prompt of millions of
        tokens is refused before any pass over them (this runs on the step thread)."""
        max_len = self.model_config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"the prompt is {len(token_ids)} tokens, which leaves no room to generate within max_model_len ({max_len})")
        if all(type(t) is int for t in token_ids):  # the common case, without the slower checks below
            return list(token_ids)
        if not all(is_integer(t) for t in token_ids):
            raise ValueError(f"prompt token ids must be integers, got {list(token_ids)!r:.80}")
        return [int(t) for t in token_ids]

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        max_len = self.model_config.max_model_len
        vocab = self.model_config.vocab_size
        if not token_ids:
            raise ValueError("the prompt is empty")
        if params.n > self.args.max_num_seqs:
            raise ValueError(f"n ({params.n}) is over max_num_seqs ({self.args.max_num_seqs}), the most "
                             "sequences the engine runs at once")
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        bad = [t for t in params.logit_bias or () if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(token_ids) >= max_len:
            raise ValueError(f"the prompt is {len(token_ids)} tokens, which leaves no room to generate within max_model_len ({max_len})")
        if params.max_tokens is not None and len(token_ids) + params.max_tokens > max_len:
            raise ValueError(
                f"the prompt ({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) is "
                f"{len(token_ids) + params.max_tokens} tokens, over max_model_len ({max_len})"
            )
        capacity = self.block_manager.num_blocks * self.args.block_size
        if len(token_ids) + (params.max_tokens or max_len - len(token_ids)) > capacity:
            raise ValueError(f"the request needs more KV-cache slots than the whole cache has ({capacity})")
        limit = self.args.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > limit:
                raise ValueError(f"{name} ({value}) is over the limit of {limit} (max_logprobs)")

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            self._history_readers -= _reads_token_history(request.params)
            for seq in request.seqs:
                if not seq.is_finished:
                    seq.finish_reason = "abort"
                    self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- one step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduler step. With async scheduling the step launched here returns its tokens at
        a later call (the one after next with two steps in flight, the default on one GPU; the next one
        with ENGINE_ASYNC_DEPTH=1 or tensor parallelism), so the outputs returned
        are those of the oldest step in flight."""
        t0 = time.perf_counter()
        wait_before = self.timings.device_wait
        in_flight = self._in_flight
        if in_flight and self._needs_sync():
            batch = None  # drain: launch nothing until the steps in flight are read back
        else:
            batch = self.scheduler.schedule()
        t1 = time.perf_counter()
        if batch is None or batch.is_empty:
            if not in_flight:
                return []
            outputs = self._collect_oldest()
        elif self.args.async_scheduling and not self._needs_sync():
            previous = [step.sampled for step in reversed(in_flight) if step.sampled is not None]  # newest first
            sampled = self.runner.launch(batch.scheduled, self.model_config.eos_token_ids, previous, batch.block_copies)
            in_flight.append(LaunchedStep(batch.scheduled, sampled))
            self._advance(batch.scheduled, {})
            # The device runs the new step while the host reads back and books the oldest one.
            outputs = self._collect_oldest() if len(in_flight) > self._async_depth else []
        else:
            result = self.runner.execute(batch.scheduled, self.model_config.eos_token_ids, batch.block_copies)
            self._advance(batch.scheduled, result.prompt_logprobs)
            outputs = self._apply_tokens(batch.scheduled, result)
        t2 = time.perf_counter()
        stored, reserved = self.scheduler.kv_slots_stats()
        self.kv_slots_stored_sum += stored
        self.kv_slots_reserved_sum += reserved
        t3 = time.perf_counter()
        timings = self.timings
        timings.steps += 1
        timings.schedule += t1 - t0
        timings.execute += t2 - t1
        timings.update += t3 - t2
        if timings.per_step is not None:
            waited = timings.device_wait - wait_before
            timings.per_step.append((len(batch.scheduled) if batch else 0, t3 - t0 - waited, waited))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "step %d: %d seqs, %d tokens; schedule %.2f ms, execute + update %.2f ms (of which waiting for the device %.2f ms)",
                timings.steps, len(batch.scheduled) if batch else 0, batch.num_batched_tokens if batch else 0,
                1e3 * (t1 - t0), 1e3 * (t2 - t1), 1e3 * (timings.device_wait - wait_before),
            )
        return outputs

    def _collect_oldest(self) -> list[RequestOutput]:
        step = self._in_flight.popleft()
        return self._apply_tokens(step.scheduled, self.runner.collect(step.sampled))

    def _needs_sync(self) -> bool:
        """Do some requests need each token before the next step is built (penalties and min_tokens
        read the token history; prompt logprobs are read per chunk)? Then steps run one at a time.
        A count kept as requests come and go: asking each request every step cost ~0.3 s of nano's 13 s
        under cProfile on the H100 (perf/RESULTS.md, session 23)."""
        return self._history_readers > 0

    def _advance(self, scheduled: list[ScheduledSequence], prompt_logprobs: dict) -> None:
        """Book a launched step: its tokens' K/V are (being) written; sampling sequences await a token."""
        share_blocks = self.args.enable_prefix_caching
        for s in scheduled:
            seq, request = s.seq, s.seq.request
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.prompt_tokens_total += min(s.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens)
            if seq.seq_id in prompt_logprobs:
                self._add_prompt_logprobs(request, seq.num_computed_tokens, prompt_logprobs[seq.seq_id])
            seq.num_computed_tokens += s.num_new_tokens
            if s.samples:
                seq.num_pending_tokens += 1
            if share_blocks or request.params.n > 1:
                self.block_manager.commit_full_blocks(seq)

    def _apply_tokens(self, scheduled: list[ScheduledSequence], result) -> list[RequestOutput]:
        """Book a step's sampled tokens: append, detokenize, stop checks, finished requests."""
        self.timings.device_wait += result.device_wait_s
        now = time.time()
        touched: dict[str, Request] = {}
        share_blocks = self.args.enable_prefix_caching
        for s in scheduled:
            seq, request = s.seq, s.seq.request
            if s.samples:
                seq.num_pending_tokens -= 1
            token = result.sampled.get(seq.seq_id)
            if token is not None and seq.status is not SequenceStatus.FINISHED:  # not finished or aborted meanwhile
                self._append_token(seq, token, result.logprobs.get(seq.seq_id), now)
                if (share_blocks or request.params.n > 1) and seq.status == SequenceStatus.RUNNING:
                    self.block_manager.commit_full_blocks(seq)  # a full block may have waited for this token
            touched[request.request_id] = request
        outputs = []
        for request in touched.values():
            if request.request_id not in self.requests:
                continue
            finished = request.finished
            if finished or request.params.output_kind is not RequestOutputKind.FINAL_ONLY:
                outputs.append(self._request_output(request, finished))
            if finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
                self._history_readers -= _reads_token_history(request.params)
        return outputs

    def _add_prompt_logprobs(self, request: Request, chunk_start: int, chunk: list[PositionLogprobs]) -> None:
        # After a preemption the prompt is recomputed: keep only positions not seen before.
        if request.prompt_logprobs is not None and len(request.prompt_logprobs) == chunk_start + 1:
            self._decode_logprob_tokens(chunk)
            request.prompt_logprobs.extend(chunk)

    def _append_token(self, seq: Sequence, token: int, logprobs: PositionLogprobs | None, now: float) -> None:
        seq.token_ids.append(token)
        self.generation_tokens_total += 1
        metrics = seq.request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        if logprobs is not None:
            self._decode_logprob_tokens([logprobs])
            seq.output_logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token].logprob
        new_text = self.detokenizer.step(seq)
        self._check_stop(seq, token, len(new_text))
        if seq.finish_reason is not None:
            if not isinstance(seq.stop_reason, str):  # a stop string already cut the text
                self.detokenizer.step(seq, final=True)
            self.scheduler.finish(seq)

    def _check_stop(self, seq: Sequence, token: int, new_text_len: int) -> None:
        params = seq.request.params
        max_model_len = self.model_config.max_model_len
        num_tokens = len(seq.token_ids)
        num_output_tokens = num_tokens - seq.num_prompt_tokens
        if num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in self.model_config.eos_token_ids:
                seq.finish_reason = "stop"
                return
            if params.stop_token_ids and token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
                return
            stop = find_stop_string(seq, new_text_len) if params.stop_strings else None
            if stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
                return
        if num_output_tokens >= (params.max_tokens or max_model_len) or num_tokens >= max_model_len:
            seq.finish_reason = "length"

    def _decode_logprob_tokens(self, positions: list[PositionLogprobs]) -> None:
        for entry in positions:
            for token_id, logprob in entry.items():
                logprob.decoded_token = self.detokenizer.decode_token(token_id)

    def _request_output(self, request: Request, finished: bool | None = None) -> RequestOutput:
        """The request as of now; with RequestOutputKind.DELTA only what its previous output did not
        have (texts, tokens and logprobs only ever grow, so the deltas add up to the cumulative output)."""
        delta = request.params.output_kind is RequestOutputKind.DELTA
        prompt_logprobs = request.prompt_logprobs
        if delta and prompt_logprobs is not None:
            prompt_logprobs = prompt_logprobs[request.num_prompt_logprobs_sent :]
            request.num_prompt_logprobs_sent = len(request.prompt_logprobs)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=[_new_output(seq) if delta else _whole_output(seq) for seq in request.seqs],
            finished=request.finished if finished is None else finished,
            num_cached_tokens=request.num_cached_tokens,
            metrics=request.metrics,
        )

    # ---- introspection ---------------------------------------------------------------------------

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        stored, reserved = self.scheduler.kv_slots_stats()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage(),
            num_used_blocks=bm.num_blocks - bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            num_cached_free_blocks=bm.num_cached_free_blocks,
            kv_slots_stored=stored,
            kv_slots_reserved=reserved,
            kv_slots_stored_sum=self.kv_slots_stored_sum,
            kv_slots_reserved_sum=self.kv_slots_reserved_sum,
            num_preemptions_total=self.scheduler.num_preemptions_total,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prefix_cache_queries_total=bm.prefix_queries_total,
            prefix_cache_hits_total=bm.prefix_hits_total,
        )


def _whole_output(seq: Sequence) -> CompletionOutput:
    logprobs = seq.params.logprobs is not None
    return CompletionOutput(
        index=seq.index,
        text=visible_text(seq),
        token_ids=seq.output_token_ids,  # a fresh slice: the caller's to keep
        cumulative_logprob=seq.cumulative_logprob if logprobs else None,
        logprobs=list(seq.output_logprobs) if logprobs else None,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
    )


def _new_output(seq: Sequence) -> CompletionOutput:
    """What `_whole_output` would add to the previous one: a few characters and tokens, not a copy
    of everything generated so far (at hundreds of streams, copying took more than the rest)."""
    text_at, tokens_at, logprobs_at = seq.num_sent
    text_end = visible_text_len(seq)
    logprobs = seq.params.logprobs is not None
    seq.num_sent = (max(text_end, text_at), seq.num_output_tokens, len(seq.output_logprobs))
    return CompletionOutput(
        index=seq.index,
        text=seq.output_text[text_at:text_end],
        token_ids=seq.token_ids[seq.num_prompt_tokens + tokens_at :],
        cumulative_logprob=seq.cumulative_logprob if logprobs else None,
        logprobs=seq.output_logprobs[logprobs_at:] if logprobs else None,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
    )
