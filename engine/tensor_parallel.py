"""Tensor parallelism over processes: rank 0 (the engine's own process) schedules and samples, and
ranks 1..N-1 are worker processes, one per device, each holding its shard of every layer.

A step, from rank 0: a fixed-size header (what to do, the sizes of this step's tensors) goes to each
worker over its pipe, then one flat int64 tensor with the step's inputs (token ids, positions, slot
mapping, query starts, sequence lengths, block tables, the rows that need logits) is broadcast over
the process group (NCCL on CUDA, gloo on CPU). Every rank then runs the same forward, with the
layers' all-reduces inside it (inside the CUDA graphs too: each rank replays the bucket the shared
header implies), and the LM head's all-gather; only rank 0 samples. Workers wait for work on their
pipe, not inside a collective, so an idle engine never trips the collective timeout.

Lifecycle. Workers ignore SIGINT and SIGTERM: Ctrl-C (or a stop signal sent to the whole process
group) reaches every process, and rank 0 decides. A watchdog thread ends a worker the moment its
parent dies, even mid-collective. A worker's exception goes back to rank 0 over its pipe before the
worker exits; rank 0's monitor thread records it (and any worker that exits unexpectedly) and, on
NCCL, where a dead peer would leave rank 0 waiting, aborts the process group so rank 0's step fails
at once. Any failure inside a step's collective part stops every worker, and every later step raises
`TensorParallelError`: the ranks are out of step and cannot be trusted again (the server then exits:
engine.serve). `shutdown()` (LLMEngine.shutdown, the server's exit, atexit) stops the workers and
kills those that do not stop in time; after a failure it kills them at once.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import statistics
import struct
import sys
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from engine import communication
from ops.forward_context import AttentionMetadata

if TYPE_CHECKING:
    from engine.config import EngineArgs, ModelConfig

logger = logging.getLogger("engine")

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # start-up or a step that hangs this long fails instead
STOP_TIMEOUT_S = 10.0  # how long a shutdown waits for workers to exit before killing them
FAILURE_REPORT_WAIT_S = 2.0  # how long a failed step waits for a worker to say what went wrong
ABORT_WAIT_S = 10.0  # how long an NCCL abort may take before rank 0 goes on without it

# command, num_tokens, num_seqs, block-table width, logits rows, block copies, max_query_len, max_seq_len,
# and when rank 0 sent it (time.perf_counter_ns: CLOCK_MONOTONIC, one clock for every process of the host)
_HEADER = struct.Struct("<9q")
_STOP, _STEP = 0, 1

StepInputs = tuple[torch.Tensor, torch.Tensor, AttentionMetadata, "torch.Tensor | None", "torch.Tensor | None"]


class StepTimes:
    """Milliseconds of named parts of each step, over the last 4096 steps: their medians for a log
    line (unlike means, not moved by a few slow steps: compiles, a profiler's start)."""

    def __init__(self):
        self.ms: dict[str, collections.deque] = {}

    def add(self, name: str, seconds: float) -> None:
        self.ms.setdefault(name, collections.deque(maxlen=4096)).append(1e3 * seconds)

    def medians(self) -> str:
        return ", ".join(f"{name} {statistics.median(values):.3f}" for name, values in self.ms.items())


class GpuStepTimes:
    """This rank's GPU timeline of a step, from CUDA events recorded on its stream at the step's marks:
    medians of the time between consecutive marks, and the "gap" from a step's last mark to the next
    step's first (the GPU idle, or running what is queued between steps). Events are read once
    complete, never waited for. Does nothing off CUDA."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self.times = StepTimes()
        self._marks: list[tuple[str, torch.cuda.Event]] = []
        self._pending: collections.deque[list] = collections.deque()
        self._last_end: torch.cuda.Event | None = None

    def mark(self, name: str) -> None:
        if self.enabled:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((name, event))

    def summary(self) -> str:
        """For a log line: "; on its GPU (medians, ms): ..." once steps were timed, else nothing."""
        return f"; on its GPU (medians, ms): {self.times.medians()}" if self.times.ms else ""

    def step_done(self) -> None:
        if not self.enabled:
            return
        self._pending.append(self._marks)
        self._marks = []
        while self._pending and self._pending[0][-1][1].query():
            marks = self._pending.popleft()
            if self._last_end is not None:
                self.times.add("gap", self._last_end.elapsed_time(marks[0][1]) / 1e3)
            for (_, start), (name, end) in zip(marks, marks[1:]):
                self.times.add(name, start.elapsed_time(end) / 1e3)
            self._last_end = marks[-1][1]


class TensorParallelError(RuntimeError):
    """A rank failed, or the ranks fell out of step: this engine cannot run more steps."""


def process_group_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on cuda:r (of the visible devices); on CPU every rank shares the host."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def share_host_cores(tp_size: int) -> None:
    """On CPU the ranks share the host: each takes its share of the cores (rank 0 too), or their
    thread pools spin against each other and a step gets several times slower."""
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // tp_size))


# ---- one step's inputs, flattened -------------------------------------------------------------------


def pack_step(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
              logits_rows: torch.Tensor | None, block_copies: torch.Tensor | None = None) -> tuple[bytes, torch.Tensor]:
    """The header for the pipes and the flat tensor to broadcast (on the inputs' device)."""
    parts = [input_ids, positions, meta.slot_mapping, meta.query_start_loc.long(), meta.seq_lens.long(),
             meta.block_tables.flatten().long()]
    num_rows = num_copies = 0
    if logits_rows is not None:
        parts.append(logits_rows)
        num_rows = logits_rows.shape[0]
    if block_copies is not None:
        parts.append(block_copies.flatten())
        num_copies = block_copies.shape[0]
    header = _HEADER.pack(_STEP, input_ids.shape[0], meta.num_seqs, meta.block_tables.shape[1], num_rows, num_copies,
                          meta.max_query_len, meta.max_seq_len, time.perf_counter_ns())
    return header, torch.cat(parts)


@torch.inference_mode()
def receive_step(sizes: tuple[int, ...], device: torch.device) -> StepInputs:
    """A worker's side of the broadcast: the same inputs rank 0 runs the model on."""
    num_tokens, num_seqs, width, num_rows, num_copies, max_query_len, max_seq_len = sizes
    split = [num_tokens] * 3 + [num_seqs + 1, num_seqs, num_seqs * width, num_rows, 2 * num_copies]
    flat = torch.empty(sum(split), dtype=torch.long, device=device)
    dist.broadcast(flat, src=0)
    ids, positions, slots, query_start, seq_lens, tables, rows, copies = flat.split(split)
    query_start, seq_lens = query_start.int(), seq_lens.int()
    on_host = device.type == "cpu"
    meta = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=query_start,
        seq_lens=seq_lens,
        block_tables=tables.int().view(num_seqs, width),
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        query_start_loc_cpu=query_start if on_host else None,
        seq_lens_cpu=seq_lens if on_host else None,
    )
    # The model's own inputs are fresh tensors, not views of `flat`: torch.compile guards on a
    # view's base and would recompile.
    return ids.clone(), positions.clone(), meta, rows if num_rows else None, copies.view(num_copies, 2) if num_copies else None


# ---- rank 0 -----------------------------------------------------------------------------------------


class TensorParallelWorkers:
    """Rank 0's handle on ranks 1..tp_size-1: starts their processes, joins the process group with
    them, sends them each step, and stops them."""

    def __init__(self, args: EngineArgs, model_config: ModelConfig, device: torch.device):
        tp_size = args.tensor_parallel_size
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process; a tensor-parallel engine "
                               "needs its default process group (one such engine per process: call "
                               "llm.llm_engine.shutdown() on the other first)")
        if device.type == "cuda" and torch.cuda.device_count() < tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size} needs {tp_size} GPUs, but {torch.cuda.device_count()} are visible")
        self.tp_size = tp_size
        self.backend = process_group_backend(device)
        self.failure: str | None = None  # why no more steps can run
        self.failed = threading.Event()  # set with `failure`: a wait for the device gives up (HostCopy.wait)
        self._stopping = False
        self._closed = False
        self._abort_lock = threading.Lock()
        self._abort_started = False
        self._abort_done = threading.Event()
        self._procs: list[multiprocessing.Process] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._monitor: threading.Thread | None = None
        self._threads_before: int | None = None  # rank 0's CPU threads, given back at shutdown
        self.times = StepTimes()  # logged at shutdown, to set against each worker's
        self.gpu_times = GpuStepTimes(device)  # (and rank 0's GPU timeline a step, against each worker's)
        # Rendezvous through a store on a port the OS picks: no port to guess, no file to clean up.
        self._store = dist.TCPStore("127.0.0.1", 0, tp_size, is_master=True, timeout=COLLECTIVE_TIMEOUT,
                                    wait_for_workers=False)
        atexit.register(self.shutdown)
        try:
            self._start_workers(args, model_config, device)
            if device.type == "cuda":
                torch.cuda.set_device(rank_device(device, 0))
            else:
                self._threads_before = torch.get_num_threads()
                share_host_cores(tp_size)
            dist.init_process_group(self.backend, store=self._store, rank=0, world_size=tp_size,
                                    timeout=COLLECTIVE_TIMEOUT,
                                    device_id=rank_device(device, 0) if device.type == "cuda" else None)
        except BaseException:
            self.shutdown(graceful=False)
            raise
        self._monitor = threading.Thread(target=self._watch_workers, name="engine-tp-monitor", daemon=True)
        self._monitor.start()
        logger.info("tensor parallelism: %d ranks over %s; worker pids %s", tp_size, self.backend, self.pids)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def _start_workers(self, args: EngineArgs, model_config: ModelConfig, device: torch.device) -> None:
        context = multiprocessing.get_context("spawn")
        log_level = logging.getLogger("engine").getEffectiveLevel()
        for rank in range(1, self.tp_size):
            ours, theirs = context.Pipe()
            # Not daemonic: a daemonic process may not start children, and torch.compile does.
            proc = context.Process(target=run_worker, name=f"engine-tp-rank{rank}",
                                   args=(rank, args, model_config, self._store.port, theirs, log_level))
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)
        # Wait for each worker to be about to join the group: one that dies while importing would
        # otherwise leave rank 0 waiting in the rendezvous until the timeout.
        deadline = time.monotonic() + COLLECTIVE_TIMEOUT.total_seconds()
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns), start=1):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TensorParallelError(f"tensor-parallel worker rank {rank} did not start within {COLLECTIVE_TIMEOUT}")
            try:
                kind, text = conn.recv()
            except EOFError:
                proc.join(5.0)
                kind, text = "error", (
                    f"it exited with code {proc.exitcode} (its stderr says why). Workers are spawned and import "
                    "the main module first: a script must start the engine under `if __name__ == '__main__':`")
            if kind != "started":
                raise TensorParallelError(f"tensor-parallel worker rank {rank} failed to start: {text}")

    @contextlib.contextmanager
    def step(self, *inputs) -> Iterator[None]:
        """Send a step's inputs (`pack_step`'s arguments) to every worker; rank 0 runs its part of the
        step inside this block, in lockstep with them."""
        if self.failure is not None:  # a worker died between steps, or the engine was shut down
            self.shutdown(graceful=False)
            raise TensorParallelError(self.failure)
        with self.lockstep():
            self.gpu_times.mark("start")
            header, payload = pack_step(*inputs)
            sent = time.perf_counter()
            for conn in self._conns:
                conn.send_bytes(header)
            dist.broadcast(payload, src=0)
            self.gpu_times.mark("broadcast")
            yield
            self.gpu_times.mark("forward")  # (and the sampling queued with it)
            self.gpu_times.step_done()
            self.times.add("launched", time.perf_counter() - sent)
            if self.failure is not None:
                # On NCCL a dead worker's collectives were aborted, not failed: this step's results
                # are garbage even though nothing raised.
                raise TensorParallelError(self.failure)

    @contextlib.contextmanager
    def lockstep(self) -> Iterator[None]:
        """Around rank 0's part of what every rank does together (start-up, a step). If it fails,
        the ranks are out of step: every worker is stopped and no step runs again. A collective's
        error that a worker caused comes back as that worker's error; rank 0's own, as it is."""
        try:
            yield
        except BaseException as exc:
            # What a collective (or a pipe) raises when the rank at its other end failed.
            peer_failed = isinstance(exc, (RuntimeError, OSError))
            if peer_failed:
                self.failed.wait(FAILURE_REPORT_WAIT_S)  # for the worker's own report
            self.failure = self.failure or f"tensor-parallel rank 0 failed ({type(exc).__name__}: {exc})"
            self.shutdown(graceful=False)
            if peer_failed:
                raise TensorParallelError(f"{self.failure}; every worker was stopped") from exc
            raise

    def _watch_workers(self) -> None:
        """Monitor thread: record a worker's error report, or its exit while not shutting down."""
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self._procs, start=1)}
        reports = {conn: rank for rank, conn in enumerate(self._conns, start=1)}
        while sentinels:
            for item in multiprocessing.connection.wait([*sentinels, *reports]):
                if item not in sentinels:
                    if item in reports:  # not a pipe already read to its end in this round
                        self._read_report(item, reports)
                    continue
                rank = sentinels.pop(item)
                conn = self._conns[rank - 1]
                while conn in reports:  # a dead worker's report, if any, comes before the end of its pipe
                    self._read_report(conn, reports)
                if not self._stopping:
                    self._record_failure(f"tensor-parallel worker rank {rank} exited unexpectedly "
                                         f"(exit code {self._procs[rank - 1].exitcode})")

    def _read_report(self, conn: multiprocessing.connection.Connection, reports: dict) -> None:
        try:
            kind, text = conn.recv()
        except (EOFError, OSError):
            del reports[conn]
            return
        if kind == "error":
            self._record_failure(f"tensor-parallel worker rank {reports[conn]} failed: {text}")

    def _record_failure(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            logger.error("%s; the engine cannot run more steps", message)
        # This GPU may be waiting at a custom all-reduce for the dead rank: stand in for it (before
        # `failed` lets the main thread give up and shut down).
        communication.release_after_peer_failure()
        self.failed.set()
        if self.backend == "nccl" and not self._stopping and dist.is_initialized():
            # A collective waiting for the dead rank would never return: abort it, so rank 0's
            # step fails now instead of at the timeout.
            self._abort_nccl()

    def _abort_nccl(self) -> None:
        """Abort the NCCL group, once, waiting at most ABORT_WAIT_S. On two H100s (session 10) the
        abort itself never returned after a worker died mid-step (the monitor thread and then the
        main thread sat in `_abort_process_group` for minutes): rank 0 must still fail the step
        and stop its workers, so the abort runs in a thread of its own and is left behind if stuck."""
        with self._abort_lock:
            started, self._abort_started = self._abort_started, True
        if started:  # another thread's abort: wait for it as long as it would
            self._abort_done.wait(ABORT_WAIT_S)
            return

        def abort() -> None:
            try:
                dist.distributed_c10d._abort_process_group()
            finally:
                self._abort_done.set()

        aborting = threading.Thread(target=abort, name="engine-tp-abort", daemon=True)
        aborting.start()
        aborting.join(ABORT_WAIT_S)
        if aborting.is_alive():
            logger.error("aborting the NCCL process group did not finish in %.0f s; going on without it (this "
                         "process's GPU state is broken: restart it to use tensor parallelism again)", ABORT_WAIT_S)

    def shutdown(self, graceful: bool = True) -> None:
        """Stop every worker and leave the process group. `graceful=False` (a step failed, the ranks
        are out of step) kills them at once instead of asking them to finish."""
        if self._closed:
            return
        # After a worker failed, no rank can be asked to finish (and destroying the group would wait on
        # NCCL's abort, which has never returned on the lent GPUs): what follows a failure is never graceful.
        graceful = graceful and self.failure is None
        self._closed = self._stopping = True
        atexit.unregister(self.shutdown)
        if self.times.ms:
            logger.info("tensor-parallel rank 0: a step (medians, ms from sending it to the workers): %s%s",
                        self.times.medians(), self.gpu_times.summary())
        self.failure = self.failure or "the tensor-parallel workers were shut down"
        if not graceful:  # the workers are killed mid-step: none of them will meet this GPU at a barrier again
            communication.release_after_peer_failure()
        if graceful:
            for conn in self._conns:
                try:
                    conn.send_bytes(_HEADER.pack(_STOP, 0, 0, 0, 0, 0, 0, 0, 0))
                except OSError:
                    pass  # that worker is gone already
            # Every rank leaves the group at once. On 2 GPUs each worker waited out the stop timeout
            # while rank 0 joined it before leaving: most likely its NCCL teardown waits for rank 0's.
            if dist.is_initialized():
                dist.destroy_process_group()
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for proc in self._procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                if graceful:
                    logger.warning("tensor-parallel worker %s did not stop in %.0f s: killing it", proc.name, STOP_TIMEOUT_S)
                proc.kill()
            proc.join(5.0)
        if dist.is_initialized():  # not graceful: the ranks are out of step
            if self.backend == "nccl":
                self._abort_nccl()  # destroying would wait on the broken collective
            else:
                dist.destroy_process_group()
        if self._monitor is not None:
            self._monitor.join(ABORT_WAIT_S + 5.0)  # it ends once every worker has exited (and an abort it started)
        for conn in self._conns:
            conn.close()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
        communication.shutdown_custom_all_reduce()  # also when the engine failed and was never shut down
        self.failed.set()


# ---- ranks 1..N-1 -----------------------------------------------------------------------------------


def run_worker(rank: int, args: EngineArgs, model_config: ModelConfig, store_port: int,
               conn: multiprocessing.connection.Connection, log_level: int) -> None:
    """A worker process's main: join the group, build this rank's ModelRunner, run steps until told
    to stop. Any exception is reported to rank 0 and ends the process."""
    # Ctrl-C, and a SIGTERM sent to the whole process group (systemd's stop, `kill -TERM -PGID`), reach every
    # process: rank 0 decides, and stops us (or the watchdog does when it is gone). A worker that died of the
    # signal would fail the step in flight and make a drain look like a failure.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_when_parent_dies, name="engine-tp-watchdog", daemon=True).start()
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s %(name)s [rank {rank}]: %(message)s")
    try:
        _serve_steps(rank, args, model_config, store_port, conn)
        exit_code = 0
    except EOFError:
        exit_code = 1  # rank 0 is gone
    except BaseException as exc:
        logger.exception("tensor-parallel worker rank %d failed", rank)
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        exit_code = 1
    # Straight out: the interpreter's teardown has nothing left to do here (after a failure, the
    # group is broken and must not be torn down) and takes seconds with torch loaded. Inductor's
    # compile workers, if any, exit when they see their parent go.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def _serve_steps(rank: int, args: EngineArgs, model_config: ModelConfig, store_port: int,
                 conn: multiprocessing.connection.Connection) -> None:
    from engine.llm_engine import freeze_gc_heap
    from engine.model_runner import ModelRunner  # the runner starts workers: import it here, not at the top

    device = rank_device(args.resolve_device(), rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        share_host_cores(args.tensor_parallel_size)
    torch.manual_seed(args.seed)  # random (dummy) weights are the same from run to run
    conn.send(("started", None))
    store = dist.TCPStore("127.0.0.1", store_port, args.tensor_parallel_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(process_group_backend(device), store=store, rank=rank,
                            world_size=args.tensor_parallel_size, timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    runner = ModelRunner(args, model_config, device, tp_rank=rank)
    freeze_gc_heap()  # this worker keeps this runner for its life
    # Logged at the end: is this worker (idle ~ 0, or launching later than rank 0) what holds rank 0 up?
    steps, idle_s, busy_s = 0, 0.0, 0.0
    times = StepTimes()  # from rank 0's send (medians): to set against rank 0's "launched"
    gpu_times = GpuStepTimes(device)  # this GPU's timeline a step: to set against rank 0's
    while True:
        start = time.perf_counter()
        command, *sizes, sent_ns = _HEADER.unpack(conn.recv_bytes())
        received = time.perf_counter()
        if command == _STOP:
            break
        sent = sent_ns / 1e9
        gpu_times.mark("start")
        inputs = receive_step(tuple(sizes), device)
        gpu_times.mark("broadcast")
        unpacked = time.perf_counter()
        runner.execute_model(*inputs)
        gpu_times.mark("forward")
        gpu_times.step_done()
        launched = time.perf_counter()
        times.add("received", received - sent)
        times.add("inputs", unpacked - sent)
        times.add("launched", launched - sent)
        times.add("waited", received - start)
        steps, idle_s, busy_s = steps + 1, idle_s + received - start, busy_s + launched - received
    if steps:
        logger.info("tensor-parallel worker rank %d: %d steps; a step %.3f ms of host work, %.3f ms waiting for the "
                    "next from rank 0; medians (ms; received, inputs, launched: since rank 0 sent the step): %s%s", rank,
                    steps, 1e3 * busy_s / steps, 1e3 * idle_s / steps, times.medians(), gpu_times.summary())
    del runner  # its CUDA graphs hold collectives: free them before the group goes
    communication.shutdown_custom_all_reduce()
    dist.destroy_process_group()


def _exit_when_parent_dies() -> None:
    """End this worker as soon as rank 0's process is gone, whatever the main thread is waiting on."""
    multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])
    os._exit(1)
