"""Async scheduling (step N+1 built and launched before step N's tokens are read back; with
ENGINE_ASYNC_DEPTH=2 step N+2 too) must give exactly what synchronous steps give."""

from __future__ import annotations

import random

import pytest

from engine import LLM, EngineArgs, LLMEngine, SamplingParams

ENGINE = dict(block_size=4, max_model_len=256, seed=0)


@pytest.fixture(params=["1", "2"], ids=["depth1", "depth2"], autouse=True)
def depth(request, monkeypatch):
    """Every test here with one launched step in flight (ENGINE_ASYNC_DEPTH=1) and with two (the default)."""
    monkeypatch.setenv("ENGINE_ASYNC_DEPTH", request.param)
    return int(request.param)


def random_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 900) for _ in range(n)]


def outputs_of(checkpoint: str, prompts, params, **kwargs):
    llm = LLM(checkpoint, **{**ENGINE, **kwargs})
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.get_stats().num_used_blocks == 0  # every block back in the pool
    assert all(seq.num_pending_tokens == 0 for seq in llm.llm_engine.scheduler.running)
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"max_num_batched_tokens": 16},  # chunked prefill
        {"num_gpu_blocks_override": 24},  # preemption
        {"enable_prefix_caching": True},
    ],
    ids=["plain", "chunked", "preemption", "prefix-caching"],
)
def test_async_steps_give_the_tokens_of_sync_steps(llama_checkpoint, kwargs):
    system = random_ids(13, seed=1)
    prompts = [{"prompt_token_ids": system + random_ids(n, seed=n)} for n in (1, 9, 30, 4, 17)]
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=16),  # may stop at EOS
        SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=10, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
    ]
    want = outputs_of(llama_checkpoint, prompts, params, **kwargs)
    got = outputs_of(llama_checkpoint, prompts, params, async_scheduling=True, **kwargs)
    assert got == want


def test_stops_found_one_step_late_still_cut_the_output_in_the_same_place(llama_checkpoint):
    prompt = {"prompt_token_ids": random_ids(11, seed=5)}
    free = outputs_of(llama_checkpoint, [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0][0]
    tokens, text = free[0], free[1]
    for params in (
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[tokens[7]]),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[text[len(text) // 2 : len(text) // 2 + 2]]),
    ):
        want = outputs_of(llama_checkpoint, [prompt], params)
        assert outputs_of(llama_checkpoint, [prompt], params, async_scheduling=True) == want
        assert want[0][0][2] == "stop"


def test_requests_reading_their_token_history_run_in_sync_steps_and_match(llama_checkpoint):
    prompts = [{"prompt_token_ids": random_ids(n, seed=n)} for n in (6, 19)]
    params = [
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.4, min_tokens=3),
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=1),
    ]
    want = outputs_of(llama_checkpoint, prompts, params)
    assert outputs_of(llama_checkpoint, prompts, params, async_scheduling=True) == want


def test_abort_with_a_step_in_flight_frees_everything(llama_checkpoint, depth):
    engine = LLMEngine(EngineArgs(model=llama_checkpoint, async_scheduling=True, **ENGINE))
    total = engine.block_manager.num_free_blocks
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    engine.add_request("a", random_ids(10, seed=1), params)
    engine.add_request("b", random_ids(20, seed=2), params)
    for _ in range(4):
        engine.step()
    assert len(engine._in_flight) == depth  # the steps launched and not yet read back
    engine.abort_request("a")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out
    assert set(finished) == {"b"} and len(finished["b"].outputs[0].token_ids) == 50
    engine.step()  # collects nothing more
    assert not engine._in_flight
    assert engine.block_manager.num_free_blocks == total


def test_steps_go_back_to_async_once_no_request_reads_its_token_history(llama_checkpoint):
    """A penalized request makes steps synchronous while it runs; once it has finished (or is aborted) a plain
    request's steps run ahead again."""
    engine = LLMEngine(EngineArgs(model=llama_checkpoint, async_scheduling=True, **ENGINE))
    plain = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("plain", random_ids(8, seed=1), plain)
    engine.add_request("short", random_ids(9, seed=2), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                                                      repetition_penalty=1.3))
    engine.add_request("aborted", random_ids(7, seed=3), SamplingParams(temperature=0, max_tokens=40, min_tokens=2))
    assert engine._needs_sync()
    for _ in range(6):
        engine.step()
        assert not engine._in_flight  # synchronous steps: nothing left in flight
    assert "short" not in engine.requests and engine._needs_sync()  # "aborted" still reads its history
    engine.abort_request("aborted")
    assert not engine._needs_sync()
    engine.step()
    assert engine._in_flight  # async again
    while engine.has_unfinished_requests():
        engine.step()
    assert not engine._needs_sync() and engine._history_readers == 0


def test_async_depth_reads_its_variable_and_keeps_tensor_parallel_ranks_at_one(monkeypatch):
    from engine.llm_engine import async_depth

    monkeypatch.setenv("ENGINE_ASYNC_DEPTH", "2")
    assert (async_depth(1), async_depth(2)) == (2, 1)
    monkeypatch.setenv("ENGINE_ASYNC_DEPTH", "3")
    with pytest.raises(ValueError, match="1 or 2"):
        async_depth(1)
    monkeypatch.delenv("ENGINE_ASYNC_DEPTH")
    assert (async_depth(1), async_depth(2)) == (2, 1)  # the default: two in flight on one GPU
