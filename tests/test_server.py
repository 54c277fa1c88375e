"""The OpenAI-compatible server, end to end: `python -m engine.serve` started as users start it,
driven by the official `openai` client (and raw httpx for the error cases)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from api.app import build_app
from api.generation import INLINE_TOKENIZE_CHARS
from engine import EngineArgs
from engine.async_engine import GIL_SWITCH_INTERVAL_S, AsyncLLMEngine, RequestStream, _put_all
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.serve import build_parser

MODEL = "tiny-llama"
MAX_MODEL_LEN = 2048
MAX_BODY_BYTES = 64 * 1024
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


class ServerProcess:
    """`python -m engine.serve ... --port 0`, its URL read from its own log line."""

    def __init__(self, log_path: Path, *args: str, new_session: bool = False):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "engine.serve", "--port", "0", *args],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session)
        deadline = time.monotonic() + 120
        while (found := re.search(r"at (http://[\d.:]+)/v1", self.log())) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not start:\n{self.log()}")
            time.sleep(0.05)
        self.url = found.group(1)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


class ThreadedServer:
    """An app on uvicorn in a background thread of the test process (to reach into its engine)."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "the in-process server failed to start"
            time.sleep(0.02)
        self.url = "http://127.0.0.1:%d" % self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


# Every test of the real server runs against both shapes: the engine's step loop as a thread of the
# server process, and the engine in a process of its own (--engine-process).
ENGINE_SHAPES = {"in-process": ["--no-engine-process"], "engine-process": ["--engine-process"]}


@pytest.fixture(scope="module", params=list(ENGINE_SHAPES))
def server(llama_checkpoint, tmp_path_factory, request):
    proc = ServerProcess(
        tmp_path_factory.mktemp("server") / "server.log", "--model", llama_checkpoint, "--served-model-name", MODEL,
        "--max-model-len", str(MAX_MODEL_LEN), "--num-gpu-blocks-override", "1024", "--max-body-bytes",
        str(MAX_BODY_BYTES), "--seed", "0", *ENGINE_SHAPES[request.param],
    )
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def small_engine(llama_checkpoint):
    """One sequence at a time and a waiting queue of one: queueing behaviour is deterministic."""
    args = EngineArgs(model=llama_checkpoint, max_model_len=256, max_num_seqs=1, max_waiting_requests=1,
                      num_gpu_blocks_override=64)
    return AsyncLLMEngine.from_engine_args(args)


@pytest.fixture(scope="module")
def keyed_server(small_engine):
    threaded = ThreadedServer(build_app(small_engine, served_model_name=MODEL, api_key="sekret"))
    yield threaded
    threaded.stop()


def metrics(http: httpx.Client) -> dict[str, float]:
    """Every sample of /metrics by name (and labels), parsed with prometheus-client's own parser."""
    text = http.get("/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def sse_events(lines) -> list:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


# ---- the happy paths, through the official client ----------------------------------------------------


def test_completion_stream_joins_to_the_non_streamed_text(client):
    full = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    assert full.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_stream_starts_with_the_role_and_joins_to_the_non_streamed_message(client, http):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about Paris."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 10
    # The prompt is the chat template's rendering, exactly as /tokenize renders it.
    rendered = http.post("/tokenize", json={"messages": messages}).json()
    assert full.usage.prompt_tokens == rendered["count"]


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(client):
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, stream=True,
                                            stream_options=options, **GREEDY))
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 6 and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks if c.choices)
    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                               stream=True, stream_options=options, **GREEDY))
    counts = [c.usage.completion_tokens for c in chat if c.choices and c.choices[0].delta.content]
    assert counts and counts == sorted(counts) and chat[-1].usage.completion_tokens == 5
    plain = list(client.completions.create(model=MODEL, prompt="Once", max_tokens=3, stream=True,
                                           stream_options={"include_usage": True}, **GREEDY))
    assert all(c.usage is None for c in plain if c.choices)  # without it, only the last chunk has the usage


def test_n_choices_are_reproducible_with_a_seed(client):
    def sample() -> list[str]:
        out = client.completions.create(model=MODEL, prompt="Once upon a time", n=3, max_tokens=8, temperature=1.0,
                                        seed=1234, extra_body={"ignore_eos": True})
        assert [c.index for c in out.choices] == [0, 1, 2]
        assert out.usage.completion_tokens == 24
        return [c.text for c in out.choices]

    first = sample()
    assert sample() == first
    assert len(set(first)) > 1  # n samples, not one sample n times


def test_stop_string_ends_the_text_before_it(client):
    text = client.completions.create(model=MODEL, prompt="Hello, how are you", max_tokens=16, **GREEDY).choices[0].text
    assert len(text) > 9
    stop = text[6:9]
    stopped = client.completions.create(model=MODEL, prompt="Hello, how are you", max_tokens=16, stop=[stop], **GREEDY)
    choice = stopped.choices[0]
    assert choice.text == text[: text.index(stop)]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop


def test_logprobs_in_openai_shapes(client):
    out = client.completions.create(model=MODEL, prompt="Numbers like 42", max_tokens=6, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(3 <= len(top) <= 4 for top in lp.top_logprobs)  # top 3, plus the sampled token if not among them
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # Greedy: the chosen token is the most likely one.
    assert all(max(top.values()) == pytest.approx(x) for top, x in zip(lp.top_logprobs, lp.token_logprobs))

    streamed = client.completions.create(model=MODEL, prompt="Numbers like 42", max_tokens=6, logprobs=3,
                                         stream=True, **GREEDY)
    assert [t for c in streamed for t in c.choices[0].logprobs.tokens] == lp.tokens

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          logprobs=True, top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())


def test_echo_puts_the_prompt_in_front(client):
    prompt = "Rain fell on the green hills"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, echo=True, logprobs=1, **GREEDY)
    choice = out.choices[0]
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    assert len(choice.logprobs.tokens) == out.usage.prompt_tokens + 4
    assert choice.logprobs.token_logprobs[0] is None  # nothing comes before the first prompt token


def test_echo_with_max_tokens_0_scores_the_prompt_without_generating(client):
    """lm-evaluation-harness's loglikelihood request (vLLM answers it so): the prompt and its logprobs,
    no completion. Its logprobs are the ones a generating echo request gives the prompt."""
    prompt = "Rain fell on the green hills"
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and scored.usage.total_tokens == scored.usage.prompt_tokens
    generating = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1, **GREEDY)
    n = scored.usage.prompt_tokens
    assert len(choice.logprobs.tokens) == n
    assert choice.logprobs.tokens == generating.choices[0].logprobs.tokens[:n]
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(generating.choices[0].logprobs.token_logprobs[1:n])
    streamed = list(client.completions.create(model=MODEL, prompt=[prompt, "Snow"], max_tokens=0, echo=True,
                                              stream=True, stream_options={"include_usage": True}))
    texts = {c.choices[0].index: c.choices[0].text for c in streamed if c.choices}
    assert texts == {0: prompt, 1: "Snow"} and streamed[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):  # without echo: nothing to return
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)


def test_prompt_logprobs_come_in_vllms_shape_and_agree_with_the_echoed_ones(client):
    prompt = "Rain fell on the green hills"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body={"prompt_logprobs": 2})
    positions = out.choices[0].model_extra["prompt_logprobs"]
    assert len(positions) == out.usage.prompt_tokens and positions[0] is None
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2).choices[0].logprobs
    for i, position in enumerate(positions[1:], start=1):
        assert 2 <= len(position) <= 3  # the top 2, plus the prompt's own token when not among them
        entries = {entry["decoded_token"]: entry for entry in position.values()}
        assert entries[echoed.tokens[i]]["logprob"] == pytest.approx(echoed.token_logprobs[i])
        assert sorted(e["rank"] for e in position.values())[:2] == [1, 2]
    assert "prompt_logprobs" not in client.completions.create(model=MODEL, prompt=prompt, max_tokens=1).choices[0].model_extra
    with pytest.raises(openai.BadRequestError, match="ask for the prompt's logprobs twice"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1,
                                  extra_body={"prompt_logprobs": 3})


def test_return_tokens_as_token_ids_names_logprobs_tokens_by_id(client, http):
    ids = {"extra_body": {"return_tokens_as_token_ids": True, **GREEDY["extra_body"]}, "temperature": 0}
    out = client.completions.create(model=MODEL, prompt="Rain fell", max_tokens=4, logprobs=2, **ids)
    lp = out.choices[0].logprobs
    tokens = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert http.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == out.choices[0].text
    assert all(k.startswith("token_id:") for top in lp.top_logprobs for k in top)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          logprobs=True, top_logprobs=1, **ids)
    content = chat.choices[0].logprobs.content
    ids_out = [int(entry.token.removeprefix("token_id:")) for entry in content]
    assert http.post("/detokenize", json={"tokens": ids_out}).json()["prompt"] == chat.choices[0].message.content


def test_add_special_tokens_is_vllms_in_completions_chat_and_tokenize(client, http):
    """Completions put the tokenizer's BOS in front unless told not to; chat leaves it to the template
    unless told to add it; /tokenize does the same for a prompt and for messages."""
    with_bos = http.post("/tokenize", json={"prompt": "Rain fell"}).json()["tokens"]
    without = http.post("/tokenize", json={"prompt": "Rain fell", "add_special_tokens": False}).json()["tokens"]
    assert len(with_bos) == len(without) + 1 and with_bos[1:] == without
    plain = client.completions.create(model=MODEL, prompt="Rain fell", max_tokens=1)
    bare = client.completions.create(model=MODEL, prompt="Rain fell", max_tokens=1, extra_body={"add_special_tokens": False})
    assert plain.usage.prompt_tokens == len(with_bos) and bare.usage.prompt_tokens == len(without)
    messages = [{"role": "user", "content": "Hi"}]
    rendered = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    doubled = http.post("/tokenize", json={"messages": messages, "add_special_tokens": True}).json()["tokens"]
    assert doubled[1:] == rendered and len(doubled) == len(rendered) + 1
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, extra_body={"add_special_tokens": True})
    assert chat.usage.prompt_tokens == len(doubled)


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(client, http):
    """vLLM's truncate_prompt_tokens: the prompt cut to its last k tokens before it runs, whatever its form."""
    prompt = "Rain fell on the green hills of the north all night long"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert len(ids) > 6
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True,
                                    extra_body={"truncate_prompt_tokens": 4, **GREEDY["extra_body"]}, temperature=0)
    tail = client.completions.create(model=MODEL, prompt=ids[-4:], max_tokens=3, echo=True, **GREEDY)
    assert cut.usage.prompt_tokens == 4 and cut.choices[0].text == tail.choices[0].text  # same tokens, same echo
    as_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, extra_body={"truncate_prompt_tokens": 4})
    assert as_ids.usage.prompt_tokens == 4
    kept = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"truncate_prompt_tokens": -1})
    assert kept.usage.prompt_tokens == len(ids)  # -1: up to max_model_len, so nothing cut here
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=1,
                                          extra_body={"truncate_prompt_tokens": 5})
    assert chat.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens must be at least 1"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"truncate_prompt_tokens": 0})


@pytest.mark.parametrize("field, value", [("guided_choice", ["yes", "no"]), ("guided_json", {"type": "object"}),
                                          ("guided_regex", "a+"), ("structured_outputs", {"choice": ["a"]})])
def test_vllms_structured_output_fields_are_refused_by_name(client, field, value):
    with pytest.raises(openai.BadRequestError, match=f"structured output is not supported: {field}"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1, extra_body={field: value})


def test_several_prompts_give_a_choice_each(client):
    prompts = ["One, two, three", "Paris is the capital of"]
    together = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, n=2, **GREEDY)
    assert [c.index for c in together.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, **GREEDY).choices[0].text
        assert together.choices[2 * i].text == together.choices[2 * i + 1].text == alone


def test_models_lists_the_served_model(client):
    [card] = client.models.list().data
    assert card.id == MODEL and card.owned_by == "engine"
    assert card.max_model_len == MAX_MODEL_LEN


def test_tokenize_and_detokenize_round_trip(http):
    text = "Hello, world! Größe 🙂"
    plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["count"] == len(plain["tokens"]) and plain["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": plain["tokens"]}).json() == {"prompt": text}
    with_bos = http.post("/tokenize", json={"prompt": text}).json()
    assert with_bos["tokens"][1:] == plain["tokens"]


def test_health_and_version(http):
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]


# ---- errors, through raw HTTP -----------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ERROR_CASES = {
    "malformed json": (COMPLETIONS, b'{"prompt": "hi", ', 400, "not valid JSON", None),
    "wrong type": (COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, 400, "Expected `int", "max_tokens"),
    "missing field": (COMPLETIONS, {"max_tokens": 5}, 400, "missing required field `prompt`", None),
    "over max_model_len": (COMPLETIONS, {"prompt": "hi", "max_tokens": 3000}, 400, "max_tokens (3000)", None),
    "n < 1": (COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n must be at least 1", None),
    "temperature < 0": (COMPLETIONS, {"prompt": "hi", "temperature": -0.5}, 400, "temperature", None),
    "top_p 0": (COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400, "top_p must be in (0, 1]", None),
    "top_p over 1": (CHAT, {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p", None),
    "logprobs over the limit": (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400, "limit of 20", None),
    "empty messages": (CHAT, {"messages": []}, 400, "messages must not be empty", "messages"),
    "stream_options without stream": (COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": True}},
                                      400, "stream_options", "stream_options"),
    "empty prompt list": (COMPLETIONS, {"prompt": []}, 400, "prompt must be", "prompt"),
    "mixed prompt list": (COMPLETIONS, {"prompt": [5, "hi"]}, 400, "prompt must be", "prompt"),
    "unknown model": (COMPLETIONS, {"prompt": "hi", "model": "gpt-9"}, 404, "gpt-9", "model"),
    "body over the limit": (COMPLETIONS, {"prompt": "x" * MAX_BODY_BYTES}, 413, "over the limit", None),
    "unknown path": ("/v1/embeddings", {"input": "hi"}, 404, "Not Found", None),
    # Found by fuzzing: n = 2**63 used to build sequences until the process was killed for memory.
    "n over max_num_seqs": (COMPLETIONS, {"prompt": "hi", "n": 2**63}, 400, "is over max_num_seqs (256)", None),
    "seed over int64": (COMPLETIONS, {"prompt": "hi", "seed": 2**64}, 400, "seed must be a 64-bit signed", None),
    "nested too deeply": (COMPLETIONS, b'{"prompt": "hi", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}", 400,
                          "nested too deeply", None),
    "best_of": (COMPLETIONS, {"prompt": "hi", "best_of": 3}, 400, "best_of is not supported", "best_of"),
    "logit_bias key": (COMPLETIONS, {"prompt": "hi", "logit_bias": {"five": 10}}, 400, "keys must be token ids",
                       "logit_bias"),
    "logit_bias value": (COMPLETIONS, {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "[-100, 100]", None),
    "suffix": (COMPLETIONS, {"prompt": "hi", "suffix": "end"}, 400, "suffix is not supported", "suffix"),
    "json response_format": (CHAT, {"messages": [{"role": "user", "content": "hi"}],
                                    "response_format": {"type": "json_object"}}, 400, "structured output",
                             "response_format"),
    "tools": (CHAT, {"messages": [{"role": "user", "content": "hi"}],
                     "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool calling", "tools"),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_bad_requests_get_openai_error_bodies(http, case):
    path, body, status, message, param = ERROR_CASES[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_streamed_bad_request_is_an_error_response_not_a_stream(http):
    response = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 3000, "stream": True})
    assert response.status_code == 400 and "max_model_len (2048)" in response.json()["error"]["message"]


def test_null_takes_the_default_where_openai_allows_it(http):
    body = {"prompt": "hi", "max_tokens": 2, "n": None, "stream": None, "echo": None}
    response = http.post(COMPLETIONS, json=body)
    assert response.status_code == 200 and len(response.json()["choices"]) == 1
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": None, "n": None}
    response = http.post(CHAT, json=chat)
    assert response.status_code == 200 and response.json()["choices"][0]["logprobs"] is None


def test_extreme_but_valid_sampling_values_serve_and_fail_no_one_else(client):
    # top_k beyond the vocabulary means "all tokens" (it once overflowed inside the step and failed
    # every request in flight); the largest seed still gives each of n choices its own seed.
    sampled = dict(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=1.0, seed=7)
    plain = client.completions.create(**sampled)
    huge_k = client.completions.create(**sampled, extra_body={"top_k": 2**70})
    assert huge_k.choices[0].text == plain.choices[0].text
    last_seed = client.completions.create(**{**sampled, "seed": 2**63 - 1}, n=2)
    assert len(last_seed.choices) == 2


def test_logit_bias_forces_a_token(client, http):
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=4, logit_bias={"7": 100}, **GREEDY)
    assert out.choices[0].text == http.post("/detokenize", json={"tokens": [7] * 4}).json()["prompt"]


def test_server_is_healthy_after_the_errors(http, client):
    assert http.get("/health").status_code == 200
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    assert metrics(http)["engine_num_requests_running"] == 0


def test_api_key_is_required_except_for_health(keyed_server):
    with httpx.Client(base_url=keyed_server.url) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            response = http.get("/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert http.get("/health").status_code == 200
    keyed = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sekret", max_retries=0)
    assert keyed.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="nope", max_retries=0).models.list()


async def _first_event(client: httpx.AsyncClient, stack: contextlib.AsyncExitStack, body: dict):
    """Open a streaming request and read its first event; returns the line iterator, which the
    caller must keep (dropping it closes the connection, which is a disconnect)."""
    response = await stack.enter_async_context(client.stream("POST", COMPLETIONS, json=body))
    assert response.status_code == 200
    lines = response.aiter_lines()
    while not (await anext(lines)).startswith("data: "):
        pass
    return lines


def test_full_waiting_queue_gets_503(keyed_server, small_engine, monkeypatch):
    step = small_engine.engine.step

    def slow_step():  # so the running request is still running when the others arrive
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(small_engine.engine, "step", slow_step)
    long = {"prompt": "hi", "max_tokens": 200, "ignore_eos": True}

    async def scenario():
        headers = {"Authorization": "Bearer sekret"}
        async with httpx.AsyncClient(base_url=keyed_server.url, headers=headers, timeout=30) as http:
            async with contextlib.AsyncExitStack() as stack:
                running = await _first_event(http, stack, {**long, "stream": True})  # the engine's one sequence
                assert small_engine.get_stats().num_running == 1
                waiting = asyncio.ensure_future(http.post(COMPLETIONS, json=long))
                async with asyncio.timeout(10):
                    while small_engine.get_stats().num_waiting < 1:
                        await asyncio.sleep(0.01)
                refused = await http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2})
                waiting.cancel()
                await running.aclose()
            return refused

    refused = asyncio.run(scenario())
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "overloaded"


def test_a_failing_request_gets_500_and_the_others_go_on(keyed_server, small_engine, monkeypatch):
    engine = small_engine.engine
    add_request, step = engine.add_request, engine.step

    def add_or_fail(request_id, prompt, *args, **kwargs):
        if prompt["prompt"] == "boom":  # the server sends text prompts with their token ids
            raise RuntimeError("the tokenizer exploded")
        return add_request(request_id, prompt, *args, **kwargs)

    armed = threading.Event()
    failure = {"error": RuntimeError("a kernel failed")}

    def step_failing_once_armed():
        if armed.is_set():
            armed.clear()
            raise failure["error"]
        return step()

    monkeypatch.setattr(engine, "add_request", add_or_fail)
    headers = {"Authorization": "Bearer sekret"}
    with httpx.Client(base_url=keyed_server.url, headers=headers, timeout=30) as http:
        failed = http.post(COMPLETIONS, json={"prompt": "boom", "max_tokens": 2})
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "server_error" and "exploded" in failed.json()["error"]["message"]
        assert http.post(COMPLETIONS, json={"prompt": "fine", "max_tokens": 2}).status_code == 200

        # A step that raises fails the request in it, after its stream started, and only it.
        monkeypatch.setattr(engine, "step", step_failing_once_armed)
        long = {"prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with http.stream("POST", COMPLETIONS, json=long) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            events = sse_events([next(line for line in lines if line.startswith("data: "))])
            armed.set()  # the stream has started: the next step fails
            events += sse_events(lines)
        assert "a kernel failed" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
        assert all("choices" in json.loads(e) for e in events[:-2])
        assert http.post(COMPLETIONS, json={"prompt": "fine", "max_tokens": 2}).status_code == 200

        # Whatever a step raises is the server's fault: a 500, never a 400 blaming the request.
        failure["error"] = ValueError("Overflow when unpacking long long")
        armed.set()
        failed = http.post(COMPLETIONS, json={"prompt": "innocent", "max_tokens": 2})
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        assert "Overflow" in failed.json()["error"]["message"]
        assert http.post(COMPLETIONS, json={"prompt": "fine", "max_tokens": 2}).status_code == 200
        assert http.get("/health").status_code == 200
    assert small_engine.get_stats().num_used_blocks == 0


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_a_slow_tokenization_holds_up_neither_the_event_loop_nor_the_engine(keyed_server, small_engine, monkeypatch,
                                                                           path):
    # A prompt of megabytes takes seconds to tokenize: it must run off the event loop and off the
    # engine's step thread. This one blocks until released.
    tokenizer, encode = small_engine.tokenizer, small_engine.tokenizer.encode
    started, release = threading.Event(), threading.Event()

    def slow_encode(text, *args, **kwargs):
        if "slow prompt" in text:
            started.set()
            release.wait(30)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    long = "slow prompt " + "x" * INLINE_TOKENIZE_CHARS  # long enough for a worker thread; too long for the model
    body = {"prompt": long} if path == COMPLETIONS else {"messages": [{"role": "user", "content": long}]}
    headers = {"Authorization": "Bearer sekret"}
    with httpx.Client(base_url=keyed_server.url, headers=headers, timeout=30) as slow_client, \
            httpx.Client(base_url=keyed_server.url, headers=headers, timeout=5) as http, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(slow_client.post, path, json={**body, "max_tokens": 2})
        try:
            assert started.wait(10)
            assert http.get("/health").status_code == 200
            assert http.post(COMPLETIONS, json={"prompt": "fine", "max_tokens": 2}).status_code == 200
        finally:
            release.set()
        refused = slow.result()
        assert refused.status_code == 400 and "max_model_len" in refused.json()["error"]["message"]


def test_a_stream_hands_out_the_tokens_made_before_an_error(small_engine):
    # Outputs are skipped to the newest, but an error queued behind them must not swallow them: the
    # client would get a bare 500 instead of its tokens and then the error.
    async def scenario():
        stream = RequestStream("r", small_engine)
        older, newer = (RequestOutput("r", "hi", [1], None, [], finished=False) for _ in range(2))
        _put_all([(stream, older), (stream, newer), (stream, RuntimeError("a kernel failed"))])
        first = await anext(stream)
        with pytest.raises(RuntimeError, match="a kernel failed"):
            await anext(stream)
        return first is newer, stream.finished

    assert asyncio.run(scenario()) == (True, True)


def test_stream_interval_sends_the_first_token_then_every_nth(llama_checkpoint):
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=llama_checkpoint, max_model_len=256, stream_interval=3,
                                                        num_gpu_blocks_override=64))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def token_counts() -> list[int]:
        counts = []
        async for output in engine.generate("The quick brown fox", params, request_id="r"):
            counts.append(len(output.outputs[0].token_ids))
            await asyncio.sleep(0)
        return counts

    try:
        counts = asyncio.run(token_counts())
    finally:
        engine.shutdown()
    # A slow consumer may skip some, never see others: 1 at once, then 4, 7, and the final 10.
    assert counts[-1] == 10 and set(counts) <= {1, 4, 7, 10}, counts
    with pytest.raises(ValueError, match="stream_interval must be at least 1"):
        EngineArgs(model=llama_checkpoint, stream_interval=0)


def test_the_async_front_shortens_the_gil_switch_interval_until_shutdown(llama_checkpoint):
    # The step thread must win the GIL back from the event loop at once when the device is done.
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # Python's default
    try:
        engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=llama_checkpoint, num_gpu_blocks_override=16))
        assert sys.getswitchinterval() == GIL_SWITCH_INTERVAL_S
        engine.shutdown()
        assert sys.getswitchinterval() == 0.005
    finally:
        sys.setswitchinterval(before)


def test_not_ready_server_answers_503(llama_checkpoint):
    # Without the ASGI lifespan the background load never starts: the app stays "loading".
    app = build_app(EngineArgs(model=llama_checkpoint))

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            return await http.get("/health"), await http.post(COMPLETIONS, json={"prompt": "hi"})

    for response in asyncio.run(scenario()):
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "not_ready"


def test_chat_template_comes_from_the_flag_or_a_clear_400(small_engine, monkeypatch):
    async def chat(app) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            return await http.post(CHAT, json={"messages": [{"role": "user", "content": "Paris"}], "max_tokens": 1})

    plain = build_app(small_engine, chat_template="{{ messages[0]['content'] }}")
    response = asyncio.run(chat(plain))
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == len(small_engine.tokenizer.encode("Paris", add_special_tokens=False))

    monkeypatch.setattr(small_engine.tokenizer, "chat_template", None)
    response = asyncio.run(chat(build_app(small_engine)))
    assert response.status_code == 400 and "--chat-template" in response.json()["error"]["message"]


def test_chat_takes_vllms_template_options(small_engine):
    """chat_template_kwargs reach the template (as Qwen3's enable_thinking does); continue_final_message
    leaves the last message open for the model to go on with; both in /tokenize too, and misuse is a 400."""
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}"
                "<no-think>{% endif %}{% endif %}")
    app = build_app(small_engine, chat_template=template)
    encode = lambda text: small_engine.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    user = [{"role": "user", "content": "Paris"}]

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            async def tokens(**body):
                response = await http.post("/tokenize", json={"messages": user, **body})
                return response.json()["tokens"] if response.status_code == 200 else response
            assert await tokens() == encode("<user>Paris</s><assistant>")
            assert await tokens(chat_template_kwargs={"enable_thinking": False}) == encode("<user>Paris</s><assistant><no-think>")
            opened = user + [{"role": "assistant", "content": "The answer is"}]
            response = await http.post("/tokenize", json={"messages": opened, "add_generation_prompt": False,
                                                          "continue_final_message": True})
            assert response.json()["tokens"] == encode("<user>Paris</s><assistant>The answer is")
            chat = await http.post(CHAT, json={"messages": opened, "add_generation_prompt": False,
                                               "continue_final_message": True, "max_tokens": 1})
            assert chat.status_code == 200
            assert chat.json()["usage"]["prompt_tokens"] == len(encode("<user>Paris</s><assistant>The answer is"))
            both = await http.post(CHAT, json={"messages": opened, "continue_final_message": True, "max_tokens": 1})
            assert both.status_code == 400 and "add_generation_prompt" in both.json()["error"]["message"]
            reserved = await tokens(chat_template_kwargs={"add_generation_prompt": False})
            assert reserved.status_code == 400 and "chat_template_kwargs may not set add_generation_prompt" in reserved.text

    asyncio.run(run())


# ---- many clients -----------------------------------------------------------------------------------


def test_32_concurrent_streams_get_the_sequential_greedy_text(server, client):
    prompts = [f"Request {i}: " + "the river carried leaves " * (i % 5) for i in range(32)]
    sequential = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, **GREEDY).choices[0].text
                  for p in prompts]

    async def stream(aclient: openai.AsyncOpenAI, prompt: str) -> str:
        chunks = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=8, stream=True, **GREEDY)
        return "".join([c.choices[0].text async for c in chunks])

    async def concurrently() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(stream(aclient, p) for p in prompts))

    assert asyncio.run(concurrently()) == sequential


def test_clients_that_disconnect_leave_no_kv_blocks_in_use(server, http):
    before = metrics(http)
    long = {"prompt": "Tell me a long story", "max_tokens": 2000, "ignore_eos": True}

    async def disconnect_early():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as aclient:
            async with contextlib.AsyncExitStack() as stack:
                streams = [await _first_event(aclient, stack, {**long, "stream": True}) for _ in range(4)]
                assert len(streams) == 4  # kept open until the stack closes them: four disconnects
            # Non-streaming: the client gives up waiting.
            with pytest.raises(httpx.ReadTimeout):
                await aclient.post(COMPLETIONS, json=long, timeout=0.5)

    asyncio.run(disconnect_early())
    deadline = time.monotonic() + 10
    while (after := metrics(http))["engine_kv_cache_used_blocks"] > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after["engine_kv_cache_used_blocks"] == 0 and after["engine_num_requests_running"] == 0
    aborted = "engine_request_success_total{finished_reason=abort}"
    assert after[aborted] - before.get(aborted, 0) == 5
    # Aborted at once, not run to the end.
    assert after["engine_generation_tokens_total"] - before["engine_generation_tokens_total"] < 5 * 2000 / 2


def test_metrics_count_the_requests_served(client, http):
    before = metrics(http)
    for _ in range(3):
        client.completions.create(model=MODEL, prompt="Count me", max_tokens=3, **GREEDY)
    after = metrics(http)
    served = "engine_request_success_total{finished_reason=length}"
    assert after[served] - before.get(served, 0) == 3
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert after[f"engine_{histogram}_count"] - before[f"engine_{histogram}_count"] == 3
    assert after["engine_inter_token_latency_seconds_count"] - before["engine_inter_token_latency_seconds_count"] == 6
    assert after["engine_generation_tokens_total"] - before["engine_generation_tokens_total"] == 9
    assert after["engine_prompt_tokens_total"] > before["engine_prompt_tokens_total"]
    assert 0 <= after["engine_kv_cache_usage_perc"] <= 1


# ---- the command line -------------------------------------------------------------------------------


def test_every_engine_arg_is_a_flag_with_vllm_names():
    args = build_parser().parse_args(["--max-model-len", "128", "--enable-prefix-caching", "--enforce-eager",
                                      "--cuda-graph-sizes", "1", "2", "--gpu-memory-utilization", "0.5"])
    assert (args.max_model_len, args.enable_prefix_caching, args.enforce_eager) == (128, True, True)
    assert args.cuda_graph_sizes == [1, 2] and args.gpu_memory_utilization == 0.5
    assert not hasattr(args, "block_size")  # unset flags are left to EngineArgs' defaults
    help_text = build_parser().format_help()
    for name in EngineArgs.field_names():
        assert "--" + name.replace("_", "-") in help_text


def test_vllms_logging_flags_are_taken(small_engine, caplog):
    """--disable-log-stats stops the throughput lines, --uvicorn-log-level sets uvicorn's own, and
    --disable-log-requests is accepted (nothing logs requests at info level here)."""
    from engine.serve import log_stats_interval

    args = build_parser().parse_args(["--disable-log-stats", "--disable-log-requests", "--uvicorn-log-level", "warning"])
    assert log_stats_interval(args) == math.inf and args.uvicorn_log_level == "warning" and args.disable_log_requests
    assert log_stats_interval(build_parser().parse_args([])) == 5.0

    async def one(request_id: str) -> None:
        async for _ in small_engine.generate("Paris", SamplingParams(max_tokens=4, ignore_eos=True), request_id):
            pass

    def stats_lines(interval: float) -> int:
        small_engine.log_stats_interval_s = interval
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="engine"):
            asyncio.run(one(f"stats-{interval}"))
            time.sleep(0.3)  # the engine's thread writes the line of the busy stretch as it goes idle
        return sum("generation" in r.getMessage() and "tok/s" in r.getMessage() for r in caplog.records)

    try:
        assert stats_lines(0.0) >= 1
        assert stats_lines(math.inf) == 0
    finally:
        small_engine.log_stats_interval_s = 5.0


def test_bad_startup_input_exits_with_one_line(llama_checkpoint, tmp_path):
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "engine.serve", *args], capture_output=True, text=True, timeout=120)

    port = serve("--port", "99999")  # used to serve on 99999 - 65536
    assert port.returncode == 2 and "99999 is not a TCP port" in port.stderr
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")  # used to start, then 400 every chat request
    template = serve("--model", llama_checkpoint, "--chat-template", str(broken), "--port", "0")
    assert template.returncode == 1 and "does not render a one-message conversation" in template.stderr
    assert "Traceback" not in template.stderr


@pytest.mark.parametrize("shape", list(ENGINE_SHAPES))
def test_sigterm_ends_in_flight_streams_and_exits_zero(llama_checkpoint, tmp_path, shape):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    proc = ServerProcess(tmp_path / "server.log", "--model", llama_checkpoint, "--max-model-len", "512",
                         "--num-gpu-blocks-override", "64", "--chat-template", str(template), *ENGINE_SHAPES[shape])
    try:
        with httpx.Client(base_url=proc.url, timeout=30) as http:
            rendered = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
            assert http.post("/detokenize", json={"tokens": rendered["tokens"]}).json()["prompt"] == "user: hi\n"
            with http.stream("POST", COMPLETIONS, json={"prompt": "hi", "max_tokens": 500, "ignore_eos": True,
                                                        "stream": True}) as response:
                lines = response.iter_lines()
                while not next(lines).startswith("data: "):
                    pass
                proc.proc.send_signal(signal.SIGTERM)
                rest = sse_events(lines)
        assert json.loads(rest[-2])["error"]["message"] == "the server is shutting down" and rest[-1] == "[DONE]"
        assert proc.proc.wait(timeout=30) == 0, proc.log()
        assert "got SIGTERM" in proc.log()
    finally:
        proc.stop()


def test_the_engine_process_ends_with_the_server_however_it_ends(llama_checkpoint, tmp_path):
    # SIGTERM drains and stops it; SIGKILL gives it no chance to: it must notice and go by itself.
    for how in (signal.SIGTERM, signal.SIGKILL):
        proc = ServerProcess(tmp_path / f"server-{how.name}.log", "--model", llama_checkpoint, "--max-model-len", "256",
                             "--num-gpu-blocks-override", "64", "--engine-process")
        children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(proc.proc.pid)], capture_output=True,
                                                        text=True).stdout.split()]
        assert children, "the engine process should be the server's child"
        proc.proc.send_signal(how)
        proc.proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in children), (how, proc.log())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_the_engine_process_gives_the_outputs_of_the_engine_in_process(llama_checkpoint):
    # Outputs cross as deltas: every field must add up to what the engine itself reports, also where
    # it grows over several steps (prompt logprobs of a prefill split into chunks by a small budget).
    from engine.engine_process import RemoteEngine

    args = EngineArgs(model=llama_checkpoint, max_model_len=512, max_num_batched_tokens=64, num_gpu_blocks_override=128)
    prompt = {"prompt_token_ids": [(7 * i) % 900 + 5 for i in range(200)]}
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=1, logprobs=2),
              SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=8, stop=[" the"], logprobs=1)]

    def finals(engine: AsyncLLMEngine) -> list:
        async def run(i: int):
            final = None
            async for final in engine.generate(prompt, params[i], request_id=str(i)):
                pass
            return final

        async def both():
            return await asyncio.gather(run(0), run(1))

        try:
            return asyncio.run(both())
        finally:
            engine.shutdown()

    here = finals(AsyncLLMEngine.from_engine_args(args))
    there = finals(AsyncLLMEngine(RemoteEngine(args)))
    for b in there:  # the metrics cross as a tuple of their fields: each milestone in its place
        m = b.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    for a, b in zip(here, there):
        assert len(b.prompt_logprobs or []) == len(a.prompt_logprobs or [])
        assert (b.prompt_token_ids, b.prompt_logprobs, b.finished) == (a.prompt_token_ids, a.prompt_logprobs, a.finished)
        assert [(c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason) for c in b.outputs] == \
            [(c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason) for c in a.outputs]
    assert len(here[0].prompt_logprobs) == 200


def test_the_engine_process_runs_a_step_ahead_and_drops_its_outputs_of_aborted_requests(llama_checkpoint):
    from engine.engine_process import RemoteEngine

    engine = RemoteEngine(EngineArgs(model=llama_checkpoint, max_model_len=256, num_gpu_blocks_override=64))
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        engine.add_request("kept", {"prompt_token_ids": [5, 6, 7]}, params)
        engine.add_request("aborted", {"prompt_token_ids": [8, 9]}, params)
        engine.step()  # answered, then the engine process runs the next step ahead
        engine.abort_request("aborted")  # that step's outputs include it: they must not reach the front
        tokens, finished = {}, set()
        for _ in range(10):
            if not engine.has_unfinished_requests():
                break
            for output in engine.step():
                tokens[output.request_id] = output.outputs[0].token_ids
                if output.finished:
                    finished.add(output.request_id)
        assert finished == {"kept"} and set(tokens) == {"kept"} and len(tokens["kept"]) == 4
        assert not engine.has_unfinished_requests()
        # The same tokens as a request alone (greedy): the run-ahead changed what was computed when, not what.
        engine.add_request("again", {"prompt_token_ids": [5, 6, 7]}, params)
        while engine.has_unfinished_requests():
            outputs = engine.step()
        assert [o.outputs[0].token_ids for o in outputs if o.request_id == "again"] == [tokens["kept"]]
    finally:
        engine.shutdown()


def test_requests_added_to_the_engine_process_together_fail_one_by_one(llama_checkpoint):
    # The front sends the adds it drains at once in one message: a bad one among them fails alone,
    # with its ValueError, whether asked directly or through the async front (3 requests in its inbox
    # before its step thread wakes up are drained, and sent, together).
    from engine.engine_process import RemoteEngine

    args = EngineArgs(model=llama_checkpoint, max_model_len=256, num_gpu_blocks_override=64)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    prompts = {"a": {"prompt_token_ids": [5, 6, 7]}, "bad": {"prompt_token_ids": list(range(5, 305))},
               "b": {"prompt_token_ids": [8, 9]}}
    remote = RemoteEngine(args)
    try:
        errors = remote.add_requests([(request_id, prompt, params, None) for request_id, prompt in prompts.items()])
        assert errors[0] is None and errors[2] is None
        assert isinstance(errors[1], ValueError) and "leaves no room to generate" in str(errors[1])
        finals = {}
        while remote.has_unfinished_requests():
            finals.update((o.request_id, o.outputs[0].token_ids) for o in remote.step() if o.finished)
        assert set(finals) == {"a", "b"} and all(len(tokens) == 3 for tokens in finals.values())
    finally:
        remote.shutdown()

    remote = RemoteEngine(args)
    batches = []  # the sizes of the add messages sent
    add_requests = remote.add_requests
    remote.add_requests = lambda requests: batches.append(len(requests)) or add_requests(requests)
    async_engine = AsyncLLMEngine(remote)

    async def main(prompts, error: type[Exception], match: str | None = None):
        # The step thread sleeps on `wakeup`: posts set another event until all three are in the inbox.
        wakeup, async_engine._wakeup = async_engine._wakeup, threading.Event()
        streams = {request_id: async_engine.submit(request_id, prompt, params) for request_id, prompt in prompts.items()}
        async_engine._wakeup = wakeup
        wakeup.set()
        with pytest.raises(error, match=match):
            await streams.pop("bad").accepted()
        outputs = {}
        for request_id, stream in streams.items():
            await stream.accepted()
            async for output in stream:
                outputs[request_id] = output.outputs[0].token_ids
        return outputs

    try:
        assert asyncio.run(main(prompts, ValueError, "leaves no room to generate")) == finals  # greedy: the same tokens
        assert batches == [3]  # one message for the three
        # A batch that cannot be sent as a whole (a prompt that cannot be pickled) is sent one by one:
        # the bad one fails, the others are served.
        unpicklable = {"a2": prompts["a"], "bad": {"prompt_token_ids": [5, 6], "x": lambda: 0}, "b2": prompts["b"]}
        outputs = asyncio.run(main(unpicklable, Exception))
        assert outputs == {"a2": finals["a"], "b2": finals["b"]}
    finally:
        async_engine.shutdown()


def test_requests_arriving_while_the_step_thread_adds_others_wait_for_the_next_step(llama_checkpoint):
    # Hundreds of requests arriving at once: the step thread must not keep adding until the last one
    # has come (the device would idle meanwhile) but take what had arrived, step, and add the rest next.
    # Here each add brings the next request in while it is being added: 30 arrivals in a chain.
    from engine.async_engine import _Add
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineArgs(model=llama_checkpoint, max_model_len=256, num_gpu_blocks_override=64))
    async_engine = AsyncLLMEngine(engine)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    arrivals: list[_Add] = []
    added, adds_before_each_step = [], []
    real_add, real_step = engine.add_request, engine.step

    def add_request(*args, **kwargs):
        real_add(*args, **kwargs)
        added.append(args[0])
        if arrivals:
            async_engine._post(arrivals.pop(0))

    def step():
        adds_before_each_step.append(len(added))
        return real_step()

    engine.add_request, engine.step = add_request, step

    async def main():
        streams = [RequestStream(f"r{i}", async_engine) for i in range(30)]
        arrivals.extend(_Add(f"r{i}", {"prompt_token_ids": [5 + i, 6, 7]}, params, time.time(), streams[i])
                        for i in range(30))
        async_engine._post(arrivals.pop(0))
        tokens = []
        for stream in streams:
            await stream.accepted()
            async for output in stream:
                pass
            tokens.append(output.outputs[0].token_ids)
        return tokens

    try:
        tokens = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert len(added) == 30 and all(len(t) == 2 for t in tokens)
    assert adds_before_each_step[0] == 1, f"the first step waited for {adds_before_each_step[0]} adds"


STEP_COUNT_FILE = "ENGINE_TEST_STEP_COUNT_FILE"  # where the engine process's step hook writes its count


def _count_steps(engine, fail_on: int | None = None) -> None:
    """In the engine process (RemoteEngine's on_start): count engine.step calls into the file named
    by $ENGINE_TEST_STEP_COUNT_FILE (the test waits on it instead of sleeping); call `fail_on` raises."""
    step, calls, path = engine.step, [], os.environ[STEP_COUNT_FILE]

    def counted():
        calls.append(None)
        try:
            if len(calls) == fail_on:
                raise RuntimeError("injected step failure")
            return step()
        finally:
            with open(path + ".tmp", "w") as f:
                f.write(str(len(calls)))
            os.replace(path + ".tmp", path)

    engine.step = counted


def _step_fails_on_its_fourth_call(engine) -> None:
    _count_steps(engine, fail_on=4)


def wait_for_steps(path: Path, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and int(path.read_text() or 0) >= count):
        assert time.monotonic() < deadline, f"the engine process did not reach step {count}"
        time.sleep(0.01)
    time.sleep(0.05)  # the step's reply to the front is built after the count is written


def test_steps_the_engine_process_ran_ahead_reach_the_front_merged_and_add_up(llama_checkpoint, tmp_path, monkeypatch):
    # A front busier than the engine: the steps run meanwhile come back as one merged delta per
    # request, which must add up to the in-process engine's outputs (text, tokens, logprobs, finish).
    from engine.engine_process import MAX_STEPS_AHEAD, RemoteEngine
    from engine.llm_engine import LLMEngine

    args = EngineArgs(model=llama_checkpoint, max_model_len=256, num_gpu_blocks_override=64)
    requests = {
        "greedy": ({"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                                        logprobs=2, prompt_logprobs=1)),
        "sampled": ({"prompt_token_ids": [9, 10]}, SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=10,
                                                                   ignore_eos=True, logprobs=1)),
    }

    def run(engine, wait_after_first_step) -> tuple[dict, int]:
        for request_id, (prompt, params) in requests.items():
            engine.add_request(request_id, prompt, params)
        finals, most_new_tokens, seen = {}, 0, {}
        first = True
        while engine.has_unfinished_requests():
            for output in engine.step():
                tokens = len(output.outputs[0].token_ids)
                most_new_tokens = max(most_new_tokens, tokens - seen.get(output.request_id, tokens))
                seen[output.request_id] = tokens
                if output.finished:
                    finals[output.request_id] = output
            if first:
                wait_after_first_step()  # the engine process runs ahead meanwhile
                first = False
        return finals, most_new_tokens

    here, _ = run(LLMEngine(args), lambda: None)
    count_file = tmp_path / "steps"
    monkeypatch.setenv(STEP_COUNT_FILE, str(count_file))
    remote = RemoteEngine(args, on_start=_count_steps)
    try:
        there, most_new_tokens = run(remote, lambda: wait_for_steps(count_file, 1 + MAX_STEPS_AHEAD))
    finally:
        remote.shutdown()
    assert most_new_tokens == MAX_STEPS_AHEAD, "the steps run ahead should come back together"
    assert set(there) == set(here) == set(requests)
    for request_id, a in here.items():
        b = there[request_id]
        assert (b.prompt_token_ids, b.prompt_logprobs, b.finished) == (a.prompt_token_ids, a.prompt_logprobs, a.finished)
        assert [(c.text, c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason) for c in b.outputs] == \
            [(c.text, c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason) for c in a.outputs]


def test_a_step_run_ahead_that_fails_comes_after_the_outputs_of_the_steps_before_it(llama_checkpoint, tmp_path,
                                                                                   monkeypatch):
    from engine.engine_process import RemoteEngine

    count_file = tmp_path / "steps"
    monkeypatch.setenv(STEP_COUNT_FILE, str(count_file))
    monkeypatch.setenv("ENGINE_ASYNC_DEPTH", "1")  # the token counts below are those of one step in flight
    engine = RemoteEngine(EngineArgs(model=llama_checkpoint, max_model_len=256, num_gpu_blocks_override=64),
                          on_start=_step_fails_on_its_fourth_call)
    try:
        engine.add_request("r", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
        first = engine.step()  # step 1; then steps 2 and 3 run ahead, and step 4 fails
        wait_for_steps(count_file, 4)
        merged = engine.step()
        tokens_before = len(first[0].outputs[0].token_ids) if first else 0  # (async scheduling: none yet)
        assert [o.request_id for o in merged] == ["r"]
        assert len(merged[0].outputs[0].token_ids) == tokens_before + 2
        assert engine.has_unfinished_requests()  # the failure is still to come
        with pytest.raises(RuntimeError, match="injected step failure"):
            engine.step()
    finally:
        engine.shutdown()


@pytest.mark.parametrize("keep_alive", [False, True], ids=["exits", "keep-alive"])
def test_an_engine_process_that_dies_makes_the_server_exit_or_answer_503(llama_checkpoint, tmp_path, monkeypatch,
                                                                         keep_alive):
    # vLLM's behaviour: a server whose engine is dead exits (status 1) so that whatever runs it starts a
    # new one, found by its health check even with no request running; ENGINE_KEEP_ALIVE_ON_ENGINE_DEATH=1
    # keeps it up, failing requests and /health with 503.
    monkeypatch.setenv("ENGINE_KEEP_ALIVE_ON_ENGINE_DEATH", "1" if keep_alive else "0")
    proc = ServerProcess(tmp_path / "server.log", "--model", llama_checkpoint, "--max-model-len", "256",
                         "--num-gpu-blocks-override", "64", "--engine-process")
    try:
        engine_pids = subprocess.run(["pgrep", "-f", "multiprocessing.spawn", "-P", str(proc.proc.pid)],
                                     capture_output=True, text=True).stdout.split()
        assert engine_pids
        with httpx.Client(base_url=proc.url, timeout=30) as http:
            assert http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}).status_code == 200
            assert http.get("/health").status_code == 200
            for pid in engine_pids:
                os.kill(int(pid), signal.SIGKILL)
            if keep_alive:
                failed = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2})
                assert failed.status_code in (500, 503), failed.text
                assert http.get("/health").status_code == 503
                assert http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}).status_code == 503
        if not keep_alive:  # no request after the kill: the server's own look at the engine finds it
            assert proc.proc.wait(timeout=30) == 1, proc.log()
            assert "the engine died" in proc.log()
    finally:
        exit_code = proc.stop()
    if keep_alive:
        assert exit_code == 0, proc.log()  # SIGTERM: a clean drain


def test_inter_token_latency_counts_every_gap_even_when_outputs_arrive_merged():
    import dataclasses

    from api.metrics import RequestTracker, ServerMetrics
    from engine import CompletionOutput, EngineStats, RequestMetrics, RequestOutput

    stats = EngineStats(**{f.name: 0 for f in dataclasses.fields(EngineStats)})
    metrics = ServerMetrics(lambda: stats)
    tracker = RequestTracker(metrics)

    def output(num_tokens: int, last_token_time: float) -> RequestOutput:
        timing = RequestMetrics(arrival_time=0.0, first_scheduled_time=0.0, first_token_time=1.0, last_token_time=last_token_time)
        completion = CompletionOutput(0, "", list(range(num_tokens)), None, None)
        return RequestOutput("r", "p", [1], None, [completion], False, metrics=timing)

    tracker.observe(output(3, 1.5))  # a lagging consumer: the first output already holds three tokens
    tracker.observe(output(4, 1.75))
    count = metrics.registry.get_sample_value("engine_inter_token_latency_seconds_count")
    total = metrics.registry.get_sample_value("engine_inter_token_latency_seconds_sum")
    assert count == 3 and total == pytest.approx(0.75)
