"""Memory sharing: automatic prefix caching, shared prompt blocks for n > 1, and KV accounting."""

from __future__ import annotations

import random

import pytest

from engine import LLM, EngineArgs, LLMEngine, SamplingParams
from engine.block_manager import BlockManager
from engine.sequence import Request, Sequence

BLOCK = 4
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def random_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 900) for _ in range(n)]


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> tuple[dict, int]:
    """Add the prompts one after another (each finishes before the next starts, so the cache is
    warm for the later ones); returns the outputs by request id and the peak blocks in use."""
    outputs, peak = {}, 0
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
            peak = max(peak, engine.get_stats().num_used_blocks)
    return outputs, peak


@pytest.fixture(scope="module")
def shared_prefix_prompts() -> list[list[int]]:
    system = random_ids(37, seed=1)  # 9 full blocks of 4 and one partial
    return [system + random_ids(n, seed=10 + n) for n in (3, 8, 1, 5)]


def engine_for(checkpoint: str, caching: bool, **kwargs) -> LLMEngine:
    return LLMEngine(EngineArgs(model=checkpoint, block_size=BLOCK, max_model_len=256, enable_prefix_caching=caching, **kwargs))


def test_shared_prefix_gives_the_same_tokens_and_reports_the_hit(llama_checkpoint, shared_prefix_prompts):
    cold, _ = run(engine_for(llama_checkpoint, caching=False), shared_prefix_prompts)
    engine = engine_for(llama_checkpoint, caching=True)
    warm, _ = run(engine, shared_prefix_prompts)
    for rid in cold:
        assert warm[rid].outputs[0].token_ids == cold[rid].outputs[0].token_ids
        assert cold[rid].num_cached_tokens == 0
    assert warm["0"].num_cached_tokens == 0
    # Later requests reuse the system prompt's 9 full blocks.
    for rid in ("1", "2", "3"):
        assert warm[rid].num_cached_tokens == 36
    stats = engine.get_stats()
    assert stats.prefix_cache_hits_total == 3 * 36
    assert stats.prefix_cache_queries_total == sum(len(p) for p in shared_prefix_prompts)
    assert stats.num_used_blocks == 0  # nothing leaked; cached blocks are free but reusable
    assert stats.num_cached_free_blocks > 0


def test_a_request_sees_its_own_earlier_output_as_a_cached_prefix(llama_checkpoint):
    engine = engine_for(llama_checkpoint, caching=True)
    prompt = random_ids(20, seed=3)
    first, _ = run(engine, [prompt])
    follow_up = prompt + first["0"].outputs[0].token_ids + random_ids(6, seed=4)
    engine.add_request("again", follow_up, GREEDY)
    while engine.has_unfinished_requests():
        outs = engine.step()
    # Prompt + generated tokens were cached in full blocks while the first request ran.
    assert outs[-1].num_cached_tokens == (20 + 12 - 1) // BLOCK * BLOCK


def test_eviction_under_a_tiny_pool_keeps_outputs_right(llama_checkpoint):
    # 40 blocks: each request needs up to 13, so cached prefixes are evicted again and again.
    prompts = [random_ids(30 + i, seed=i % 3) + random_ids(4, seed=100 + i) for i in range(8)]
    cold, _ = run(engine_for(llama_checkpoint, caching=False, num_gpu_blocks_override=40), prompts)
    engine = engine_for(llama_checkpoint, caching=True, num_gpu_blocks_override=40)
    warm, _ = run(engine, prompts)
    assert {r: o.outputs[0].token_ids for r, o in warm.items()} == {r: o.outputs[0].token_ids for r, o in cold.items()}
    stats = engine.get_stats()
    assert stats.prefix_cache_hits_total > 0
    assert stats.num_used_blocks == 0


def test_concurrent_requests_under_pressure_with_caching_match_caching_off(llama_checkpoint, shared_prefix_prompts):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in shared_prefix_prompts * 2]
    cold = LLM(llama_checkpoint, block_size=BLOCK, max_model_len=256, num_gpu_blocks_override=48).generate(inputs, params, use_tqdm=False)
    llm = LLM(llama_checkpoint, block_size=BLOCK, max_model_len=256, num_gpu_blocks_override=48, enable_prefix_caching=True)
    warm = llm.generate(inputs, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in warm] == [o.outputs[0].token_ids for o in cold]
    assert llm.llm_engine.get_stats().num_used_blocks == 0


def test_n_completions_share_the_prompt_blocks(llama_checkpoint):
    prompt = random_ids(41, seed=7)
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    single = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    shared_engine = engine_for(llama_checkpoint, caching=False)
    shared_engine.add_request("n4", prompt, params)
    shared_peak, outs = 0, []
    while shared_engine.has_unfinished_requests():
        outs += shared_engine.step()
        shared_peak = max(shared_peak, shared_engine.get_stats().num_used_blocks)
    separate_engine = engine_for(llama_checkpoint, caching=False)
    for i in range(4):
        separate_engine.add_request(f"s{i}", prompt, single)
    separate_peak = 0
    while separate_engine.has_unfinished_requests():
        separate_engine.step()
        separate_peak = max(separate_peak, separate_engine.get_stats().num_used_blocks)
    # 41 prompt + 7 generated tokens have K/V (the last token never needs it): 12 blocks each when
    # separate; shared, the 10 full prompt blocks once plus each sequence's own 2 tail blocks.
    assert separate_peak == 4 * 12
    assert shared_peak == 10 + 4 * 2
    final = outs[-1]
    assert final.finished and len(final.outputs) == 4
    assert all(len(c.token_ids) == 8 for c in final.outputs)
    assert shared_engine.get_stats().num_used_blocks == 0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_n_completions_fork_after_one_prompt_pass_and_copy_the_partial_block_on_write(llama_checkpoint, async_scheduling):
    """The prompt is computed once, by the first sequence; its siblings fork in the step that ends
    it, sample from its logits row, and copy the shared partial last block before writing to it.
    A wrong copy would show in greedy tokens: each completion must equal a lone request's."""
    prompt = random_ids(43, seed=11)  # 10 full blocks of 4 and a partial one of 3 tokens
    greedy = SamplingParams(n=3, temperature=0, max_tokens=9, ignore_eos=True)
    engine = engine_for(llama_checkpoint, caching=False, async_scheduling=async_scheduling)
    engine.add_request("n3", prompt, greedy)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    alone = engine_for(llama_checkpoint, caching=False)
    alone.add_request("one", prompt, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    want = []  # an async step may return nothing (its tokens come with the next)
    while alone.has_unfinished_requests():
        want = alone.step() or want
    completions = outs[-1].outputs
    assert [c.token_ids for c in completions] == [want[0].outputs[0].token_ids] * 3
    assert engine.prompt_tokens_total == len(prompt)  # not once per sequence, not even the tail
    assert engine.block_manager.copy_on_writes_total == 2  # the last holder writes in place
    assert engine.get_stats().num_used_blocks == 0

    # Sampled forks draw their own tokens from the shared row.
    engine.add_request("sampled", prompt, SamplingParams(n=4, temperature=1.0, seed=2, max_tokens=6, ignore_eos=True))
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len({tuple(c.token_ids) for c in outs[-1].outputs}) > 1
    assert engine.get_stats().num_used_blocks == 0


def test_block_manager_copies_a_shared_block_only_before_writing_it():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    request = Request("r", "", list(range(6)), SamplingParams(n=2), arrival_time=0.0)
    parent, child = Sequence(request, 0, None), Sequence(request, 1, None)
    bm.admit(parent, [], 6, count_query=False)  # blocks for tokens 0..5: one full, one partial
    parent.num_computed_tokens = 6
    bm.fork(parent, child, 6)
    assert child.block_table == parent.block_table and bm.num_free_blocks == 6
    assert not bm._needs_copy(child, 0)
    assert bm.can_grow(child, 1)
    bm.grow(child, 1)  # writes position 6, in the shared partial block
    assert bm.take_block_copies() == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0] and child.block_table[1] != parent.block_table[1]
    bm.grow(parent, 1)  # now the only holder: in place
    assert bm.take_block_copies() == [] and bm.copy_on_writes_total == 1
    bm.free(child)
    bm.free(parent)
    assert bm.num_free_blocks == 8


def test_block_manager_try_grow_grows_copies_or_refuses_as_can_grow_and_grow():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    request = Request("r", "", list(range(6)), SamplingParams(n=2), arrival_time=0.0)
    parent, child = Sequence(request, 0, None), Sequence(request, 1, None)
    bm.admit(parent, [], 6, count_query=False)
    parent.num_computed_tokens = 6
    bm.fork(parent, child, 6)
    # Within the table, but the written block is shared: the child gets a copy.
    assert bm.try_grow(child, 1) and bm.take_block_copies() == [(parent.block_table[1], child.block_table[1])]
    child.num_computed_tokens = 7
    assert bm.num_free_blocks == 1
    # Within a block it holds alone: nothing taken.
    assert bm.try_grow(child, 1) and bm.num_free_blocks == 1 and len(child.block_table) == 2
    child.num_computed_tokens = 8
    # Past the table: a new block (the last free one).
    assert bm.try_grow(child, 1) and bm.num_free_blocks == 0 and len(child.block_table) == 3
    assert bm.take_block_copies() == []
    # The parent now holds its partial block alone again: written in place.
    assert bm.try_grow(parent, 2) and bm.num_free_blocks == 0 and bm.take_block_copies() == []
    parent.num_computed_tokens = 8
    # Past the table with no free block: refused, nothing changed.
    table = list(parent.block_table)
    assert not bm.can_grow(parent, 1) and not bm.try_grow(parent, 1) and parent.block_table == table


def test_kv_waste_stays_small_on_long_sequences(llama_checkpoint):
    """Paged allocation reserves at most one partly filled block per sequence: on nano-like prompt
    lengths (100-1024 tokens) the reserved-but-empty slots stay far under the paper's 4%."""
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": random_ids(rng.randint(100, 1024), seed=i)} for i in range(6)]
    llm = LLM(llama_checkpoint, block_size=16, max_model_len=2048)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    stats = llm.llm_engine.get_stats()
    assert 0 < stats.kv_waste_fraction_mean < 0.04


def test_prefix_hits_are_verified_by_tokens_not_just_the_hash():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    params = SamplingParams(max_tokens=1)

    def seq(tokens):
        return Sequence(Request("r", None, tokens, params), 0, None)

    first = seq([1, 2, 3, 4, 5])
    bm.admit(first, [], 5, count_query=True)
    first.num_computed_tokens = 5
    bm.commit_full_blocks(first)
    assert bm.find_cached_prefix(seq([1, 2, 3, 4, 9])) == first.block_table[:2]
    # Corrupt the cache so the first block's hash maps to a block holding other tokens.
    block_hash = bm.blocks[first.block_table[0]].block_hash
    bm.blocks[first.block_table[0]].token_ids = (7, 7)
    assert bm.find_cached_prefix(seq([1, 2, 3, 4, 9])) == []
    assert bm.cached[block_hash] == first.block_table[0]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_forks_prefix_hits_and_preemption_together_keep_every_output_and_block(llama_checkpoint, async_scheduling):
    """n > 1 forks, shared prefixes and a pool small enough to preempt, all at once: every greedy
    completion equals what its prompt gives alone, and every block comes back."""
    system = random_ids(9, seed=21)
    prompts = [system + random_ids(n, seed=n) for n in (2, 7, 14, 3, 11)]
    params = [SamplingParams(n=1 + i % 3, temperature=0, max_tokens=10 + 3 * i, ignore_eos=True) for i in range(5)]
    alone = {}
    reference = engine_for(llama_checkpoint, caching=False)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        reference.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=p.max_tokens, ignore_eos=True))
    while reference.has_unfinished_requests():
        for out in reference.step():
            alone[out.request_id] = out.outputs[0].token_ids
    engine = engine_for(llama_checkpoint, caching=True, num_gpu_blocks_override=26, async_scheduling=async_scheduling)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert engine.scheduler.num_preemptions_total > 0 and engine.block_manager.copy_on_writes_total > 0
    bm = engine.block_manager  # the kept count of cached free blocks, against counting them
    assert bm.num_cached_free_blocks == sum(1 for b in bm.free_blocks if bm.blocks[b].block_hash is not None) > 0
    for rid, out in finals.items():
        assert [c.token_ids for c in out.outputs] == [alone[rid]] * params[int(rid)].n
    assert engine.get_stats().num_used_blocks == 0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_kept_block_table_rows_equal_the_sequences_tables_at_every_step(llama_checkpoint, async_scheduling):
    """The model runner keeps block tables from step to step (BlockTableRows) and copies in only what
    changed: through admissions, prefix hits, forks, copy-on-write, preemption, finishing and rows
    given back for reuse, every step's tables are the sequences' own, zero-padded."""
    system = random_ids(9, seed=21)
    prompts = [system + random_ids(n, seed=n) for n in (2, 7, 14, 3, 11, 5)]
    engine = engine_for(llama_checkpoint, caching=True, num_gpu_blocks_override=20, max_num_seqs=4,
                        async_scheduling=async_scheduling)
    runner = engine.runner
    prepare, checked, seen = runner._prepare, [], set()

    def checking_prepare(scheduled):
        batch = prepare(scheduled)
        tables = [s.seq.block_table for s in scheduled if s.sample_from is None]
        width = max(map(len, tables))
        assert batch.metadata.block_tables.tolist() == [t + [0] * (width - len(t)) for t in tables]
        checked.append(len(tables))
        seen.update(s.seq.seq_id for s in scheduled)
        return batch

    runner._prepare = checking_prepare
    for i, prompt in enumerate(prompts):  # one at a time, so that forks find seats (and copy on write)
        engine.add_request(str(i), prompt, SamplingParams(n=3 - i % 3, temperature=1.0, seed=i, max_tokens=12 + 3 * i, ignore_eos=True))
        engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.num_preemptions_total > 0 and engine.block_manager.copy_on_writes_total > 0
    assert len(seen) > len(runner.block_table_rows.length)  # more sequences than rows: rows were reused
    assert runner.block_table_rows.array.shape[1] > 8  # widened
    assert len(checked) > 20
