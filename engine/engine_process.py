"""The engine in its own process, for the server (`--engine-process`; vLLM V1's engine core).

In one process the API server's event loop and the engine's step thread share one GIL: at a few
hundred streams, sending the chunks and running the engine's host work (scheduling, inputs,
detokenizing, outputs) take turns instead of overlapping, and the device waits. Here the engine
runs in a child process and `RemoteEngine` stands in for it behind the few calls the async front
makes (add_request, add_requests, abort_request, step, get_stats, has_unfinished_requests, shutdown):
each is one message over a pipe and one reply, which also carries the engine's stats.

The engine process runs ahead: right after answering "step" with a step's outputs it runs the next
steps (up to MAX_STEPS_AHEAD, while no message waits), so the device is busy while the front sends
those outputs to its clients instead of waiting for the front's next "step" (at 256 Qwen3-0.6B
streams the server reached 0.82 of the engine's throughput without this, 0.93 one step ahead,
H100). The next "step" gets their outputs merged: a front that fell behind catches up with fewer,
larger chunks. Adds and aborts sent meanwhile are answered once the step under way is done; outputs
made for a request aborted since are dropped.

Outputs cross as deltas (the text and tokens new since the last one): the engine here makes them
itself (RequestOutputKind.DELTA), since copying every request's whole output each step cost more
host time than the rest of the step's bookkeeping; `RemoteEngine` puts the cumulative outputs back
together. The child exits when its parent dies; an engine process that dies
fails the step it was in, and every later one (`EngineProcessError`).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import operator
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from transformers import AutoTokenizer

from engine.config import EngineArgs
from engine.llm_engine import EngineStats, LLMEngine, freeze_gc_heap
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.tensor_parallel import TensorParallelError

logger = logging.getLogger("engine")

STOP_TIMEOUT_S = 30.0  # how long shutdown() waits for the engine process before killing it
MAX_STEPS_AHEAD = 4  # steps the engine process runs before the front asks for their outputs
# While waiting for the front, the engine process looks at its engine's health this often: once a tensor-parallel
# worker has died it exits, and the front (RemoteEngine.check_health, from its sentinel) sees that at once.
HEALTH_CHECK_S = 0.5


class EngineProcessError(RuntimeError):
    """The engine process died (or was shut down): no step can run again."""


class RemoteEngine:
    """An `LLMEngine` in a child process, for `AsyncLLMEngine`'s step thread (one caller at a time)."""

    def __init__(self, args: EngineArgs, on_start: Callable[[LLMEngine], None] | None = None):
        """`on_start(engine)` runs in the engine process once the engine is built (picklable: a
        module-level function; benchmarks use it to swap in a stub model)."""
        context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child_conn = context.Pipe()
        # Not a daemon: it starts tensor-parallel workers of its own. It ends on shutdown() (also at
        # this process's exit) or, if this process dies, by itself.
        self._process = context.Process(target=_serve, args=(args, child_conn, _log_settings(), on_start),
                                        name="engine-process")
        self._process.start()
        child_conn.close()
        atexit.register(self.shutdown)  # before multiprocessing's own exit handler joins the process
        self._unfinished = False
        self._requests: dict[str, _Assembled] = {}
        self._closed = False
        self.args = args
        try:
            self.model_config = self._call("start")  # waits for the load (and on CUDA, compile and capture)
        except BaseException:  # it failed to load (and exits), or we were interrupted: end it either way
            self._closed = True
            atexit.unregister(self.shutdown)
            self._process.join(STOP_TIMEOUT_S)
            if self._process.is_alive():
                self._process.kill()
            raise
        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
        logger.info("engine process %d serves %s", self._process.pid, args.model)

    @property
    def pid(self) -> int:
        return self._process.pid

    def add_request(self, request_id: str, prompt, params=None, arrival_time: float | None = None) -> None:
        self._call("add", request_id, prompt, params, arrival_time)

    def add_requests(self, requests: list[tuple]) -> list[Exception | None]:
        """Several `add_request` argument tuples in one round trip; each one's error (None: added). One
        request's bad input fails that request only."""
        return [None if error is None else _rebuilt(*error) for error in self._call("add_many", requests)]

    def abort_request(self, request_ids) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            self._requests.pop(request_id, None)
        self._call("abort", ids)

    def step(self) -> list[RequestOutput]:
        return [self._assemble(delta) for delta in self._call("step")]

    def get_stats(self) -> EngineStats:
        return self._stats

    def has_unfinished_requests(self) -> bool:
        return self._unfinished

    def check_health(self) -> None:
        """Raise EngineProcessError once the engine process has died. It only looks at the process's
        sentinel (safe from any thread: no round trip, which belongs to the step thread, and no reaping,
        which the step thread's own checks do). A tensor-parallel worker of the engine process that dies
        shows here too: the engine process exits when it finds that while waiting (HEALTH_CHECK_S)."""
        if self._closed:  # shut down, or found dead by a call
            raise EngineProcessError("the engine process is not running")
        if multiprocessing.connection.wait([self._process.sentinel], timeout=0):
            raise EngineProcessError("the engine process died")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        try:
            self._call("shutdown")
        except Exception as exc:  # it died already, or cannot stop cleanly: it is killed below
            logger.warning("engine process did not stop cleanly: %s", exc)
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("engine process did not exit in %.0f s: killing it", STOP_TIMEOUT_S)
            self._process.kill()
            self._process.join()
        self._conn.close()

    # ---- one message, one reply ---------------------------------------------------------------------

    def _call(self, command: str, *payload: Any) -> Any:
        if self._closed and command != "shutdown":
            raise EngineProcessError("the engine process was shut down")
        try:
            self._conn.send((command, payload))
            # Wait on the pipe and on the process: a reply that never comes must not hang the front.
            while not self._conn.poll(1.0):
                if not self._process.is_alive():
                    raise EOFError
            status, result, stats, unfinished = self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            self._closed = True
            self._process.join(1.0)  # for its exit code
            code = self._process.exitcode
            raise EngineProcessError(f"the engine process died (exit code {code})") from None
        if stats is not None:
            self._stats, self._unfinished = stats, unfinished
        if status == "error":
            raise _rebuilt(*result)
        return result

    def _assemble(self, delta: tuple) -> RequestOutput:
        request_id, prompt_fields, prompt_logprobs, completions, finished, num_cached_tokens, metrics = delta
        if prompt_fields is not None:
            self._requests[request_id] = _Assembled(*prompt_fields)
        state = self._requests[request_id]
        if prompt_logprobs is not None:
            state.prompt_logprobs = (state.prompt_logprobs or []) + prompt_logprobs
        outputs = []
        for index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason in completions:
            c = state.completions.setdefault(index, _Completion())
            c.text += text
            c.token_ids += token_ids
            if logprobs is not None:
                c.logprobs = (c.logprobs or []) + logprobs
            outputs.append(CompletionOutput(index, c.text, list(c.token_ids), cumulative_logprob,
                                            None if c.logprobs is None else list(c.logprobs), finish_reason, stop_reason))
        if finished:
            del self._requests[request_id]
        return RequestOutput(request_id, state.prompt, state.prompt_token_ids, state.prompt_logprobs, outputs, finished,
                             num_cached_tokens, None if metrics is None else RequestMetrics(*metrics))


@dataclass
class _Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None


@dataclass
class _Assembled:
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list | None = None
    completions: dict[int, _Completion] = field(default_factory=dict)


def _rebuilt(kind: str, message: str) -> Exception:
    """The engine process's exception, as the front knows it: bad input stays a ValueError."""
    if kind == "ValueError":
        return ValueError(message)
    if kind == "TensorParallelError":
        return TensorParallelError(message)
    return RuntimeError(f"{kind}: {message}")


# ---- the engine process ---------------------------------------------------------------------------------


def _log_settings() -> tuple[int, str | None]:
    """The server's log level and format, for the engine process's own lines to look the same."""
    root = logging.getLogger()
    formatter = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    return root.getEffectiveLevel(), None if formatter is None else formatter._fmt


def _serve(args: EngineArgs, conn: multiprocessing.connection.Connection, log_settings: tuple[int, str | None],
           on_start: Callable[[LLMEngine], None] | None) -> None:
    # Ctrl-C (and a SIGTERM sent to the whole group) reach this process too: the server decides, and
    # drains first; this process ends when told to, or when the server is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_when_parent_dies, daemon=True).start()
    level, fmt = log_settings
    logging.basicConfig(level=level, format=fmt or logging.BASIC_FORMAT)
    conn.recv()  # "start"
    try:
        engine = LLMEngine(args)
        if on_start is not None:
            on_start(engine)
        freeze_gc_heap()  # this process keeps this engine for its life
    except Exception as exc:
        conn.send(("error", (_kind(exc), str(exc)), None, False))
        return
    conn.send(("ok", engine.model_config, engine.get_stats(), False))
    seen: set[str] = set()  # requests whose prompt went to the front with an earlier output
    ahead: _Ahead | None = None  # steps run ahead of the front's next "step", not yet sent
    busy = _BusyPeriod(device_wait_at_start=engine.timings.device_wait)  # idle to idle: logged when it ends

    def run_step() -> _Ahead:
        try:
            start = time.perf_counter()
            outputs = engine.step()
            stepped = time.perf_counter()
            deltas = [_delta(output, seen) for output in outputs]
            busy.step_s += stepped - start
            busy.delta_s += time.perf_counter() - stepped
            return _Ahead(deltas)
        except Exception as exc:
            logging.getLogger("engine").exception("engine process: step failed")
            return _Ahead([], (_kind(exc), str(exc)))

    def run_ahead() -> _Ahead | None:
        """Steps while the front is busy (no message waiting) and requests are unfinished, up to
        MAX_STEPS_AHEAD; their deltas merged, so a front that fell behind catches up in one call."""
        result = None
        try:  # never raises: the "step" it follows has had its one reply
            for n in range(MAX_STEPS_AHEAD):
                if not engine.has_unfinished_requests() or (result is not None and conn.poll(0)):
                    break
                step = run_step()
                busy.steps_ahead += 1
                busy.full_ahead += n == MAX_STEPS_AHEAD - 1
                if result is None or step.error is not None:
                    result = step if result is None else _Ahead(result.deltas, step.error)
                else:
                    result.deltas = _merged(result.deltas + step.deltas)
                if step.error is not None:
                    break  # a failed step is not repeated ahead: the front aborts first
        except Exception as exc:
            logging.getLogger("engine").exception("engine process: running ahead failed")
            result = _Ahead(result.deltas if result is not None else [], (_kind(exc), str(exc)))
        return result

    def reply(status: str, result: Any) -> None:
        # "Unfinished" while a step run ahead is unsent: its outputs may finish the last requests.
        start = time.perf_counter()
        conn.send((status, result, engine.get_stats(), engine.has_unfinished_requests() or ahead is not None))
        busy.reply_s += time.perf_counter() - start

    while True:
        work_waits = engine.has_unfinished_requests()  # the device could be running a step meanwhile
        waited_from = time.perf_counter()
        while not conn.poll(HEALTH_CHECK_S):
            try:  # a tensor-parallel worker that died while nothing ran: no step can run again
                engine.check_health()
            except TensorParallelError as exc:
                # Out at once: the workers' watchdogs end them when this process is gone, and a teardown
                # here could wait on NCCL's abort of the broken group (never returned on the lent GPUs).
                logging.getLogger("engine").error("engine process: %s; exiting (the server sees it gone)", exc)
                logging.shutdown()
                os._exit(1)
        command, payload = conn.recv()
        if work_waits:
            busy.front_wait_s += time.perf_counter() - waited_from
        try:
            if command == "add":
                _add(engine, *payload)
                reply("ok", None)
            elif command == "add_many":
                errors = []
                for request in payload[0]:
                    try:
                        _add(engine, *request)
                        errors.append(None)
                    except Exception as exc:
                        if not isinstance(exc, ValueError):
                            logging.getLogger("engine").exception("engine process: adding request %s failed", request[0])
                        errors.append((_kind(exc), str(exc)))
                reply("ok", errors)
            elif command == "abort":
                engine.abort_request(payload[0])
                seen.difference_update(payload[0])
                if ahead is not None:  # outputs of a step run before the abort: not theirs to see any more
                    aborted = set(payload[0])
                    ahead.deltas = [d for d in ahead.deltas if d[0] not in aborted]
                reply("ok", None)
            elif command == "step":
                busy.steps += ahead is None
                done, ahead = ahead or run_step(), None
                if done.error is not None and done.deltas:  # steps that went well before one that failed:
                    done, ahead = _Ahead(done.deltas), _Ahead([], done.error)  # their outputs first
                if done.error is None:
                    reply("ok", done.deltas)
                else:
                    reply("error", done.error)
                # Run the next steps now, while the front sends these outputs: the device gets its next
                # step without waiting for the front's next call (adds and aborts sent meanwhile wait for
                # the step under way, at most one).
                if done.error is None and ahead is None:
                    ahead = run_ahead()
            elif command == "shutdown":
                engine.shutdown()
                conn.send(("ok", None, None, False))
                return
            else:
                raise ValueError(f"unknown command {command!r}")
        except Exception as exc:
            if not isinstance(exc, ValueError):
                logging.getLogger("engine").exception("engine process: %s failed", command)
            reply("error", (_kind(exc), str(exc)))
        if busy.steps and ahead is None and not engine.has_unfinished_requests():
            busy.log_and_reset(engine.timings.device_wait)


def _kind(exc: Exception) -> str:
    if isinstance(exc, TensorParallelError):
        return "TensorParallelError"
    if isinstance(exc, ValueError):
        return "ValueError"
    return type(exc).__name__


@dataclass
class _Ahead:
    """A step the engine process ran before the front asked for it: its output deltas, or its error."""

    deltas: list[tuple]
    error: tuple[str, str] | None = None


@dataclass
class _BusyPeriod:
    """The engine process's figures over one busy period (from idle to idle), for the log: where the
    server falls behind the engine, these say whether the device waited for the front."""

    steps: int = 0  # run when the front asked
    steps_ahead: int = 0  # run ahead of the front's asking
    full_ahead: int = 0  # times MAX_STEPS_AHEAD steps ran ahead (then the device waited for the front)
    front_wait_s: float = 0.0  # waiting for the front's next message while requests were unfinished
    step_s: float = 0.0  # in engine.step() (its host work and its wait for the device)
    delta_s: float = 0.0  # turning its outputs into deltas
    reply_s: float = 0.0  # pickling and sending replies
    device_wait_at_start: float | None = None  # the engine's cumulative device wait when the period began

    def log_and_reset(self, device_wait: float) -> None:
        steps = self.steps + self.steps_ahead
        waited = device_wait - (self.device_wait_at_start or 0.0)
        logging.getLogger("engine").info(
            "engine process: %d steps, %d of them run ahead of the front (%d times %d ahead, the most); waited "
            "%.3f s for the front with requests unfinished; a step: %.3f ms in engine.step (of which %.3f ms "
            "waiting for the device), %.3f ms of deltas, %.3f ms of replies", steps, self.steps_ahead,
            self.full_ahead, MAX_STEPS_AHEAD, self.front_wait_s, 1e3 * self.step_s / steps, 1e3 * waited / steps,
            1e3 * self.delta_s / steps, 1e3 * self.reply_s / steps)
        self.__init__(device_wait_at_start=device_wait)


def _add(engine: LLMEngine, request_id, prompt, params=None, arrival_time=None) -> None:
    """`engine.add_request`, asking for its outputs as deltas (this process's own copy of `params`)."""
    if params is None:
        params = SamplingParams(output_kind=RequestOutputKind.DELTA)
    elif isinstance(params, SamplingParams) and params.output_kind is RequestOutputKind.CUMULATIVE:
        params.output_kind = RequestOutputKind.DELTA  # FINAL_ONLY stays: its one output is its delta from nothing
    engine.add_request(request_id, prompt, params, arrival_time)


def _delta(output: RequestOutput, seen: set[str]) -> tuple:
    """A delta output (what is new since the request's previous output, or, for its first, everything)
    as the tuple that crosses to the front; its prompt with its first only."""
    request_id = output.request_id
    first = request_id not in seen
    if output.finished:
        seen.discard(request_id)
    elif first:
        seen.add(request_id)
    prompt_fields = (output.prompt, output.prompt_token_ids) if first else None
    # The metrics as a tuple of their fields in order (RequestMetrics(*it) in the front): 256 dataclasses a
    # step took ~2 ms to unpickle in the front and 0.35 ms to pickle here, tuples 0.16 and 0.16 (CPU).
    metrics = None if output.metrics is None else _metrics_fields(output.metrics)
    return (request_id, prompt_fields, output.prompt_logprobs or None, list(map(_completion_fields, output.outputs)),
            output.finished, output.num_cached_tokens, metrics)


_metrics_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(RequestMetrics)))  # -> a tuple, in order
_completion_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(CompletionOutput)))


def _merged(deltas: list[tuple]) -> list[tuple]:
    """Several steps' deltas (`_delta`'s tuples, in step order) as one per request: texts, token ids
    and logprobs joined; the rest (finish reasons, cached tokens, metrics) from the latest."""
    by_id: dict[str, tuple] = {}
    for delta in deltas:
        earlier = by_id.get(delta[0])
        if earlier is None:
            by_id[delta[0]] = delta
            continue
        request_id, prompt_fields, prompt_logprobs, completions, finished, num_cached_tokens, metrics = delta
        joined = {c[0]: c for c in earlier[3]}
        for c in completions:
            index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason = c
            if index in joined:
                before = joined[index]
                logprobs = before[4] if logprobs is None else (before[4] or []) + logprobs
                c = (index, before[1] + text, before[2] + token_ids, cumulative_logprob, logprobs, finish_reason,
                     stop_reason)
            joined[index] = c
        if prompt_logprobs is not None or earlier[2] is not None:
            prompt_logprobs = (earlier[2] or []) + (prompt_logprobs or [])
        by_id[request_id] = (request_id, earlier[1] or prompt_fields, prompt_logprobs, list(joined.values()), finished,
                             num_cached_tokens, metrics)
    return list(by_id.values())


def _exit_when_parent_dies() -> None:
    multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])
    os._exit(1)
