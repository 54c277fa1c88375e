"""/v1/completions: one engine request per prompt (a string, strings, token ids or token-id lists),
n choices each, with the prompt echoed in front on request and logprobs in completions' shape.

`echo` with `max_tokens` 0 is a scoring request (lm-evaluation-harness's loglikelihood over the
OpenAI API): the answer is the prompt and, with `logprobs`, the prompt's logprobs, nothing generated,
as vLLM answers it. The engine runs it as a one-token request (it generates at least one token)
whose token the answer leaves out."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from api.encoding import SSE_DONE, json_response, sse
from api.errors import APIError
from api.generation import (INLINE_TOKENIZE_CHARS, Cursor, Generation, continuous_usage, include_usage, new_parts,
                            sampling_params, truncated, usage)
from api.logprobs import completion_logprobs, prompt_logprobs
from api.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from api.server import Server, read_json
from api.streaming import EventStream, unless_disconnected
from engine.async_engine import AsyncLLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams


def _completion_prompts(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    # The element types in one pass at C speed: a Python-level check per token id took ~0.2 ms of the
    # event loop for a 550-token prompt, 50 ms of a 256-request burst. (msgspec refuses booleans.)
    kinds = set(map(type, prompt))
    if kinds == {str}:
        return list(prompt)
    if kinds == {int}:
        return [prompt]
    if kinds == {list}:
        return list(prompt)
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                        "token-id lists, and not empty", param="prompt")


@dataclass
class _CompletionContext:
    req: CompletionRequest
    id: str
    model: str
    created: int
    tokenizer: object
    echo_texts: list[str]  # per prompt; empty strings without echo
    scoring: bool = False  # echo with max_tokens 0: the prompt alone, its one generated token left out

    def choice(self, prompt_index: int, output: RequestOutput, completion: CompletionOutput,
               text: str, tokens: slice, first: bool, text_offset: int = 0) -> CompletionChoice:
        """A choice carrying `text` and the logprobs of `tokens` (their text_offset counted from
        `text_offset`), with the echoed prompt in front of the choice's first part."""
        if self.scoring:
            text, tokens = "", slice(0, 0)
        echo = first and self.req.echo
        logprobs = None
        if self.req.logprobs is not None:
            entries = list(zip(completion.token_ids[tokens], completion.logprobs[tokens]))
            if echo:
                prompt_positions = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
                entries = list(zip(output.prompt_token_ids, prompt_positions)) + entries
            logprobs = completion_logprobs(entries, text_offset, self.tokenizer, self.req.return_tokens_as_token_ids)
        if echo:
            text = self.echo_texts[prompt_index] + text
        choice = CompletionChoice(prompt_index * self.req.n + completion.index, text, logprobs,
                                  completion.finish_reason, completion.stop_reason)
        if first and self.req.prompt_logprobs is not None:
            choice.prompt_logprobs = prompt_logprobs(output, self.tokenizer)
        return choice


def _prompt_text(prompt, tokenizer) -> str:
    """A prompt's text as echoed: given, or decoded from its token ids."""
    if isinstance(prompt, dict):
        return prompt["prompt"]
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


def _tokenized(tokenizer, prompts: list, add_special_tokens: bool = True) -> list:
    """Text prompts with their token ids, encoded as the engine would. Run off the event loop, and
    done here rather than in the engine's step thread: a long prompt takes seconds, and would
    stall every stream meanwhile. (An empty one is left for the engine to refuse.)"""
    return [{"prompt": p, "prompt_token_ids": tokenizer.encode(p, add_special_tokens=add_special_tokens)}
            if isinstance(p, str) and p else p for p in prompts]


async def create_completion(request: Request, server: Server) -> Response:
    req = await read_json(request, CompletionRequest, server.max_body_bytes)
    engine = server.ready_engine()
    server.check_model(req.model)
    prompts = _completion_prompts(req.prompt)
    echo_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    if echo_logprobs is not None and req.prompt_logprobs not in (None, echo_logprobs):
        raise APIError(400, f"echo with logprobs {echo_logprobs} and prompt_logprobs {req.prompt_logprobs} ask for "
                            "the prompt's logprobs twice: give them the same number", param="prompt_logprobs")
    scoring = req.echo and req.max_tokens == 0
    params = sampling_params(req, 1 if scoring else req.max_tokens, req.logprobs,
                             prompt_logprobs=echo_logprobs if echo_logprobs is not None else req.prompt_logprobs)
    tokenizer = engine.tokenizer
    engine.check_not_overloaded()  # before the tokenizing, which may take seconds
    if sum(len(p) for p in prompts if isinstance(p, str)) <= INLINE_TOKENIZE_CHARS:
        prompts = _tokenized(tokenizer, prompts, req.add_special_tokens)
    else:
        prompts = await asyncio.to_thread(_tokenized, tokenizer, prompts, req.add_special_tokens)
    prompts = [truncated(p, req, tokenizer, engine.max_model_len) for p in prompts]
    echo_texts = [_prompt_text(p, tokenizer) if req.echo else "" for p in prompts]
    ctx = _CompletionContext(req, f"cmpl-{uuid.uuid4().hex}", server.served_model_name, int(time.time()),
                             tokenizer, echo_texts, scoring)
    if req.stream:
        return EventStream(_completion_events(server, engine, ctx, prompts, params))
    return await unless_disconnected(request, lambda: _completion_response(server, engine, ctx, prompts, params))


async def _completion_response(server: Server, engine: AsyncLLMEngine, ctx: _CompletionContext,
                               prompts: list, params: SamplingParams) -> Response:
    generation = await Generation.start(server, engine, ctx.id, prompts, params)
    try:
        finals = await generation.final_outputs()
    finally:
        generation.close()
    choices = [
        ctx.choice(i, final, completion, completion.text, slice(0, len(completion.token_ids)), first=True)
        for i, final in enumerate(finals)
        for completion in final.outputs
    ]
    choices.sort(key=lambda c: c.index)
    return json_response(CompletionResponse(ctx.id, ctx.created, ctx.model, choices,
                                            usage(finals, generated=not ctx.scoring)))


async def _completion_events(server: Server, engine: AsyncLLMEngine, ctx: _CompletionContext,
                             prompts: list, params: SamplingParams) -> AsyncIterator[bytes]:
    generation = await Generation.start(server, engine, ctx.id, prompts, params)
    try:
        cursors = [Cursor() for _ in range(len(prompts) * params.n)]
        sent_text = [0] * len(cursors)  # characters sent per choice, for logprobs' text_offset
        finals: list[RequestOutput | None] = [None] * len(prompts)
        async for i, output in generation.outputs():
            finals[i] = output
            for completion in output.outputs:
                index = i * params.n + completion.index
                if ctx.scoring:  # one event a choice, the prompt, once its request is done
                    if completion.finish_reason is not None and not cursors[index].done:
                        cursors[index].done = True
                        yield sse(CompletionResponse(ctx.id, ctx.created, ctx.model,
                                                     [ctx.choice(i, output, completion, "", slice(0, 0), first=True)]))
                    continue
                first = cursors[index].text_len == 0 and cursors[index].num_tokens == 0
                parts = new_parts(cursors[index], completion, with_tokens=ctx.req.logprobs is not None)
                if parts is None:
                    continue
                choice = ctx.choice(i, output, completion, *parts, first=first, text_offset=sent_text[index])
                sent_text[index] += len(choice.text)
                yield sse(CompletionResponse(ctx.id, ctx.created, ctx.model, [choice],
                                             usage(finals) if continuous_usage(ctx.req) else None))
        if include_usage(ctx.req):
            yield sse(CompletionResponse(ctx.id, ctx.created, ctx.model, [], usage(finals, generated=not ctx.scoring)))
        yield SSE_DONE
    finally:
        generation.close()
