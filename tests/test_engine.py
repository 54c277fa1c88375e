"""The engine core against transformers, the oracle: same checkpoint, same greedy tokens."""

from __future__ import annotations

import dataclasses
import functools
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from engine import LLM, EngineArgs, LLMEngine, SamplingParams
from engine.demo_model import build_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("llama")), "LlamaForCausalLM", seed=1)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    # Block size 4 so that even short prompts span many KV blocks.
    return LLM(checkpoint, block_size=4, max_model_len=512, seed=0)


def hf_generate(hf_model, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """transformers' own generate, EOS ignored (the engine's requests here set ignore_eos)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    config.eos_token_id = -1  # no token has this id: generation runs to max_new_tokens
    out = hf_model.generate(torch.tensor([prompt_ids]), generation_config=config)
    return out[0, len(prompt_ids) :].tolist()


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    return hf_generate(hf_model, prompt_ids, max_new_tokens)


def random_prompts(lengths: list[int], vocab: int = 900, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in lengths]


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def test_greedy_batch_of_mixed_lengths_matches_transformers_alone(llm, hf_model):
    prompts = random_prompts([1, 3, 17, 40, 130])
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.prompt_token_ids == prompt
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 24)
        assert output.outputs[0].finish_reason == "length"


def test_text_prompts_and_first_step_logprobs_match_transformers(llm, hf_model):
    text = "The quick brown fox jumps over the lazy dog. Once upon a time"
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    (output,) = llm.generate(text, params, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode(text)
    assert output.prompt_token_ids == ids
    completion = output.outputs[0]
    full = torch.tensor([ids + completion.token_ids])
    with torch.no_grad():
        hf_logprobs = torch.log_softmax(hf_model(full).logits[0].float(), dim=-1)
    # Generated tokens: logprob of the chosen token and the top-3 alternatives.
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = hf_logprobs[len(ids) - 1 + step]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == 1  # greedy
        top = row.topk(3)
        assert set(entry) == set(top.indices.tolist())
        for tid, val in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[tid].logprob == pytest.approx(val, abs=1e-4)
            assert entry[tid].decoded_token == tokenizer.decode([tid])
    assert completion.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs)), abs=1e-4)
    # Prompt logprobs: None for the first token, then each prompt token's logprob given the ones before.
    assert output.prompt_logprobs[0] is None
    assert len(output.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry = output.prompt_logprobs[pos]
        assert entry[ids[pos]].logprob == pytest.approx(hf_logprobs[pos - 1, ids[pos]].item(), abs=1e-4)
        assert len(set(entry) - {ids[pos]}) <= 2


def test_requests_joining_mid_generation_give_the_tokens_they_give_alone(checkpoint, hf_model):
    engine = LLMEngine(EngineArgs(model=checkpoint, block_size=4, max_model_len=256))
    prompts = random_prompts([9, 23, 5], seed=3)
    finished = {}
    engine.add_request("a", prompts[0], GREEDY)
    for step in range(40):
        if step == 3:
            engine.add_request("b", prompts[1], GREEDY)
        if step == 7:
            engine.add_request("c", prompts[2], GREEDY)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    for rid, prompt in zip("abc", prompts):
        assert finished[rid] == hf_greedy(hf_model, prompt, 24)


def test_preemption_under_a_tiny_cache_keeps_outputs_and_returns_every_block(checkpoint, hf_model):
    # 16 blocks of 4 tokens; each request needs up to 9 blocks, so four at once cannot fit.
    llm = LLM(checkpoint, block_size=4, max_model_len=128, num_gpu_blocks_override=16)
    prompts = random_prompts([12, 10, 11, 9], seed=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions_total > 0
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 24)
    assert stats.num_used_blocks == 0
    assert llm.llm_engine.block_manager.num_free_blocks == 16


def test_chunked_prefill_gives_the_same_tokens_as_unchunked(checkpoint, hf_model):
    llm = LLM(checkpoint, block_size=4, max_model_len=256, max_num_batched_tokens=16)
    prompts = random_prompts([70, 33, 4], seed=7)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 24)


def test_abort_frees_blocks_and_the_engine_goes_on(checkpoint):
    engine = LLMEngine(EngineArgs(model=checkpoint, block_size=4, max_model_len=256))
    total = engine.block_manager.num_free_blocks
    engine.add_request("x", random_prompts([30])[0], GREEDY)
    engine.add_request("y", random_prompts([20])[0], GREEDY)
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < total
    engine.abort_request("x")
    engine.abort_request(["y", "unknown"])
    assert engine.block_manager.num_free_blocks == total
    assert not engine.has_unfinished_requests()
    engine.add_request("z", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3


def test_seeded_requests_reproduce_across_runs_and_batch_mixes(llm):
    prompt = {"prompt_token_ids": random_prompts([12], seed=11)[0]}
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids
    noisy = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    others = [{"prompt_token_ids": p} for p in random_prompts([5, 40, 8], seed=12)]
    mixed = llm.generate(others[:2] + [prompt] + others[2:], [noisy, noisy, seeded, noisy], use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    again = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True)
    assert llm.generate(prompt, other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_top_k_1_equals_greedy(llm):
    prompts = [{"prompt_token_ids": p} for p in random_prompts([6, 25], seed=13)]
    greedy = llm.generate(prompts, GREEDY, use_tqdm=False)
    top1 = llm.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in top1]


def test_stop_string_ends_the_output_and_is_cut_from_the_text(llm):
    prompt = "Hello, how are you today?"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]
    kept = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop, include_stop_str_in_output=True), use_tqdm=False
    )[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_stop_token_id_ends_the_output_with_that_token(llm):
    prompt = {"prompt_token_ids": random_prompts([10], seed=17)[0]}
    free = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = free[6]
    first = free.index(stop_id)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_eos_stops_unless_ignored_and_min_tokens_blocks_it(llm):
    engine = llm.llm_engine
    eos = min(engine.model_config.eos_token_ids)
    prompt = {"prompt_token_ids": random_prompts([8], seed=19)[0]}
    # Make EOS the greedy choice at every step by asking for it as the only allowed... instead use
    # min_tokens: EOS must not appear before min_tokens tokens, whatever the model prefers.
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, min_tokens=12), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 12 and eos not in out.token_ids[:12]


def test_n_completions_share_one_request(llm, hf_model):
    prompt = random_prompts([21], seed=23)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    expected = hf_greedy(hf_model, prompt, 10)
    assert all(c.token_ids == expected for c in out.outputs)
    sampled = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    again = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in sampled.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in sampled.outputs}) > 1


def test_incremental_text_equals_decoding_all_tokens_at_once(llm):
    tokenizer = llm.get_tokenizer()
    prompts = ["日本語のテキスト", "café 🙂 🚀", "Привет, мир!"]
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True), use_tqdm=False)
    for out in outs:
        completion = out.outputs[0]
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("clean_up_spaces", [False, True])  # the Rust decoder directly / tokenizer.decode
def test_incremental_detokenizer_one_token_at_a_time_gives_the_whole_decode(checkpoint, clean_up_spaces):
    from transformers import AutoTokenizer

    from engine.detokenizer import IncrementalDetokenizer
    from engine.sequence import Request, Sequence

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, clean_up_tokenization_spaces=clean_up_spaces)
    detokenizer = IncrementalDetokenizer(tokenizer)
    prompt = tokenizer.encode("The quick fox")
    output = tokenizer.encode("日本語 café 🙂🚀 Привет , мир !", add_special_tokens=False) + [tokenizer.eos_token_id]
    seq = Sequence(Request("r", None, prompt, SamplingParams(), arrival_time=0.0), 0, None)
    pieces = []
    for i, token in enumerate(output):
        seq.token_ids.append(token)
        pieces.append(detokenizer.step(seq, final=i == len(output) - 1))
    assert "".join(pieces) == seq.output_text == tokenizer.decode(output, skip_special_tokens=True)
    assert any(p == "" for p in pieces)  # a character that spans tokens waits for its last one
    assert detokenizer.decode_token(output[0]) == tokenizer.decode([output[0]])
    # Single tokens' texts are kept per skip_special_tokens: a special token's differ.
    eos = tokenizer.eos_token_id
    for _ in range(2):  # decoded, then kept
        assert detokenizer.decode_token(eos, skip_special_tokens=True) == "" != tokenizer.decode([eos])
        assert detokenizer.decode_token(eos) == tokenizer.decode([eos])


def test_delta_outputs_add_up_to_the_cumulative_ones_at_every_step(checkpoint, llm):
    # The same seeded requests in two engines, cumulative in one and deltas in the other: at every step
    # the deltas so far, joined, are the cumulative output (text held back for a stop string, logprobs,
    # prompt logprobs arriving chunk by chunk, n > 1), and a delta carries only the step's new token.
    from engine.sampling_params import RequestOutputKind

    prompt = {"prompt_token_ids": random_prompts([40], seed=29)[0]}
    free = llm.generate(prompt, SamplingParams(temperature=1.0, seed=8, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    params = [SamplingParams(temperature=1.0, seed=8, max_tokens=30, ignore_eos=True, stop=[stop, "zzzzz"], logprobs=2),
              SamplingParams(temperature=1.0, seed=9, n=2, max_tokens=12, ignore_eos=True, prompt_logprobs=1)]
    engines = {kind: LLMEngine(EngineArgs(model=checkpoint, block_size=4, max_model_len=256, max_num_batched_tokens=16))
               for kind in RequestOutputKind if kind is not RequestOutputKind.FINAL_ONLY}
    for kind, engine in engines.items():
        for i, p in enumerate(params):
            engine.add_request(str(i), prompt, dataclasses.replace(p, output_kind=kind))
    joined = [{"prompt_logprobs": []} for _ in params]
    finished = set()
    while engines[RequestOutputKind.CUMULATIVE].has_unfinished_requests():
        wholes, deltas = ([o for o in engine.step()] for engine in engines.values())
        assert [o.request_id for o in wholes] == [o.request_id for o in deltas]
        for whole, delta in zip(wholes, deltas):
            so_far = joined[int(delta.request_id)]
            so_far["prompt_logprobs"] += delta.prompt_logprobs or []
            assert so_far["prompt_logprobs"] == (whole.prompt_logprobs or [])
            for w, d in zip(whole.outputs, delta.outputs, strict=True):
                assert len(d.token_ids) <= 1
                text, tokens, logprobs = so_far.get(d.index, ("", [], []))
                so_far[d.index] = (text + d.text, tokens + d.token_ids, logprobs + (d.logprobs or []))
                assert so_far[d.index] == (w.text, w.token_ids, w.logprobs or [])
                assert (d.finish_reason, d.stop_reason, d.cumulative_logprob) == \
                    (w.finish_reason, w.stop_reason, w.cumulative_logprob)
            assert delta.finished == whole.finished
            if whole.finished:
                finished.add(whole.request_id)
    assert finished == {"0", "1"} and not engines[RequestOutputKind.DELTA].has_unfinished_requests()
    assert joined[0][0][0] == free[: free.index(stop)] and len(joined[1]["prompt_logprobs"]) == 40


def test_logit_bias_forces_and_bans_tokens(llm):
    prompt = {"prompt_token_ids": random_prompts([9], seed=31)[0]}
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    free = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    forced = dataclasses.replace(greedy, logit_bias={7: 100.0})
    assert llm.generate(prompt, forced, use_tqdm=False)[0].outputs[0].token_ids == [7] * 6
    banned = dataclasses.replace(greedy, logit_bias={t: -100.0 for t in free})
    assert not set(llm.generate(prompt, banned, use_tqdm=False)[0].outputs[0].token_ids) & set(free)
    # Only the row that asked is biased.
    both = llm.generate([prompt, prompt], [forced, greedy], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in both] == [[7] * 6, free]


def test_repetition_penalty_matches_transformers(llm, hf_model):
    prompt = random_prompts([15], seed=29)[0]
    ours = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=16, ignore_eos=True), use_tqdm=False)
    theirs = hf_generate(hf_model, prompt, 16, repetition_penalty=1.5)
    assert ours[0].outputs[0].token_ids == theirs


def test_chat_refuses_what_is_not_a_conversation(llm):
    with pytest.raises(ValueError, match="messages must be a non-empty list"):
        llm.chat({"role": "user", "content": "hi"}, use_tqdm=False)


def test_chat_applies_the_chat_template(llm):
    messages = [{"role": "user", "content": "Tell me about the weather."}]
    (out,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    expected = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert out.prompt_token_ids == list(expected)
    assert len(out.outputs[0].token_ids) <= 5


def test_chat_takes_vllms_template_options(llm):
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% if not thinking %}<no-think>{% endif %}{% endif %}")
    encode = lambda text: llm.get_tokenizer().encode(text, add_special_tokens=False)  # noqa: E731
    user = [{"role": "user", "content": "Paris"}]
    params = SamplingParams(temperature=0, max_tokens=1)
    (out,) = llm.chat(user, params, chat_template=template, chat_template_kwargs={"thinking": False}, use_tqdm=False)
    assert out.prompt_token_ids == encode("<user>Paris</s><assistant><no-think>")
    (out,) = llm.chat(user, params, chat_template=template, chat_template_kwargs={"thinking": True}, use_tqdm=False)
    assert out.prompt_token_ids == encode("<user>Paris</s><assistant>")
    opened = user + [{"role": "assistant", "content": "The answer is"}]
    (out,) = llm.chat(opened, params, chat_template=template, add_generation_prompt=False, continue_final_message=True,
                      use_tqdm=False)
    assert out.prompt_token_ids == encode("<user>Paris</s><assistant>The answer is")
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(opened, params, chat_template=template, continue_final_message=True, use_tqdm=False)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("x" * 3000, SamplingParams(max_tokens=1), "max_model_len"),
        ("hello", SamplingParams(max_tokens=600), "plus max_tokens (600)"),
        ([5, 99999], SamplingParams(), "outside the vocabulary"),
        ("", SamplingParams(), "empty"),
        ({"prompt_token_ids": []}, SamplingParams(), "empty"),
        ("hi", SamplingParams(logprobs=50), "max_logprobs"),
        ("hi", SamplingParams(logit_bias={10**6: 1.0}), "logit_bias token id 1000000 is outside the vocabulary"),
        ([1, 2, 3, 4] * 250_000, SamplingParams(), "the prompt is 1000000 tokens"),  # refused before any pass over it
    ],
)
def test_bad_requests_get_a_clear_error_and_the_engine_stays_usable(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        llm.generate(prompt, params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate("still fine", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"n": 0}, "n"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {5: 101.0}}, "logit_bias"),
        # Found by fuzzing: each of these used to pass and then fail the whole step, or run silently wrong.
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number"),
        ({"logprobs": True}, "logprobs must be an integer"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer"),
        ({"stop": [5]}, "stop must be a string or a list of strings"),
        ({"stop_token_ids": "ab"}, "stop_token_ids must be a list of token ids"),
        ({"temperature": "1"}, "temperature must be a finite number"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"logit_bias": {5: "1"}}, "logit_bias values must be numbers"),
        ({"logit_bias": {5: True}}, "logit_bias values must be numbers"),
        ({"logit_bias": [5]}, "logit_bias must be a dict"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_sampling_params_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_numpy_numbers_are_welcome_where_python_ones_are(llm):
    prompt = {"prompt_token_ids": np.array(random_prompts([7], seed=37)[0])}
    params = SamplingParams(temperature=np.float32(0), max_tokens=np.int64(4), stop_token_ids=[np.int64(3)], ignore_eos=True)
    assert type(params.max_tokens) is int and type(params.temperature) is float
    assert SamplingParams(logit_bias={np.int64(5): np.float32(2)}).logit_bias == {5: 2.0}
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    expected = llm.generate({"prompt_token_ids": prompt["prompt_token_ids"].tolist()},
                            SamplingParams(temperature=0, max_tokens=4, stop_token_ids=[3], ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == expected.outputs[0].token_ids


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be at least 1"),  # used to hang generate()
        ({"num_gpu_blocks_override": 0}, "num_gpu_blocks_override must be at least 1"),
        ({"max_logprobs": -1}, "max_logprobs must be non-negative"),
        ({"seed": 2**64}, "seed must be a 64-bit integer"),
        ({"device": "meta"}, "device must be one of"),
        ({"kv_cache_dtype": "int4"}, "kv_cache_dtype must be one of"),
        ({"mixed_cuda_graph_sizes": [1, 64]}, "at least 2 each"),
        ({"mixed_cuda_graph_sizes": [0, 64]}, "0 alone"),
        ({"kv_cache_dtype": "fp8", "attention_backend": "xformers"}, "needs attention_backend 'triton' or 'torch'"),
    ],
)
def test_engine_args_refuse_values_that_cannot_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(model="unused", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_fails_when_the_engine_is_built(checkpoint):
    args = EngineArgs(model=checkpoint, device="cuda")  # fine to describe (a Ray head deploys GPU replicas so)
    with pytest.raises(ValueError, match="no CUDA device is available here"):
        LLMEngine(args)


def test_prefill_graph_buckets_by_default_on_one_gpu_none_with_tp_or_when_zero():
    from engine.serve import build_parser
    assert EngineArgs(model="unused").resolve_mixed_cuda_graph_sizes() == [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    assert EngineArgs(model="unused", max_num_batched_tokens=32768).resolve_mixed_cuda_graph_sizes()[-1] == 8192
    assert EngineArgs(model="unused", max_num_batched_tokens=600).resolve_mixed_cuda_graph_sizes() == [16, 32, 64, 128, 256, 512]
    assert EngineArgs(model="unused", tensor_parallel_size=2).resolve_mixed_cuda_graph_sizes() == []
    assert EngineArgs(model="unused", mixed_cuda_graph_sizes=[64, 8]).resolve_mixed_cuda_graph_sizes() == [64, 8]
    flags = build_parser().parse_args(["--mixed-cuda-graph-sizes", "0"])
    assert EngineArgs(model="unused", mixed_cuda_graph_sizes=flags.mixed_cuda_graph_sizes).resolve_mixed_cuda_graph_sizes() == []


def test_the_server_engine_runs_in_its_own_process_by_default_only_with_a_gpu():
    assert EngineArgs(model="unused", device="cuda").resolve_engine_process() is True
    assert EngineArgs(model="unused", device="cpu").resolve_engine_process() is False
    assert EngineArgs(model="unused", device="auto").resolve_engine_process() is torch.cuda.is_available()
    assert EngineArgs(model="unused", device="cuda", engine_process=False).resolve_engine_process() is False
    assert EngineArgs(model="unused", device="cpu", engine_process=True).resolve_engine_process() is True


@pytest.mark.parametrize(
    "prompt, params",
    [
        ({"prompt_token_ids": [1.5, 2.0]}, SamplingParams(max_tokens=2)),  # used to fail inside step()
        ({"prompt_token_ids": None}, SamplingParams(max_tokens=2)),
        ("fine", {"max_tokens": 2}),  # params that are not SamplingParams
    ],
)
def test_a_bad_request_after_good_ones_leaves_nothing_queued(llm, prompt, params):
    # The first prompt is accepted before the second fails: generate() must take it back.
    with pytest.raises((ValueError, TypeError)):
        llm.generate(["fine", prompt], [SamplingParams(max_tokens=2), params], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.get_stats().num_used_blocks == 0
    assert llm.generate("still fine", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_a_bad_prompt_in_a_batch_leaves_nothing_queued(llm):
    with pytest.raises(ValueError):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.get_stats().num_used_blocks == 0


def fp8_kv_sdpa(module, query, key, value, *args, cache_dtype, **kwargs):
    """transformers' SDPA attention over keys and values rounded to an 8-bit float (saturated), as a
    kv_cache_dtype="fp8" (or "fp8_e5m2") cache holds them: the oracle for the fp8 cache."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ops.torch_ref import to_cache_dtype

    def rounded(t):
        return to_cache_dtype(t, cache_dtype).to(t.dtype)

    return sdpa_attention_forward(module, query, rounded(key), rounded(value), *args, **kwargs)


@pytest.mark.parametrize("kv_cache_dtype, torch_dtype", [("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_kv_cache_holds_four_times_the_tokens_and_matches_transformers_over_fp8_keys(checkpoint, kv_cache_dtype,
                                                                                           torch_dtype):
    from transformers import AttentionInterface

    name = f"{kv_cache_dtype}_kv_sdpa"
    AttentionInterface.register(name, functools.partial(fp8_kv_sdpa, cache_dtype=torch_dtype))
    hf_fp8 = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation=name).eval()
    budget = 1 << 22
    full = LLM(checkpoint, block_size=4, max_model_len=256, kv_cache_memory=budget)
    fp8 = LLM(checkpoint, block_size=4, max_model_len=256, kv_cache_memory=budget, kv_cache_dtype=kv_cache_dtype,
              enable_prefix_caching=True)
    runner = fp8.llm_engine.runner
    assert runner.kv_caches[0][0].dtype == torch_dtype
    assert runner.num_blocks == 4 * full.llm_engine.runner.num_blocks  # float32 model: 4 bytes a value -> 1
    prompts = random_prompts([1, 17, 130], seed=11)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1, n=2)
    # Twice: the second round reuses the first's cached prompt blocks; n=2 copies a shared partial block.
    for _ in range(2):
        outputs = fp8.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for prompt, output in zip(prompts, outputs):
            want = hf_generate(hf_fp8, prompt, 16)
            assert [c.token_ids for c in output.outputs] == [want, want]
            ids = torch.tensor([prompt + want])
            with torch.no_grad():
                hf_logprobs = torch.log_softmax(hf_fp8(ids).logits[0].float(), dim=-1)
            for step, (token, entry) in enumerate(zip(want, output.outputs[0].logprobs)):
                assert entry[token].logprob == pytest.approx(hf_logprobs[len(prompt) - 1 + step, token].item(), abs=2e-3)
    assert outputs[2].num_cached_tokens > 0


def test_prefill_and_mixed_steps_padded_into_graph_buckets_keep_the_tokens(checkpoint, hf_model, monkeypatch):
    """`mixed_cuda_graph_sizes` pads a prefill / mixed step into a token bucket and max_num_seqs + 1
    sequence slots (graphs.cuda_graph.MixedStepInputs) and replays a CUDA graph of it. Here the same
    padding runs eagerly on the CPU, for every prefill and mixed step of a run with chunked prefills
    and decodes side by side: the greedy tokens stay transformers'."""
    from graphs.cuda_graph import MixedStepInputs
    from ops.forward_context import ForwardContext, set_forward_context

    llm = LLM(checkpoint, block_size=4, max_model_len=128, max_num_batched_tokens=40, max_num_seqs=6)
    runner = llm.llm_engine.runner
    buckets = MixedStepInputs([16, 32, 48], max_seqs=6, max_blocks=128 // 4, device=torch.device("cpu"))
    unpadded = runner.execute_model
    padded_steps = []

    def execute_model(input_ids, positions, meta, logits_rows, block_copies=None):
        t = buckets.bucket_for(input_ids.shape[0], meta.num_seqs)
        if meta.max_query_len == 1 or t is None or block_copies is not None:
            return unpadded(input_ids, positions, meta, logits_rows, block_copies)
        padded_steps.append((input_ids.shape[0], meta.num_seqs, t))
        buckets.load(t, input_ids, positions, meta)
        context = ForwardContext(buckets.metadata(t, 128), runner.kv_caches, runner.attention_backend)
        with set_forward_context(context):
            hidden = runner.model(buckets.input_ids[t], buckets.positions[t])[: input_ids.shape[0]]
        return None if logits_rows is None else runner.model.compute_logits(hidden[logits_rows])

    monkeypatch.setattr(runner, "execute_model", execute_model)
    engine = llm.llm_engine
    prompts = random_prompts([30, 5, 17, 44, 9, 2, 60, 12], seed=13)
    arrivals = {0: [0, 1], 2: [2], 5: [3], 6: [4], 11: [5], 14: [6], 20: [7]}  # step -> prompts added before it
    finished = {}
    for step in range(300):
        for i in arrivals.get(step, []):
            engine.add_request(str(i), prompts[i], GREEDY)
        for out in engine.step():
            if out.finished:
                finished[int(out.request_id)] = out.outputs[0].token_ids
        if len(finished) == len(prompts):
            break
    for i, prompt in enumerate(prompts):
        assert finished[i] == hf_greedy(hf_model, prompt, 24)
    assert len({n for n, _, _ in padded_steps}) >= 4  # steps of several sizes, each padded in turn
    assert any(n < t for n, _, t in padded_steps)  # padding tokens
    assert any(s > 1 for _, s, _ in padded_steps)  # several sequences (decodes beside a prompt chunk)


def test_sampler_applies_each_rows_own_params_in_a_batch_sharing_params_objects():
    """The sampler checks each distinct SamplingParams once per batch; a setting only a later
    row's params have (logit bias, min_tokens) still applies to that row, and only to it."""
    from engine.sampler import SamplingBatch, sample

    vocab = 16
    logits = torch.zeros(4, vocab)
    logits[:, 7] = 5.0  # every row prefers token 7
    shared = SamplingParams(temperature=0)
    biased = SamplingParams(temperature=0, logit_bias={5: 100.0})
    waits = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7])
    batch = SamplingBatch(params=[shared, shared, biased, waits], generators=[None] * 4,
                          token_ids=[[1, 2]] * 4, num_prompt_tokens=[2] * 4, eos_token_ids={0})
    assert sample(logits, batch, max_logprobs=5).token_ids.tolist()[:3] == [7, 7, 5]
    assert sample(logits, batch, max_logprobs=5).token_ids.tolist()[3] != 7  # blocked until 3 tokens
    batch.token_ids = [[1, 2, 3, 4, 5]] * 4  # 3 tokens generated: no longer blocked
    assert sample(logits, batch, max_logprobs=5).token_ids.tolist() == [7, 7, 5, 7]


def test_decode_steps_list_the_longest_context_first_when_asked(llm, monkeypatch):
    """ENGINE_DECODE_ORDER=longest-first (engine.scheduler.DECODE_ORDER): a step of decodes only lists its sequences
    by decreasing context; a step with a prompt chunk keeps admission order; the greedy tokens are the same."""
    import engine.scheduler as scheduler

    prompts = [{"prompt_token_ids": p} for p in random_prompts([3, 40, 9, 25, 17], seed=11)]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    engine = llm.llm_engine
    steps = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        steps.append([(s.num_new_tokens, s.seq.num_computed_tokens) for s in out.scheduled])
        return out

    monkeypatch.setattr(scheduler, "DECODE_ORDER", "longest-first")
    monkeypatch.setattr(engine.scheduler, "schedule", recording_schedule)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == want
    decode_steps = [step for step in steps if step and all(n == 1 for n, _ in step)]
    assert len(decode_steps) >= 20
    for step in decode_steps:
        contexts = [computed for _, computed in step]
        assert contexts == sorted(contexts, reverse=True)
    first = steps[0]  # the prompts' step: admission order
    assert [computed for _, computed in first] == [0] * len(prompts) and [n for n, _ in first] == [3, 40, 9, 25, 17]
