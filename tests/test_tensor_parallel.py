"""Tensor parallelism over worker processes (gloo on CPU, the same code as NCCL on GPUs): TP=2 and
TP=4 give the tokens TP=1 and transformers give, on every architecture; the server runs it; sizes
that cannot be split are refused by name; and no worker outlives its engine, however it ends."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import socket
import threading
import subprocess
import sys
import time
from types import SimpleNamespace

import openai
import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from engine import LLM, EngineArgs, SamplingParams
from engine import tensor_parallel
from engine.config import check_tensor_parallel_sizes
from engine.demo_model import build_tiny_checkpoint
from engine.tensor_parallel import GpuStepTimes, TensorParallelError
from tests.test_engine import hf_greedy, random_prompts
from tests.test_server import ServerProcess

# Block size 4 and a 24-token budget per step: prompts span many blocks, long ones are prefilled in
# chunks, and decodes share steps with prompt chunks.
ENGINE = dict(block_size=4, max_model_len=256, max_num_batched_tokens=24, num_gpu_blocks_override=512, seed=0)
PROMPTS = random_prompts([1, 6, 19, 45], seed=7)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=2)


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tmp_path_factory) -> dict[str, str]:
    """One tiny model per architecture, between them every way a layer is split:
    llama3-tied: a vocabulary (1001) no rank count divides, so the last embedding shard is padded;
    tied embeddings; biases on q/k/v/o and the MLP (row-parallel biases added once).
    qwen2: q/k/v biases, 4 query heads and 2 KV heads: one KV head per rank.
    qwen3-one-kv-head: q/k norms and a single KV head, replicated on both ranks."""
    qwen3 = build_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen3-1kv")), "Qwen3ForCausalLM", seed=2,
                                  head_dim=32, num_key_value_heads=1)
    return {"llama3-tied": tiny_checkpoints["llama3-tied"], "qwen2": tiny_checkpoints["qwen2"], "qwen3-one-kv-head": qwen3}


def running(pid: int) -> bool:
    """Whether a process still runs (a zombie has ended: only its exit status waits to be read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def assert_gone(pids: list[int], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while alive := [pid for pid in pids if running(pid)]:
        assert time.monotonic() < deadline, f"worker processes {alive} still run {timeout_s} s after their engine ended"
        time.sleep(0.05)


@contextlib.contextmanager
def tensor_parallel_llm(path: str, tp_size: int, **kwargs):
    llm = LLM(path, tensor_parallel_size=tp_size, **{**ENGINE, **kwargs})
    pids = llm.llm_engine.runner.workers.pids
    assert len(pids) == tp_size - 1 and all(running(pid) for pid in pids)
    try:
        yield llm
    finally:
        llm.llm_engine.shutdown()
    assert_gone(pids)
    assert not dist.is_initialized()


def generate(llm: LLM, params: SamplingParams = GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)


def assert_same_logprobs(want: dict, got: dict) -> None:
    assert want.keys() == got.keys()
    for token in want:
        assert got[token].logprob == pytest.approx(want[token].logprob, abs=1e-4)


def assert_same_outputs(want, got) -> None:
    """Same greedy tokens, and the same logprobs of them and of the prompts."""
    for a, b in zip(want, got):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert_same_logprobs(x, y)
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert_same_logprobs(x, y)


@pytest.mark.parametrize("name", ["llama3-tied", "qwen2", "qwen3-one-kv-head"])
def test_two_ranks_give_the_tokens_of_one_rank_and_of_transformers(checkpoints, name):
    path = checkpoints[name]
    single = LLM(path, **ENGINE)
    assert single.llm_engine.runner.workers is None and not dist.is_initialized()  # TP=1: no process, no group
    want = generate(single)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, output in zip(PROMPTS, want):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)

    with tensor_parallel_llm(path, 2) as llm:
        runner = llm.llm_engine.runner
        assert runner.kv_caches[0][0].shape[2] == 1  # this rank's KV heads: half of 2, or the one replicated
        assert runner.num_blocks == single.llm_engine.runner.num_blocks
        whole = sum(p.numel() for p in single.llm_engine.runner.model.parameters())
        assert sum(p.numel() for p in runner.model.parameters()) < 0.6 * whole  # rank 0 holds its shard only
        assert_same_outputs(want, generate(llm))
        if name == "llama3-tied":  # n > 1: forks copy their shared partial block on every rank
            fork = SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True)
            got = [[c.token_ids for c in o.outputs] for o in generate(llm, fork)]
            assert llm.llm_engine.block_manager.copy_on_writes_total > 0
            assert got == [[c.token_ids for c in o.outputs] for o in generate(single, fork)]


def test_async_scheduling_on_two_ranks_gives_the_tokens_of_sync_steps_on_one(checkpoints):
    """Rank 0 launches step N+1 (its pending input ids filled in on the device, then broadcast)
    before reading step N's tokens; the workers run ahead with it."""
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=7, max_tokens=14, ignore_eos=True),
              SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=10, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    path = checkpoints["qwen2"]
    want = LLM(path, **ENGINE).generate(prompts, params, use_tqdm=False)
    with tensor_parallel_llm(path, 2, async_scheduling=True) as llm:
        steps = llm.llm_engine.timings.steps
        got = llm.generate(prompts, params, use_tqdm=False)
        assert llm.llm_engine.timings.steps > steps and not llm.llm_engine._in_flight
        assert llm.llm_engine.get_stats().num_used_blocks == 0
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    for o, w in zip(got, want):
        for c, d in zip(o.outputs, w.outputs):
            if d.logprobs:
                for x, y in zip(c.logprobs, d.logprobs):
                    assert_same_logprobs(y, x)


def test_four_ranks_on_eight_heads_and_four_kv_heads(tmp_path):
    path = build_tiny_checkpoint(str(tmp_path / "llama-8h"), "LlamaForCausalLM", seed=4, num_attention_heads=8,
                                 num_key_value_heads=4, intermediate_size=256)
    want = generate(LLM(path, **ENGINE))
    with tensor_parallel_llm(path, 4) as llm:
        assert llm.llm_engine.runner.kv_caches[0][0].shape[2] == 1
        assert_same_outputs(want, generate(llm))


def test_sizes_that_cannot_be_split_are_refused_by_name_before_any_worker_starts(checkpoints):
    with pytest.raises(ValueError, match=r"4 attention heads cannot be split over tensor_parallel_size=3 ranks "
                                         r"\(4 is not divisible by 3\)"):
        LLM(checkpoints["qwen2"], tensor_parallel_size=3)
    assert not dist.is_initialized()

    def config(heads=8, kv_heads=8, intermediate=512):
        return SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate)

    with pytest.raises(ValueError, match=r"6 KV heads cannot be split over tensor_parallel_size=4 ranks \(6 is not divisible by 4\)"):
        check_tensor_parallel_sizes(config(kv_heads=6), 4)
    with pytest.raises(ValueError, match=r"3 KV heads cannot be replicated over tensor_parallel_size=4 ranks "
                                         r"\(4 is not a multiple of 3\)"):
        check_tensor_parallel_sizes(config(kv_heads=3), 4)
    with pytest.raises(ValueError, match=r"intermediate_size 500 cannot be split over tensor_parallel_size=8 ranks"):
        check_tensor_parallel_sizes(config(intermediate=500), 8)
    check_tensor_parallel_sizes(config(kv_heads=2), 8)  # 2 KV heads, each on 4 of the 8 ranks
    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 1, got 0"):
        EngineArgs(model="x", tensor_parallel_size=0)


def _failing_worker(method: str, failing_call: int, *args) -> None:
    """A worker (spawned: it runs in its own process) whose ModelRunner `method` raises the
    `failing_call`-th time it is called."""
    from engine.model_runner import ModelRunner

    original, calls = getattr(ModelRunner, method), []

    def failing(self, *inputs):
        calls.append(None)
        if len(calls) == failing_call:
            raise RuntimeError(f"injected failure in {method}")
        return original(self, *inputs)

    setattr(ModelRunner, method, failing)
    tensor_parallel.run_worker(*args)


def _worker_failing_at_start(*args) -> None:
    _failing_worker("_load_and_allocate", 1, *args)


def _worker_failing_on_its_third_step(*args) -> None:
    _failing_worker("execute_model", 3, *args)


def test_a_worker_exception_at_start_fails_the_engine_with_its_error(checkpoints, monkeypatch):
    monkeypatch.setattr(tensor_parallel, "run_worker", _worker_failing_at_start)
    with pytest.raises(TensorParallelError, match=r"tensor-parallel worker rank 1 failed: RuntimeError: injected "
                                                  r"failure in _load_and_allocate; every worker was stopped"):
        LLM(checkpoints["qwen2"], tensor_parallel_size=2, **ENGINE)
    assert not multiprocessing.active_children()
    assert not dist.is_initialized()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_worker_exception_in_a_step_fails_it_with_its_error_and_ends_every_worker(checkpoints, monkeypatch,
                                                                                   async_scheduling):
    monkeypatch.setattr(tensor_parallel, "run_worker", _worker_failing_on_its_third_step)
    llm = LLM(checkpoints["qwen2"], tensor_parallel_size=2, async_scheduling=async_scheduling, **ENGINE)
    pids = llm.llm_engine.runner.workers.pids
    with pytest.raises(TensorParallelError, match=r"tensor-parallel worker rank 1 failed: RuntimeError: injected "
                                                  r"failure in execute_model; every worker was stopped"):
        generate(llm)
    assert_gone(pids)
    assert not dist.is_initialized()
    with pytest.raises(TensorParallelError, match="worker rank 1 failed"):  # at once, not a hang
        generate(llm)
    llm.llm_engine.shutdown()


def test_a_process_whose_default_group_is_taken_gets_a_clear_error(checkpoints):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="one such engine per process"):
            LLM(checkpoints["qwen2"], tensor_parallel_size=2, **ENGINE)
    finally:
        dist.destroy_process_group()


# A script that keeps a TP=2 engine busy; it prints its workers' pids first. It takes Ctrl-C as a
# terminal's Python does even when the tests run in a background job, whose children ignore SIGINT.
BUSY_SCRIPT = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from engine import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, max_model_len=256, num_gpu_blocks_override=256)
print("workers", *llm.llm_engine.runner.workers.pids, flush=True)
while True:
    llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=64, ignore_eos=True), use_tqdm=False)
"""


def busy_engine_process(path: str) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", BUSY_SCRIPT, path], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    line = proc.stdout.readline()
    assert line.startswith("workers"), f"the engine did not start: {line!r}"
    time.sleep(0.5)  # generating now
    return proc, [int(pid) for pid in line.split()[1:]]


@pytest.mark.parametrize("how", ["SIGKILL to the engine's process", "Ctrl-C to its process group"])
def test_no_worker_outlives_an_engine_process_that_ends(checkpoints, how):
    proc, pids = busy_engine_process(checkpoints["qwen2"])
    try:
        if how.startswith("SIGKILL"):
            proc.kill()  # no atexit, no finally: the workers notice their parent is gone
        else:
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: every process of the group gets it
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:  # failed: leave no busy engine behind for the tests after this one
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert_gone(pids)


@pytest.mark.parametrize("engine_process", [False, True], ids=["in-process", "engine-process"])
def test_the_server_with_tensor_parallel_size_2_answers_the_openai_client(checkpoints, tmp_path, engine_process):
    # With --engine-process the workers are the engine process's children: they must go with it.
    path = checkpoints["llama3-tied"]
    prompt = PROMPTS[2]
    want = LLM(path, **ENGINE).generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0].outputs[0]
    server = ServerProcess(tmp_path / "server.log", "--model", path, "--served-model-name", "tiny",
                           "--tensor-parallel-size", "2", "--max-model-len", "256", "--block-size", "4",
                           "--num-gpu-blocks-override", "512", *(["--engine-process"] if engine_process else []))
    try:
        pids = [int(pid) for pid in re.search(r"worker pids \[([\d, ]+)\]", server.log()).group(1).split(",")]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        completion = client.completions.create(model="tiny", prompt=prompt, max_tokens=GREEDY.max_tokens,
                                               temperature=0, extra_body={"ignore_eos": True})
        assert completion.choices[0].text == want.text
        assert completion.usage.completion_tokens == len(want.token_ids)
    finally:
        exit_code = server.stop()
    assert exit_code == 0, server.log()
    assert_gone(pids)


@pytest.mark.parametrize("engine_process", [False, True], ids=["in-process", "engine-process"])
def test_a_server_whose_idle_worker_dies_exits_with_status_1_and_leaves_no_process(checkpoints, tmp_path,
                                                                                  engine_process):
    # The engine cannot step again once a rank is gone: the server exits (vLLM's behaviour) so that whatever
    # runs it starts a new one, rather than answering 503 for ever with a broken process group. Its health
    # check finds the dead worker with no request running (with --engine-process: the engine process exits).
    server = ServerProcess(tmp_path / "server.log", "--model", checkpoints["llama3-tied"], "--tensor-parallel-size", "2",
                           "--max-model-len", "256", "--block-size", "4", "--num-gpu-blocks-override", "512",
                           "--engine-process" if engine_process else "--no-engine-process")
    try:
        pids = [int(pid) for pid in re.search(r"worker pids \[([\d, ]+)\]", server.log()).group(1).split(",")]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        client.completions.create(model=checkpoints["llama3-tied"], prompt=PROMPTS[0], max_tokens=2)
        os.kill(pids[0], signal.SIGKILL)
        assert server.proc.wait(timeout=30) == 1, server.log()
    finally:
        server.stop()
    assert "tensor-parallel worker rank 1 exited unexpectedly" in server.log()
    assert "the engine died" in server.log()
    assert_gone(pids)


def test_a_stop_signal_to_the_servers_process_group_is_a_clean_drain_not_a_worker_death(checkpoints, tmp_path):
    # systemd's stop and `kill -TERM -PGID` signal every process of the group: the workers leave stopping to
    # rank 0, so the server drains and exits 0 instead of seeing a worker die and exiting 1.
    server = ServerProcess(tmp_path / "server.log", "--model", checkpoints["llama3-tied"], "--tensor-parallel-size", "2",
                           "--max-model-len", "256", "--block-size", "4", "--num-gpu-blocks-override", "512",
                           "--no-engine-process", new_session=True)
    try:
        pids = [int(pid) for pid in re.search(r"worker pids \[([\d, ]+)\]", server.log()).group(1).split(",")]
        os.killpg(server.proc.pid, signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.log()
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
    assert "exited unexpectedly" not in server.log() and "the engine died" not in server.log()
    assert_gone(pids)


# ---- GPUs: NCCL, torch.compile with the collectives, CUDA graphs with the all-reduce inside ----------
# (`python -m pytest -m gpu tests/test_tensor_parallel.py` on a machine with 2 GPUs)

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
# No prefill / mixed-step graphs: they are the default with one GPU only, and TP=1's reference must run its steps
# as TP=2 does (with them, session 9: one of 17 sequences took another token at its 7th, fp32, all three variants).
GPU_ENGINE = dict(dtype="float32", max_model_len=512, max_num_seqs=32, cuda_graph_sizes=[2, 4, 8, 16],
                  num_gpu_blocks_override=2048, mixed_cuda_graph_sizes=[0])
GPU_GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
GPU_BATCH_SIZES = [1, 3, 17]  # graph buckets 2 and 4, and past the largest bucket (compiled, no graph)


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory) -> str:
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("gpu-llama")), "LlamaForCausalLM", seed=3,
                                 hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                                 head_dim=64)


def gpu_generate(llm: LLM, batch_size: int) -> list[list[int]]:
    prompts = [{"prompt_token_ids": p} for p in random_prompts([1 + 7 * i % 90 for i in range(batch_size)], seed=batch_size)]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GPU_GREEDY, use_tqdm=False)]


def test_gpu_step_times_record_nothing_off_cuda_and_add_nothing_to_the_log_line():
    times = GpuStepTimes(torch.device("cpu"))
    times.mark("start")
    times.step_done()
    assert times.summary() == "" and not times._marks and not times._pending


def test_the_custom_all_reduce_runs_only_where_its_kernel_can():
    from engine.communication import why_not_custom

    cuda = torch.device("cuda", 0)
    assert why_not_custom(cuda, torch.bfloat16, 2) is None and why_not_custom(cuda, torch.float32, 4) is None
    assert why_not_custom(torch.device("cpu"), torch.bfloat16, 2) == "cpu device"  # gloo, as in every CPU test here
    assert why_not_custom(cuda, torch.float16, 2) == "its kernel does not sum float16"
    assert why_not_custom(cuda, torch.bfloat16, 1) == "one rank"


def test_the_lamport_kernel_takes_rows_of_one_size_only():
    """Its slot counters are a row each, a row `hidden` values of its buffer: calls of another row size
    (none in a model, whose norms share one) take the unfused path instead of reusing those rows."""
    from engine.communication import CustomAllReduce

    custom = CustomAllReduce.__new__(CustomAllReduce)  # its buffer without the rendezvous (CPU)
    custom.buffer, custom.region = torch.zeros(1024, dtype=torch.bfloat16), 1024
    custom.protocol, custom.lamport_hidden = "lamport", None
    rows = lambda n, hidden: (torch.zeros(n, hidden, dtype=torch.bfloat16), None, torch.ones(hidden, dtype=torch.bfloat16))
    assert custom.fused_fits(*rows(2, 64)) and custom.fused_fits(*rows(16, 64))
    assert not custom.fused_fits(*rows(2, 128))  # another size: unfused
    assert not custom.fused_fits(*rows(17, 64))  # past the buffer: unfused, and no claim changes
    assert custom.fused_fits(*rows(1, 64)) and custom.lamport_hidden == 64
    custom.protocol = "flags"  # the barrier-based kernel keeps no row state: any size
    assert custom.fused_fits(*rows(2, 128))


def test_rank_0_stands_in_for_failed_peers_once_a_process_and_only_with_the_custom_all_reduce(monkeypatch):
    """A worker's error report and its exit (and each dead worker with TP > 2) all report a failure:
    one stand-in thread, not one each."""
    from engine import communication

    monkeypatch.setattr(communication, "_release", None)
    monkeypatch.setattr(communication, "_kept", [])
    monkeypatch.setattr(communication, "_custom", None)
    assert communication.release_after_peer_failure() is None  # off (CPU, NCCL only): nothing to do

    calls = []
    fake = SimpleNamespace(stand_in_for_peers=lambda seconds: calls.append(seconds))
    monkeypatch.setattr(communication, "_custom", fake)
    first = communication.release_after_peer_failure(5.0)
    assert communication.release_after_peer_failure(5.0) is first
    first.join(5)
    assert calls == [5.0] and communication._kept == [fake]


def test_a_wait_for_the_device_gives_up_once_a_worker_has_failed_and_not_before():
    """A rank-0 GPU stuck at the custom all-reduce's barrier never finishes the step: the host must not
    block on it (with NCCL the abort ends the wait; nothing ends this one)."""
    from engine.device_io import HostCopy

    class Device:  # a CUDA event as HostCopy.wait sees one: done after `ready_after` polls
        def __init__(self, ready_after):
            self.polls, self.ready_after = 0, ready_after

        def query(self):
            self.polls += 1
            return self.polls > self.ready_after

        def synchronize(self):
            raise AssertionError("a wait that can give up must not block")

    failed = threading.Event()
    copy = HostCopy([torch.tensor([7])])
    copy.event = Device(ready_after=5)
    assert copy.wait(failed)[0].item() == 7 and copy.event.polls == 6  # not failed: waits it out
    copy.event = Device(ready_after=10**9)
    threading.Timer(0.05, failed.set).start()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="another tensor-parallel rank failed"):
        copy.wait(failed)
    assert time.monotonic() - start < 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_step_times_read_the_gpu_timeline_between_marks_without_waiting():
    times = GpuStepTimes(torch.device("cuda"))
    for i in range(5):
        times.mark("start")
        torch.cuda._sleep(1_000_000)  # ~0.5 ms of GPU time at the H100's clocks
        times.mark("slept")
        if i == 0:
            times.step_done()
            assert len(times._pending) == 1  # still sleeping: read later, not waited for
            continue
        if i == 4:
            torch.cuda.synchronize()
        times.step_done()
    ms = times.times.ms
    assert len(ms["slept"]) == 5 and min(ms["slept"]) > 0.1
    assert len(ms["gap"]) == 4 and max(ms["gap"]) < 0.1  # queued back to back: the GPU never idled between
    assert not times._pending
    assert times.summary().startswith("; on its GPU (medians, ms): slept ")


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("compile_model, async_scheduling", [(True, False), (False, False), (True, True)],
                         ids=["compiled", "graphs-of-eager", "compiled-async"])
def test_gpu_two_ranks_with_graphs_give_the_tokens_of_one_rank(gpu_checkpoint, compile_model, async_scheduling):
    one = LLM(gpu_checkpoint, compile_model=compile_model, **GPU_ENGINE)
    want = {n: gpu_generate(one, n) for n in GPU_BATCH_SIZES}
    del one
    torch.cuda.empty_cache()
    llm = LLM(gpu_checkpoint, tensor_parallel_size=2, compile_model=compile_model, async_scheduling=async_scheduling,
              **GPU_ENGINE)
    pids = llm.llm_engine.runner.workers.pids
    try:
        runner = llm.llm_engine.runner
        assert sorted(runner.graph_runner.graphs) == GPU_ENGINE["cuda_graph_sizes"]
        for n in GPU_BATCH_SIZES:
            assert gpu_generate(llm, n) == want[n], f"batch of {n}"
        assert runner.recompiles_since_warmup() == 0
    finally:
        start = time.monotonic()
        llm.llm_engine.shutdown()  # NCCL teardown after graphs that captured its collectives
        stop_s = time.monotonic() - start
    assert stop_s < 30
    assert_gone(pids)
    assert not dist.is_initialized()


def _custom_all_reduce_rank(rank: int, port: int) -> None:
    """One of two ranks of test_gpu_the_custom_all_reduce_sums_as_nccl_does (any failure raises)."""
    from engine import communication

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    try:
        hidden = 1024
        assert communication.init_custom_all_reduce(torch.device("cuda"), torch.bfloat16, 4096, hidden)
        assert communication.custom_all_reduce_on()
        custom = communication._custom
        limit_rows = custom.buffer.numel() // hidden
        gen = torch.Generator("cuda").manual_seed(rank)
        for rows in (1, 2, 7, 256, limit_rows, limit_rows + 1):  # the last one is NCCL's, inside the same op
            x = torch.randn(rows, hidden, generator=gen, device="cuda").to(torch.bfloat16)
            want = x.clone()
            dist.all_reduce(want)
            got = torch.ops.engine.custom_all_reduce(x)
            assert custom.fits(x) == (rows <= limit_rows)
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{rows} rows")
            if custom.fits(x):
                out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
                custom(x, out=out)
                torch.testing.assert_close(out, want, rtol=0, atol=0, msg=f"{rows} rows into a poisoned output")
        # Inside a CUDA graph, replayed on new inputs, 8 all-reduces in a row through one buffer.
        static_x = torch.zeros(3, hidden, dtype=torch.bfloat16, device="cuda")
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = static_x
            for _ in range(8):
                y = torch.ops.engine.custom_all_reduce(y) * 0.5
        for trial in range(3):
            static_x.copy_(torch.randn(3, hidden, generator=gen, device="cuda"))
            want = static_x.clone()
            for _ in range(8):
                dist.all_reduce(want)
                want = want * 0.5
            graph.replay()
            torch.testing.assert_close(y, want, rtol=0, atol=0, msg=f"graph replay {trial}")
        # float16: not the kernel's, so NCCL's
        h = torch.randn(5, hidden, generator=gen, device="cuda").half()
        want = h.clone()
        dist.all_reduce(want)
        torch.testing.assert_close(torch.ops.engine.custom_all_reduce(h), want, rtol=0, atol=0)
        torch.cuda.synchronize()
    finally:
        communication.shutdown_custom_all_reduce()
        dist.destroy_process_group()


def _reference_add_norm(x: torch.Tensor, residual, weight: torch.Tensor, eps: float):
    """The fused op's meaning, from every rank's x gathered: summed in float32 in rank order and
    rounded once, plus the residual, then the model's RMSNorm."""
    from engine import communication

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    h = torch.stack([p.float() for p in parts]).sum(0).to(x.dtype)
    h = h if residual is None else h + residual
    return communication.rms_norm(h, weight, eps), h


def _trace(message: str) -> None:
    """Where a GPU test that may hang has got to (ENGINE_TEST_TRACE=1, with pytest -s)."""
    if os.environ.get("ENGINE_TEST_TRACE") == "1":
        print(message, flush=True)


def _check_fused_all_reduce_add_rms_norm(custom, hidden: int, gen: torch.Generator) -> None:
    """ops.triton_allreduce through engine::all_reduce_add_rms_norm, on one of two ranks."""
    eps = 1e-5
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device="cuda")).to(torch.bfloat16)
    dist.broadcast(weight, 0)
    limit_rows = custom.region // hidden
    rank = dist.get_rank()
    for rows in (1, 2, 7, 64, 65, 200, limit_rows, limit_rows + 1):  # 64 programs; the last one: NCCL inside
        for with_residual, late in ((True, False), (False, False), (True, True)):
            x = torch.randn(rows, hidden, generator=gen, device="cuda").to(torch.bfloat16)
            residual = None
            if with_residual:  # the residual stream: the same on every rank
                residual = torch.randn(rows, hidden, generator=gen, device="cuda").to(torch.bfloat16)
                dist.broadcast(residual, 0)
            want_out, want_h = _reference_add_norm(x, residual, weight, eps)
            torch.cuda.synchronize()
            dist.barrier()
            if late:  # rank 1's GPU gets there ~20 ms after rank 0's: rank 0 must wait for its values
                torch.cuda._sleep(40_000_000 if rank == 1 else 1)
            _trace(f"rank {rank}: {custom.protocol} {rows} rows, residual {with_residual}, late {late}")
            out, h = torch.ops.engine.all_reduce_add_rms_norm(x, residual, weight, eps)
            torch.cuda.synchronize()
            msg = f"{custom.protocol}: {rows} rows, residual {with_residual}{', rank 1 late' if late else ''}"
            assert custom.lamport_status[0] == 0, f"{msg}: gave up waiting, [count, row, slot, peer, missing] " \
                f"{custom.lamport_status[:5].tolist()}"
            assert custom.fused_fits(x, residual, weight) == (rows <= limit_rows), msg
            torch.testing.assert_close(h, want_h, rtol=0, atol=0, msg=msg)
            torch.testing.assert_close(out, want_out, msg=msg)  # bf16 tolerances: the rsqrt's last bit may differ
            others = [torch.empty_like(out) for _ in range(2)]
            dist.all_gather(others, out)
            torch.testing.assert_close(others[0], others[1], rtol=0, atol=0, msg=f"{msg}: ranks disagree")
            if custom.fused_fits(x, residual, weight):
                out, h = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))  # every element written
                custom.all_reduce_add_rms_norm(x, residual, weight, eps, out, h)
                torch.testing.assert_close(h, want_h, rtol=0, atol=0, msg=f"{msg}, poisoned")
                torch.testing.assert_close(out, want_out, msg=f"{msg}, poisoned")
    # A decode graph's pattern, replayed on fresh inputs: 9 fused calls in a row with the plain custom
    # all-reduce (PyTorch's kernel: the barrier-based kernel's signal pad) and elementwise work between
    # (an odd number: each replay of the barrier-based kernel starts on the other half of its buffer).
    static_x = torch.zeros(3, hidden, dtype=torch.bfloat16, device="cuda")
    static_r = torch.zeros(3, hidden, dtype=torch.bfloat16, device="cuda")

    def chain(x, residual, fused: bool):
        for i in range(9):
            if fused:
                x, residual = torch.ops.engine.all_reduce_add_rms_norm(x * 0.5, residual, weight, eps)
            else:
                x, residual = _reference_add_norm(x * 0.5, residual, weight, eps)
            if i % 3 == 0:
                if fused:
                    x = torch.ops.engine.custom_all_reduce(x) * 0.5
                else:
                    x = x.clone()
                    dist.all_reduce(x)
                    x = x * 0.5
        return x, residual

    torch.cuda.synchronize()
    _trace(f"rank {dist.get_rank()}: {custom.protocol} graph")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, res = chain(static_x, static_r, fused=True)
    for trial in range(3):
        static_x.copy_(torch.randn(3, hidden, generator=gen, device="cuda"))
        r = torch.randn(3, hidden, generator=gen, device="cuda").to(torch.bfloat16)
        dist.broadcast(r, 0)
        static_r.copy_(r)
        want_y, want_res = chain(static_x.clone(), static_r.clone(), fused=False)
        graph.replay()
        # Nine norms in a row carry the rsqrt's last-bit differences along: looser than one call's.
        torch.testing.assert_close(res, want_res, rtol=0.05, atol=0.05, msg=f"{custom.protocol}: graph replay {trial}")
        torch.testing.assert_close(y, want_y, rtol=0.05, atol=0.05, msg=f"{custom.protocol}: graph replay {trial}")


@pytest.mark.gpu
@needs_two_gpus
def test_gpu_the_custom_all_reduce_sums_as_nccl_does():
    """Bit for bit (two ranks: one addition, rounded once) at sizes up to the buffer and past it, into
    a poisoned output, and in a CUDA graph replayed on fresh inputs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_custom_all_reduce_rank, args=(port,), nprocs=2, join=True)


def _fused_all_reduce_rank(rank: int, port: int, protocols: list[str]) -> None:
    """One of two ranks of test_gpu_fused_all_reduce_add_rms_norm_matches_its_reference."""
    from engine import communication

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    try:
        hidden = 1024
        assert communication.init_custom_all_reduce(torch.device("cuda"), torch.bfloat16, 4096, hidden)
        custom = communication._custom
        custom.spin_limit = 1 << 22  # the Lamport kernel gives up after seconds and says where (not a hang)
        gen = torch.Generator("cuda").manual_seed(rank)
        for protocol in protocols:  # each kernel keeps its own counters: one after the other, and back
            custom.protocol = protocol
            _check_fused_all_reduce_add_rms_norm(custom, hidden, gen)
        torch.cuda.synchronize()
    finally:
        communication.shutdown_custom_all_reduce()
        dist.destroy_process_group()


@pytest.mark.gpu
@needs_two_gpus
def test_gpu_fused_all_reduce_add_rms_norm_matches_its_reference():
    """The experimental kernel that fuses the all-reduce with the residual add and RMSNorm
    (ENGINE_FUSED_ALLREDUCE; both variants, or the one that variable names): sums bit for bit, the
    norm to bf16 tolerances, the same bits on both ranks, into poisoned outputs, with one rank late,
    and replayed in a CUDA graph between PyTorch's all-reduces (which share the barrier-based
    kernel's signal pad). A hang fails the test after 120 s instead of holding the run."""
    protocols = [os.environ["ENGINE_FUSED_ALLREDUCE"]] if os.environ.get("ENGINE_FUSED_ALLREDUCE", "0") != "0" \
        else ["lamport", "flags", "lamport"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = torch.multiprocessing.start_processes(_fused_all_reduce_rank, args=(port, protocols), nprocs=2,
                                                    join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{protocols}: still running after 120 s (a kernel waiting for values that never came?)")


@pytest.mark.gpu
@needs_two_gpus
def test_gpu_a_worker_exception_in_a_step_fails_it_without_a_hang(gpu_checkpoint, monkeypatch):
    """On NCCL rank 0 would wait forever on the dead worker's collectives: its monitor aborts the
    group; at the custom all-reduce's barriers (no abort ends those) rank 0 stands in for the dead
    worker. The step fails with the worker's error in time and no worker is left. Rank 0's GPU is
    not checked to drain: on two H100s and two H200s (perf/RESULTS.md, session 17 call A, session
    18 call 4) it was still busy 60 s later, NCCL's abort not returning, even with the LM head's
    gather moved off NCCL; the next step's input broadcast (NCCL, queued ahead by async scheduling)
    is the suspect. The process cannot run tensor parallelism again in any case: the server exits
    when its engine dies (tests above). (Last in the file: if the NCCL watchdog took the process
    down instead, nothing after it would run.)"""
    monkeypatch.setattr(tensor_parallel, "run_worker", _worker_failing_on_its_third_step)
    llm = LLM(gpu_checkpoint, tensor_parallel_size=2, **GPU_ENGINE)
    pids = llm.llm_engine.runner.workers.pids
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"worker rank 1 failed: RuntimeError: injected failure in execute_model"):
        gpu_generate(llm, 3)
    assert time.monotonic() - start < 60
    assert_gone(pids)
    llm.llm_engine.shutdown()
