"""The async front of the engine: one background step loop serves every request.

`LLMEngine` is not thread-safe and its `step()` blocks for a whole model forward, so it lives on one
dedicated thread and nothing else touches it. The asyncio side posts adds and aborts to an inbox that
the step thread drains before each step; each request gets its outputs back through its own
stream, fed with `loop.call_soon_threadsafe`. torch releases the GIL inside its kernels, so the event
loop keeps serving HTTP while a step runs, and every HTTP client's request joins the same
continuously batched step loop.

The two threads share one GIL. When the device finishes a step the step thread must get the GIL
back at once to read the sampled tokens and launch the next step; with Python's default switch
interval (5 ms) it waits up to that long behind the event loop sending hundreds of streamed
chunks, and the device idles. So the front shortens the interval to GIL_SWITCH_INTERVAL_S.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from engine.config import EngineArgs
from engine.engine_process import EngineProcessError, RemoteEngine
from engine.llm_engine import EngineStats, LLMEngine, PromptType
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tensor_parallel import TensorParallelError

logger = logging.getLogger("engine")

_FATAL = (TensorParallelError, EngineProcessError)  # after these no step can run again

# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). Part of
# what took the server from 0.51-0.56 to 0.79-0.81 of the engine's throughput at 256 streams on a
# CPU with an emulated device (perf/latency.py --stub-step-ms; perf/RESULTS.md, session 4); each
# forced switch costs microseconds.
GIL_SWITCH_INTERVAL_S = 0.0005


class EngineNotRunningError(RuntimeError):
    """The step loop is not running (shut down, or it died): no request can be served."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is at its limit (EngineArgs.max_waiting_requests)."""


class EngineStepError(RuntimeError):
    """A step failed (the engine's fault, not the request's): every request in it fails with this."""


class RequestAbortedError(RuntimeError):
    """The request was aborted by someone other than its consumer (an abort call, shutdown)."""


class RequestStream:
    """The outputs of one request, in order; the last has `finished=True`.

    Outputs are cumulative, so a consumer that falls behind skips to the newest one instead of
    working through a backlog.
    """

    def __init__(self, request_id: str, engine: "AsyncLLMEngine"):
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._items: collections.deque[RequestOutput | BaseException] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None  # set while the consumer waits for an item
        self._sent_tokens = 0  # step thread only: tokens in the latest output handed over (stream_interval)
        self._accepted: asyncio.Future[None] = self._loop.create_future()

    async def accepted(self) -> None:
        """Wait until the step thread added the request; raises what the engine raised if it did not."""
        try:
            await self._accepted
        except Exception:
            self.finished = True
            raise

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        items = self._items
        while not items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = items.popleft()
        # Skip to the newest output, but never past an error: the tokens made before it go out first.
        while isinstance(item, RequestOutput) and items and isinstance(items[0], RequestOutput):
            item = items.popleft()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Stop the request and free its KV blocks (a no-op once it finished). Safe in `finally`."""
        # Nobody awaits the acceptance any more: take its error, if any, so asyncio does not log
        # "exception was never retrieved" (another prompt of the same HTTP request failed first).
        self._accepted.add_done_callback(lambda f: f.cancelled() or f.exception())
        if self.finished:
            return
        self.finished = True
        try:
            self._engine._post(_Abort([self.request_id], error=None))
        except EngineNotRunningError:
            pass  # the stopped loop aborted everything on its way out

    # ---- called from the step thread ----------------------------------------------------------

    def _settle_add(self, error: BaseException | None) -> None:
        self._loop.call_soon_threadsafe(_settle, self._accepted, error)


def _put_all(batch: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in batch:
        stream._items.append(item)
        waiter = stream._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller stopped waiting (cancelled)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


@dataclass
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    arrival_time: float
    stream: RequestStream


@dataclass
class _Abort:
    request_ids: list[str] | None  # None: every request in flight
    error: BaseException | None  # delivered to each aborted stream; None when its consumer asked


class AsyncLLMEngine:
    """Wraps an `LLMEngine` in a step-loop thread and gives each request an async output stream."""

    def __init__(
        self,
        engine: LLMEngine | RemoteEngine,
        max_waiting_requests: int | None = None,
        log_stats_interval_s: float = 5.0,
    ):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len: int = engine.model_config.max_model_len
        self.max_waiting_requests = max_waiting_requests
        self.stream_interval = engine.args.stream_interval
        self.log_stats_interval_s = log_stats_interval_s
        self._inbox: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        # Guards the check-then-post in `_post` against the step thread closing the inbox, so no add
        # can slip in after the final drain and wait forever.
        self._inbox_lock = threading.Lock()
        self._inbox_closed = False
        self._stopping = False
        # Why the step loop stopped by itself (a tensor-parallel rank or the engine process died, or
        # the loop crashed): no request can be served again. None while it runs or after shutdown().
        self.dead_error: str | None = None
        self._adds_posted = 0  # written by the event loop thread only
        self._adds_drained = 0  # written by the step thread only
        self._streams: dict[str, RequestStream] = {}  # step thread only
        self._stats = engine.get_stats()  # the step thread's latest snapshot, safe to read anywhere
        self._logged_stats = self._stats
        self._logged_at = time.monotonic()
        # A process-wide setting: never lengthened here, and put back by shutdown().
        self._switch_interval_before = sys.getswitchinterval()
        if self._switch_interval_before > GIL_SWITCH_INTERVAL_S:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, log_stats_interval_s: float = 5.0) -> "AsyncLLMEngine":
        """The engine in this process, or in a child process of its own (`args.engine_process`;
        by default with a GPU)."""
        in_child = args.resolve_engine_process()
        logger.info("engine %s", "in a process of its own (--no-engine-process: in the server's)" if in_child
                    else "in the server's process (--engine-process: in one of its own)")
        engine = RemoteEngine(args) if in_child else LLMEngine.from_engine_args(args)
        return cls(engine, args.max_waiting_requests, log_stats_interval_s)

    # ---- the event loop's side ---------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def check_health(self) -> None:
        """Raise EngineNotRunningError if no request can be served: the step loop has stopped, or the
        engine under it can run no more steps, which this finds even while the loop is idle (a
        tensor-parallel worker or the engine process died since the last step); the loop then stops."""
        if self.dead_error is not None or not self.is_running:
            raise EngineNotRunningError(self.dead_error or "the engine's step loop is not running")
        try:
            self.engine.check_health()
        except _FATAL as error:
            logger.error("engine health check: %s; stopping the step loop", error)
            self._die(str(error))
            self._wakeup.set()
            raise EngineNotRunningError(str(error)) from error

    def get_stats(self) -> EngineStats:
        """The engine's load and counters as of the end of the latest step (or inbox drain)."""
        return self._stats

    def num_waiting(self) -> int:
        return self._stats.num_waiting + (self._adds_posted - self._adds_drained)

    def check_not_overloaded(self) -> None:
        """Raise EngineOverloadedError while max_waiting_requests are waiting: callers can refuse a
        request before spending anything (tokenizing) on it."""
        if self.max_waiting_requests is not None and self.num_waiting() >= self.max_waiting_requests:
            raise EngineOverloadedError(
                f"the engine is overloaded: {self.num_waiting()} requests are waiting "
                f"(max_waiting_requests={self.max_waiting_requests}); retry later"
            )

    def submit(
        self,
        request_id: str,
        prompt: PromptType,
        sampling_params: SamplingParams,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue a request without waiting for the step thread; `await stream.accepted()` raises
        the engine's ValueError if it refuses it. Overload and shutdown raise here."""
        self.check_not_overloaded()
        stream = RequestStream(request_id, self)
        self._adds_posted += 1  # before posting, so the step thread never counts it drained first
        try:
            self._post(_Add(request_id, prompt, sampling_params, arrival_time or time.time(), stream))
        except EngineNotRunningError:
            self._adds_posted -= 1
            raise
        return stream

    async def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        sampling_params: SamplingParams,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue a request; returns once the engine accepted it. Bad input raises ValueError here."""
        stream = self.submit(request_id, prompt, sampling_params, arrival_time)
        try:
            await stream.accepted()
        except asyncio.CancelledError:
            stream.abort()  # queued behind the add, so it finds the request
            raise
        return stream

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative outputs until it finishes. Closing or cancelling the
        consumer aborts the request and frees its KV blocks at once."""
        stream = await self.add_request(request_id, prompt, sampling_params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with RequestAbortedError."""
        self._post(_Abort([request_id], RequestAbortedError(f"request {request_id!r} was aborted")))

    def abort_all(self, reason: str) -> None:
        """Abort every request in flight; each stream ends with RequestAbortedError(reason)."""
        self._post(_Abort(None, RequestAbortedError(reason)))

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Abort what is in flight, stop the step loop thread (waits for the current step), then the
        engine's worker processes."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        self.engine.shutdown()
        if sys.getswitchinterval() == GIL_SWITCH_INTERVAL_S:  # ours, unless someone changed it since
            sys.setswitchinterval(self._switch_interval_before)

    def _post(self, item: _Add | _Abort) -> None:
        with self._inbox_lock:
            if self._inbox_closed:
                raise EngineNotRunningError("the engine's step loop is not running")
            self._inbox.put(item)
        self._wakeup.set()

    # ---- the step thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wakeup.clear()  # before draining: a post after the drain sets it again
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._stats = self.engine.get_stats()
                    self._log_stats(going_idle=True)
                    self._wakeup.wait()
                    self._logged_at = time.monotonic()  # throughput is measured over busy time only
                    continue
                self._step()
                self._log_stats(going_idle=False)
        except BaseException as error:  # (SystemExit from deep inside too: the loop ends either way)
            logger.exception("the engine step loop crashed; no request can be served from now on")
            self._die(f"the engine step loop crashed: {type(error).__name__}: {error}")
        finally:
            with self._inbox_lock:
                self._inbox_closed = True
            self._drain_inbox()  # fail adds that raced the shutdown
            self._abort(_Abort(None, EngineNotRunningError("the engine is shutting down")))
            self._stats = self.engine.get_stats()
            logger.info("engine step loop stopped")

    def _die(self, reason: str) -> None:
        """The engine cannot run another step: stop the loop and keep why (`dead_error`), unless a
        shutdown was asked for first."""
        if not self._stopping and self.dead_error is None:
            self.dead_error = reason
        self._stopping = True

    def _drain_inbox(self) -> None:
        """Handle what the inbox holds now, not what arrives meanwhile: while hundreds of requests
        arrive, the next step must not wait for the last of them (the device would idle until then).
        Adds in a row go to the engine together (one round trip to an engine process)."""
        items = []
        for _ in range(self._inbox.qsize()):
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        try:
            adds: list[_Add] = []
            for item in items:
                if isinstance(item, _Add):
                    adds.append(item)
                    continue
                self._add_all(adds)  # in order: an abort may be for a request posted before it
                adds = []
                self._abort(item)
            self._add_all(adds)
        except BaseException:
            # The step loop dies with this, and these adds are out of the inbox: each must still hear
            # (one already answered keeps its answer: a settled future ignores a second one).
            for item in items:
                if isinstance(item, _Add):
                    try:
                        item.stream._settle_add(EngineNotRunningError("the engine's step loop failed"))
                    except RuntimeError:
                        pass  # that event loop is closed
            raise

    def _add_all(self, items: list[_Add]) -> None:
        self._adds_drained += len(items)
        if self._inbox_closed:
            for item in items:
                item.stream._settle_add(EngineNotRunningError("the engine is shutting down"))
            return
        if len(items) > 1 and isinstance(self.engine, RemoteEngine):
            try:
                errors = self.engine.add_requests(
                    [(item.request_id, item.prompt, item.params, item.arrival_time) for item in items])
            except _FATAL as error:
                errors = [error] * len(items)
            except Exception:  # the batch as a whole (a prompt that cannot be pickled): one by one, below,
                logger.warning("adding %d requests at once failed; adding them one by one", len(items),
                               exc_info=True)  # so that only the bad one fails
                errors = None
            if errors is not None:
                for item, error in zip(items, errors, strict=True):
                    self._settle_added(item, error)
                return
        for item in items:
            try:
                self.engine.add_request(item.request_id, item.prompt, item.params, arrival_time=item.arrival_time)
            except Exception as error:
                self._settle_added(item, error)
            else:
                self._settle_added(item, None)

    def _settle_added(self, item: _Add, error: Exception | None) -> None:
        """The add's outcome to its stream: accepted, or the engine's error (ValueError: bad input)."""
        if error is None:
            self._streams[item.request_id] = item.stream
            try:
                item.stream._settle_add(None)
            except RuntimeError:  # that event loop is closed: nobody will read this request
                del self._streams[item.request_id]
                try:
                    self.engine.abort_request([item.request_id])
                except Exception:
                    logger.exception("aborting request %s failed", item.request_id)
            return
        if isinstance(error, _FATAL):  # the engine is gone: stop (the server exits, or answers 503)
            if not self._stopping:
                logger.error("adding request %s failed: %s; stopping the step loop", item.request_id, error)
            self._die(str(error))
            error = EngineNotRunningError(str(error))
        elif not isinstance(error, ValueError):  # anything else fails this request only
            logger.error("adding request %s failed", item.request_id, exc_info=error)
        try:
            item.stream._settle_add(error)
        except RuntimeError:
            pass  # that event loop is closed: nobody is waiting

    def _abort(self, item: _Abort) -> None:
        ids = list(self._streams) if item.request_ids is None else [r for r in item.request_ids if r in self._streams]
        if not ids:
            return
        try:
            self.engine.abort_request(ids)
        except _FATAL as error:  # the engine is gone (already logged): the streams still end below
            logger.warning("aborting requests %s: %s", ids, error)
        except Exception:
            logger.exception("aborting requests %s failed", ids)
        streams = [self._streams.pop(request_id) for request_id in ids]
        if item.error is not None:
            self._deliver([(stream, item.error) for stream in streams])

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:
            # The engine cannot say which request broke the step, so every request in it fails
            # (each client gets a 500) and the loop goes on serving new ones.
            logger.exception("engine step failed; failing the %d requests in flight", len(self._streams))
            # Wrapped: whatever the step raised (a ValueError too) is a server error to these clients.
            failure = EngineStepError(f"the engine step failed: {type(error).__name__}: {error}")
            failure.__cause__ = error
            self._abort(_Abort(None, failure))
            self._stats = self.engine.get_stats()
            if isinstance(error, _FATAL):  # no step can run again: stop (the server exits, or answers 503)
                self._die(str(error))
            return
        # Stats first: whoever sees an output then sees load figures at least as fresh.
        self._stats = self.engine.get_stats()
        deliveries = []
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            elif self.stream_interval > 1:  # the first token at once, then every stream_interval tokens
                tokens = max(len(c.token_ids) for c in output.outputs)
                if stream._sent_tokens and tokens - stream._sent_tokens < self.stream_interval:
                    continue
                stream._sent_tokens = tokens
            deliveries.append((stream, output))
        self._deliver(deliveries)

    def _deliver(self, deliveries: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
        """Hand items to their streams, with one wakeup per event loop rather than one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in deliveries:
            by_loop.setdefault(stream._loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop is closed: nobody will read these requests
                ids = [stream.request_id for stream, _ in batch if self._streams.pop(stream.request_id, None)]
                self.engine.abort_request(ids)

    def _log_stats(self, going_idle: bool) -> None:
        now = time.monotonic()
        before, after = self._logged_stats, self._stats
        progressed = after.generation_tokens_total != before.generation_tokens_total or (
            after.prompt_tokens_total != before.prompt_tokens_total
        )
        if going_idle:
            if progressed and self.log_stats_interval_s != math.inf:  # a last line for the busy stretch that just ended
                self._write_stats_line(now)
            self._logged_at, self._logged_stats = now, after
        elif now - self._logged_at >= self.log_stats_interval_s:
            self._write_stats_line(now)

    def _write_stats_line(self, now: float) -> None:
        before, after = self._logged_stats, self._stats
        elapsed = max(now - self._logged_at, 1e-9)
        line = (
            f"prompt {(after.prompt_tokens_total - before.prompt_tokens_total) / elapsed:.1f} tok/s, "
            f"generation {(after.generation_tokens_total - before.generation_tokens_total) / elapsed:.1f} tok/s, "
            f"running {after.num_running}, waiting {after.num_waiting}, "
            f"KV cache {after.kv_cache_usage * 100:.1f}% of {after.num_total_blocks} blocks "
            f"({after.kv_waste_fraction * 100:.1f}% of reserved slots empty)"
        )
        queries = after.prefix_cache_queries_total - before.prefix_cache_queries_total
        if queries:
            hits = after.prefix_cache_hits_total - before.prefix_cache_hits_total
            line += f", prefix cache hit rate {hits / queries * 100:.1f}%"
        if after.num_preemptions_total != before.num_preemptions_total:
            line += f", {after.num_preemptions_total - before.num_preemptions_total} preemptions"
        logger.info(line)
        self._logged_at, self._logged_stats = now, after
